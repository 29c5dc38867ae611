"""The trainer on one CPU process: golden losses, exact resume after SIGKILL, exact accumulation, skips.

The tiny config (configs/tiny_cpu.yaml) on the 24-record shards of shard_factory: fp32, torch
loader without workers, deterministic algorithms, so two runs of the same steps are bitwise equal.

Regenerate the golden file (only after an intended change of the numerics) with
`ALIP_WRITE_GOLDEN=1 pytest tests/test_train.py -k golden`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shard_factory import write_test_shards

from alip.config import load_config, validate
from alip.train.run import train
from alip.train.trainer import TooManySkippedStepsError, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
GOLDEN = Path(__file__).parent / "golden" / "tiny_cpu_losses.json"
STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread_then_restore():
    """One intra-op thread (tiny models on a loaded 2-core box); afterwards restore the thread count and
    the process-wide deterministic flag (train.deterministic switches it on) for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("train_shards"), num_records=24, per_shard=10).meta


def overrides(data, out_dir, *extra):
    return [f"data.train={data}", f"output_dir={out_dir}", "checkpoint.every_steps=3", *extra]


def read_losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted in-process run of the tiny config: its per-step losses and final weights."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(load_config(TINY, overrides(data, run_dir)))
    return run_dir


def test_golden_losses_of_the_tiny_config(reference):
    losses = read_losses(reference)
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1)) and all(r["applied"] for r in losses)
    if os.environ.get("ALIP_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "configs/tiny_cpu.yaml", "steps": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["steps"]
    # 1e-4 relative: the same machine reproduces bitwise, but another CPU's kernels (AVX2 vs
    # AVX-512 reductions) may round differently, and 20 optimizer steps amplify that a little.
    for got, want in zip(losses, golden, strict=True):
        for key in ("loss", "loss_raw", "loss_caption"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)


def _launch(data, run_dir, *extra):
    cmd = [sys.executable, "-m", "alip.train", str(TINY), *overrides(data, run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_latest_is_bitwise_identical(data, reference, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _launch(data, run_dir)
    ckpt = run_dir / "checkpoints"
    deadline = time.monotonic() + 60
    while not (ckpt / "step-00000006.json").exists():  # complete once its manifest exists
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint at step 6 within 60 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final.pt").exists(), "the run finished before it was killed; the test proves nothing"
    # A truncated newest checkpoint (a crash mid-copy) must be passed over for the one before it.
    newest = sorted(ckpt.glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    proc = _launch(data, run_dir, "--resume", "latest")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "passing over incomplete or corrupt checkpoint" in out
    resumed_at = int(out.split("at step ")[1].split()[0])
    assert 3 <= resumed_at < STEPS
    assert read_losses(run_dir) == read_losses(reference)  # every step's losses, bitwise
    want, got = load_file(reference / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_dali_loader_run_stopped_and_resumed_matches_one_run(data, tmp_path):
    """DALI (CPU mode): 3 steps, a new process-like start with --resume latest to step 6, vs 6 steps."""
    pytest.importorskip("nvidia.dali")  # installed by make install; absent on the lent GPU machine
    dali = ["data.loader=dali", "checkpoint.export=false"]
    whole = train(load_config(TINY, overrides(data, tmp_path / "whole", "train.max_steps=6", *dali)))
    part = tmp_path / "part"
    train(load_config(TINY, overrides(data, part, "train.max_steps=3", *dali)))  # saves step 3 at the end
    resumed = train(load_config(TINY, overrides(data, part, "train.max_steps=6", *dali)), resume="latest")
    assert [r["step"] for r in read_losses(part)] == list(range(1, 7))
    assert read_losses(part) == read_losses(tmp_path / "whole")
    for name, p in whole.clip.state_dict().items():
        assert torch.equal(resumed.clip.state_dict()[name], p), name


def test_logger_without_tensorboard_installed_and_jsonl_truncation(tmp_path):
    from alip.config import LogConfig
    from alip.train.logger import TrainLogger

    log = TrainLogger(LogConfig(tensorboard=True, every_steps=2), tmp_path, is_main=True, run_config={})
    for step in range(1, 5):
        log.record_step(step, {"loss": float(step)}, applied=True)
    assert log.should_log(4) and not log.should_log(3)
    log.truncate_after(2)
    assert [r["step"] for r in read_losses(tmp_path)] == [1, 2]
    log.close()


def test_sigterm_saves_at_the_next_step_boundary_and_exits_cleanly(data, tmp_path):
    run_dir = tmp_path / "terminated"
    proc = _launch(data, run_dir, "train.max_steps=500")  # far more steps than the test waits for
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoints" / "step-00000003.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 3"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    last_step = read_losses(run_dir)[-1]["step"]
    assert last_step < 500 and not (run_dir / "final.pt").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))[-1] == f"step-{last_step:08d}.pt"


def test_time_based_checkpoints(data, tmp_path):
    extra = ["train.max_steps=3", "checkpoint.every_steps=null", "checkpoint.every_minutes=1e-6"]
    extra += ["checkpoint.keep_last=5", "checkpoint.export=false"]
    train(load_config(TINY, [f"data.train={data}", f"output_dir={tmp_path}", *extra]))
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert saved == [f"step-{s:08d}.pt" for s in (1, 2, 3)]  # every step is 60 us past the last save


def test_in_training_evaluation_runs_when_due(data, tmp_path, caplog):
    from test_eval_formats import CIFAR10_CLASSES, write_imagefolder

    toy = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:3], per_class=[2, 2, 2])
    extra = ["train.max_steps=2", "eval.every_steps=2", f"eval.zeroshot={toy}", "checkpoint.export=false"]
    with caplog.at_level("INFO", logger="alip.train"):
        train(load_config(TINY, overrides(data, tmp_path / "run", *extra)))
    evals = [r.getMessage() for r in caplog.records if " eval: " in r.getMessage()]
    assert len(evals) == 1 and evals[0].startswith("step 2 eval:") and "eval/toy/top1" in evals[0]


def _trainer(data, run_dir, *extra):
    cfg = load_config(TINY, overrides(data, run_dir, "log.every_steps=1000", *extra))
    return Trainer(cfg, validate(cfg, 1), run_dir, torch.device("cpu"))


def test_accumulation_of_two_half_batches_equals_the_full_batch(data, tmp_path):
    full = _trainer(data, tmp_path / "full", "train.accum_steps=1")
    accum = _trainer(data, tmp_path / "accum", "train.accum_steps=2")
    assert accum.shape.micro_batch == full.shape.micro_batch // 2
    init = {k: v.clone() for k, v in full.clip.state_dict().items()}
    batch = next(iter(full.loader))
    for _ in range(2):  # the second step also checks the gate EMAs moved once, not twice
        a, b = full.train_step(batch), accum.train_step(batch)
        assert a.applied and b.applied
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
    torch.testing.assert_close(accum.loss_fn.state_dict(), full.loss_fn.state_dict(), rtol=1e-6, atol=1e-7)
    assert accum.scheduler.last_epoch == full.scheduler.last_epoch == 2
    for name, p in full.clip.state_dict().items():
        torch.testing.assert_close(accum.clip.state_dict()[name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(init["visual.conv1.weight"], full.clip.visual.conv1.weight.detach())


def test_consecutive_non_finite_steps_abort_with_a_clear_error(data, tmp_path):
    trainer = _trainer(data, tmp_path, "train.max_consecutive_skips=2")
    batch = next(iter(trainer.loader))
    bad = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
    before = {k: v.clone() for k, v in trainer.clip.state_dict().items()}
    outcome = trainer.train_step(bad)
    assert not outcome.applied and trainer.state.skipped_steps == 1
    assert all(torch.equal(v, trainer.clip.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TooManySkippedStepsError, match="2 consecutive steps"):
        trainer.train_step(bad)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_grad_checkpointing_and_autocast_run(data, tmp_path, precision):
    trainer = _trainer(data, tmp_path, "model.grad_checkpointing=true", f"train.precision={precision}")
    outcome = trainer.train_step(next(iter(trainer.loader)))
    assert outcome.applied and torch.isfinite(torch.tensor(outcome.losses["loss"]))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_run_them(path):
    assert path.read_text().startswith("#"), "a config opens with its command, hardware and expected results"
    cfg = load_config(path, ["data.train=shards/"])
    shape = validate(cfg, 8 if cfg.model.name != "ALIP-Tiny" else 2)
    assert shape.per_rank_batch * shape.world_size == cfg.train.batch_size
