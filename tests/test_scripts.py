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
