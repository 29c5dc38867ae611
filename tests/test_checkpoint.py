"""alip.train.checkpoint: atomic files, keep-last-K, latest complete, RNG state."""

import random

import numpy as np
import pytest
import torch

import alip
from alip.model import CheckpointError
from alip.train.checkpoint import (
    Checkpointer,
    find_latest,
    list_checkpoints,
    load_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"lr": 1e-3}}


def test_keep_last_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000030.json", "step-00000030.pt", "step-00000040.json", "step-00000040.pt",
    ]  # fmt: skip
    latest = find_latest(tmp_path)
    assert latest.name == "step-00000040.pt" and load_state(latest)["step"] == 40


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "tmp_only"])
def test_damaged_latest_is_passed_over(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step)
    newest = tmp_path / "step-00000002.pt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "no_manifest":  # crashed between the rename of the .pt and its manifest
        newest.with_suffix(".json").unlink()
    else:  # crashed mid-write: only the temporary file exists
        newest.rename(tmp_path / "step-00000002.pt.tmp")
        newest.with_suffix(".json").unlink()
    assert find_latest(tmp_path).name == "step-00000001.pt"
    assert resolve_resume("latest", tmp_path).name == "step-00000001.pt"
    if damage in ("truncate", "flip"):
        with pytest.raises(CheckpointError, match="does not match its manifest"):
            resolve_resume(str(newest), tmp_path)


def test_resume_arguments(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "empty") is None  # a fresh run: nothing to resume
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_cadence_by_steps_and_minutes():
    now = [0.0]
    ck = Checkpointer("unused", every_steps=100, every_minutes=None, keep_last=3, clock=lambda: now[0])
    assert [s for s in range(1, 301) if ck.should_save(s)] == [100, 200, 300]
    assert ck.should_save(7, final=True)
    ck = Checkpointer("unused", every_steps=None, every_minutes=30, keep_last=3, clock=lambda: now[0])
    assert not ck.should_save(1)
    now[0] = 30 * 60
    assert ck.should_save(2)


def test_checkpointer_save_resets_the_timer(tmp_path):
    now = [0.0]
    ck = Checkpointer(tmp_path, every_steps=None, every_minutes=1, keep_last=1, clock=lambda: now[0])
    now[0] = 61
    assert ck.should_save(5)
    ck.save(state(5), 5)
    assert not ck.should_save(6)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_state(tmp_path / "step-00000001.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_model_and_gate_state_survive_the_file(tmp_path):
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    loss = alip.AlipLoss()
    loss.gates.ema_tc.fill_(0.42)
    save_checkpoint({"model": model.state_dict(), "loss": loss.state_dict()}, tmp_path, 3)
    other, _, _ = alip.create_model("ALIP-Tiny")
    assert alip.load_checkpoint(other, tmp_path / "step-00000003.pt") == "alip-train"
    restored = alip.AlipLoss()
    restored.load_state_dict(load_state(tmp_path / "step-00000003.pt")["loss"])
    assert restored.gates.ema_tc.item() == pytest.approx(0.42)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
