"""The command lines: tools/export_checkpoint.py and the `make demo` smoke run."""

import subprocess
import sys
from pathlib import Path

import open_clip
import torch

import alip

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_export_tool_converts_an_official_release_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "release.pt")
    res = run(
        ROOT / "tools/export_checkpoint.py",
        "--model",
        "ALIP-Tiny",
        tmp_path / "release.pt",
        tmp_path / "o.safetensors",
    )
    assert res.returncode == 0, res.stderr
    assert "state_dict format" in res.stdout and "sha256" in res.stdout
    loaded = open_clip.create_model("ALIP-Tiny", pretrained=str(tmp_path / "o.safetensors"))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_export_tool_reports_a_mismatch_without_a_traceback(tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "wrong.pt")
    res = run(ROOT / "tools/export_checkpoint.py", "--model", "ALIP-Tiny", tmp_path / "wrong.pt", tmp_path / "o.pt")
    assert res.returncode == 2  # a user error (alip.cli)
    assert "missing keys" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.pt").exists()


# ----- the launchers: the global batch they pass (torchrun, srun and scontrol replaced by stand-ins) ---------


def launch(tmp_path, script, *args, **env):
    """Run `script` with stand-ins that print the trainer's command line; (torchrun's arguments, stderr)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {
        "torchrun": 'printf "%s\\n" "$@"',
        "scontrol": "echo node0",
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',  # its options, then the command
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"  # `python` with PyYAML for the launcher
    base = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "DATA": "/data/train.meta.json"}
    res = subprocess.run(
        ["bash", str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**base, **{k: str(v) for k, v in env.items()}},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines(), res.stderr


def batch_of(argv):
    return [int(a.partition("=")[2]) for a in argv if a.startswith("train.batch_size=")]


LAUNCHER = "scripts/train_yfcc15m_B32_ALIP.sh"


def checkpointed_run(tmp_path, batch):
    """A run folder as the trainer leaves it: config.yaml (the batch it trains with) and a checkpoint."""
    import yaml

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run_dir), "train": {"batch_size": batch}}))
    (run_dir / "checkpoints" / "step-00000010.pt").write_bytes(b"")
    return run_dir


def test_the_launcher_passes_per_gpu_batch_times_gpus_or_global_batch(tmp_path):
    argv, err = launch(tmp_path, LAUNCHER, NNODES=2, GPUS_PER_NODE=8, OUTPUT_DIR=tmp_path / "new")
    assert batch_of(argv) == [8192] and "global batch 8192 (PER_GPU_BATCH 512 x 16 GPUs; 512 per GPU)" in err
    assert argv[-3:] == ["data.train=/data/train.meta.json", "train.batch_size=8192", f"output_dir={tmp_path / 'new'}"]
    argv, _ = launch(tmp_path, LAUNCHER, NNODES=2, GPUS_PER_NODE=8, PER_GPU_BATCH=256, OUTPUT_DIR=tmp_path / "n")
    assert batch_of(argv) == [4096]
    argv, err = launch(tmp_path, LAUNCHER, NNODES=4, GPUS_PER_NODE=8, GLOBAL_BATCH=4096, PER_GPU_BATCH=64)
    assert batch_of(argv) == [4096] and "(GLOBAL_BATCH; 128 per GPU)" in err


def test_a_resume_through_the_launcher_keeps_the_runs_global_batch(tmp_path):
    """A run checkpointed on 8 nodes (global batch 4096 at 64 per GPU) comes back on 4: the launcher passes
    the run's 4096 (its config.yaml), not 4 x 8 x 64, so `--reshard` can continue it."""
    run_dir = checkpointed_run(tmp_path, 4096)
    env = {"NNODES": 4, "GPUS_PER_NODE": 8, "PER_GPU_BATCH": 64}
    argv, err = launch(tmp_path, LAUNCHER, "--resume", "latest", "--reshard", OUTPUT_DIR=run_dir, **env)
    assert batch_of(argv) == [4096] and f"kept from the run: {run_dir}/config.yaml; 128 per GPU" in err
    assert argv[-3:] == ["--resume", "latest", "--reshard"]
    argv, _ = launch(tmp_path, LAUNCHER, f"output_dir={run_dir}", "--resume=latest", **env)  # the folder as argument
    assert batch_of(argv) == [4096]
    argv, _ = launch(tmp_path, LAUNCHER, "--resume", "latest", OUTPUT_DIR=run_dir, GLOBAL_BATCH=1024, **env)
    assert batch_of(argv) == [1024]  # GLOBAL_BATCH first
    argv, _ = launch(tmp_path, LAUNCHER, OUTPUT_DIR=run_dir, **env)  # not a resume: per GPU
    assert batch_of(argv) == [2048]
    (run_dir / "checkpoints" / "step-00000010.pt").unlink()  # no checkpoint yet: a new run, per GPU
    argv, _ = launch(tmp_path, LAUNCHER, "--resume", "latest", OUTPUT_DIR=run_dir, **env)
    assert batch_of(argv) == [2048]


def test_the_sbatch_resumes_on_another_node_count_with_the_runs_global_batch(tmp_path):
    run_dir = checkpointed_run(tmp_path, 8192)  # 2 nodes x 8 x 512
    slurm = {"SLURM_NNODES": 1, "SLURM_JOB_NODELIST": "node[0]", "SLURM_JOB_ID": 7, "SLURM_JOB_NAME": "alip-b32"}
    argv, err = launch(tmp_path, "scripts/train_slurm.sbatch", "--reshard", OUTPUT_DIR=run_dir, **slurm)
    assert batch_of(argv) == [8192] and "1024 per GPU" in err
    assert argv[argv.index("--nnodes") + 1] == "1" and argv[-3:] == ["--resume", "latest", "--reshard"]
    argv, _ = launch(tmp_path, "scripts/train_slurm.sbatch", OUTPUT_DIR=tmp_path / "fresh", **slurm)
    assert batch_of(argv) == [4096]  # a new run: 512 per GPU on the node it got
