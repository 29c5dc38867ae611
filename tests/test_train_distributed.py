"""The trainer under DDP: 2 gloo processes on CPU (tiny model, tiny shards).

One spawn runs both checks to pay the process start-up once:
- a 36-step run (accumulation x2, gradient checkpointing) whose loss goes down;
- a NaN injected into rank 1's batch only: every rank skips that step, the parameters are
  unchanged, the skip counter reads 1, and the next step trains on both ranks again.
Then torchrun with --max-restarts 1 runs the same training; rank 1 is SIGKILLed once after a
checkpoint, torchrun restarts both ranks, they resume from the last complete checkpoint by
themselves and end with the same per-step losses and final parameters as the uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from shard_factory import write_test_shards

from alip.config import load_config, validate
from alip.train.run import train
from alip.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
WORLD = 2
STEPS = 36


def _config_overrides():
    return [
        # Low-noise data (no crop, no flip) so that "the loss goes down" is reliable in few steps.
        "data.random_area=[1.0, 1.0]",
        "data.random_aspect_ratio=[1.0, 1.0]",
        "data.flip_prob=0.0",
        "checkpoint.every_steps=null",
        "checkpoint.export=false",
        "log.every_steps=12",
    ]


def _config(data, out_dir, *extra):
    return load_config(TINY, [f"data.train={data}", f"output_dir={out_dir}", *_config_overrides(), *extra])


def _losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def _nan_on_rank_one(cfg, rank):
    trainer = Trainer(cfg, validate(cfg, WORLD), Path(cfg.output_dir), torch.device("cpu"))
    batch = next(iter(trainer.loader))
    bad = {**batch, "image": batch["image"].clone()}
    if rank == 1:
        bad["image"][0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.clip.state_dict().items()}
    skipped = trainer.train_step(bad)
    unchanged = all(torch.equal(v, trainer.clip.state_dict()[k]) for k, v in before.items())
    after_skip = (skipped.applied, trainer.state.skipped_steps, unchanged, trainer.scheduler.last_epoch)
    good = trainer.train_step(batch)
    return {"after_skip": after_skip, "next_applied": good.applied, "next_loss": good.losses["loss"]}


RUN = [
    f"train.max_steps={STEPS}",
    "train.accum_steps=2",
    "model.grad_checkpointing=true",
    # The gate EMAs start at 1.0: with the released momentum (0.99) the weights, and with them the
    # weighted loss, climb for a few hundred steps while the EMAs settle. Momentum 0 scores each
    # batch against its own mean, so the weighted loss follows the contrastive loss from step 1.
    "loss.momentum=0.0",
]


def _worker(rank, port, data, out_dir):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    trainer = train(_config(data, Path(out_dir) / "run", *RUN))
    result = {"params": {k: v.clone() for k, v in trainer.clip.state_dict().items()}}
    result["nan"] = _nan_on_rank_one(_config(data, Path(out_dir) / "nan"), rank)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    data = write_test_shards(tmp_path_factory.mktemp("ddp_shards"), num_records=24, per_shard=10).meta
    out_dir = tmp_path_factory.mktemp("ddp_train")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(data), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process training did not finish in 240 s (a rank waiting in a collective?)")
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return data, out_dir, results


def test_two_process_run_trains_and_the_loss_goes_down(two_ranks):
    _, out_dir, results = two_ranks
    losses = _losses(out_dir / "run")
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)) and all(r["applied"] for r in losses)
    first = sum(r["loss"] for r in losses[:6]) / 6
    last = sum(r["loss"] for r in losses[-6:]) / 6
    assert last < 0.7 * first, (first, last)
    assert (out_dir / "run" / "checkpoints" / f"step-{STEPS:08d}.pt").exists()  # the final checkpoint
    for name, p in results[0]["params"].items():  # DDP kept the replicas identical
        assert torch.equal(p, results[1]["params"][name]), name


def test_nan_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    _, _, results = two_ranks
    for r in results:
        applied, skipped_steps, unchanged, scheduler_steps = r["nan"]["after_skip"]
        assert (applied, skipped_steps, unchanged, scheduler_steps) == (False, 1, True, 0)
        assert r["nan"]["next_applied"]
    assert results[0]["nan"]["next_loss"] == results[1]["nan"]["next_loss"]  # rank-averaged, so equal


def _worker_pid(marker, rank):
    """The pid of the torchrun worker of `rank` in the job whose environment carries `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, gone, or not ours
            continue
        if marker in env and f"RANK={rank}".encode() in env and b"alip.train" in cmdline:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker to kill through /proc")
def test_torchrun_restart_after_a_killed_rank_resumes_by_itself(two_ranks, tmp_path):
    data, reference, results = two_ranks
    run_dir = tmp_path / "restarted"
    marker = f"ALIP_TEST_JOB={tmp_path.name}"
    overrides = [f"data.train={data}", f"output_dir={run_dir}", *_config_overrides(), *RUN]
    overrides += ["checkpoint.every_steps=6", "checkpoint.export=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={WORLD}"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=1"]
    cmd += ["-m", "alip.train", str(TINY), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "step-00000012.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 12"
            time.sleep(0.01)
        pid = _worker_pid(marker.encode(), 1)
        assert pid is not None, "rank 1's worker process not found"
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "resumed from" in out, out  # the restarted workers loaded a checkpoint by themselves
    assert _losses(run_dir) == _losses(reference / "run")
    final = load_file(run_dir / "final.safetensors")
    assert final.keys() == results[0]["params"].keys()
    for name, p in results[0]["params"].items():
        assert torch.equal(final[name], p), name
