"""Checkpoint files: atomic writes, keep-last-K, finding the latest complete one, RNG state.

A checkpoint is `step-00001000.pt` (a dict of tensors and plain values, loadable with
`torch.load(weights_only=True)`) plus `step-00001000.json` beside it. The JSON holds the size and
sha256 of the .pt and is written only after the .pt has been renamed into place. So a checkpoint
counts as complete when its JSON exists and the .pt matches it. A crash mid-write, a truncated
copy or a bit flip is passed over for the previous one, never chosen as latest.

`Checkpointer` decides when to save (every N steps and/or M minutes, and at the end): the
training loop only asks `checkpointer.should_save(step)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alip.files import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int | None = None) -> Path:
    """Write `state` atomically as the checkpoint of `step`; then drop all but the `keep_last` newest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name says they are
    os.replace(tmp, path)
    manifest = {"step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path), "time": time.time()}
    write_json_atomic(path.with_suffix(".json"), manifest, indent=None)
    if keep_last is not None:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint .pt files in `directory`, oldest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def is_complete(path: Path, verify_hash: bool = True) -> bool:
    manifest_path = path.with_suffix(".json")
    if not path.is_file() or not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if path.stat().st_size != manifest.get("bytes"):
        return False
    return not verify_hash or sha256_file(path) == manifest.get("sha256")


def find_latest(directory: str | Path, verify_hash: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt ones are reported and passed over."""
    for path in reversed(list_checkpoints(directory)):
        if is_complete(path, verify_hash):
            return path
        logger.warning("passing over incomplete or corrupt checkpoint %s", path)
    return None


def resolve_resume(resume: str | None, directory: str | Path) -> Path | None:
    """`--resume latest` -> newest complete checkpoint in `directory` (None if there is none yet);
    a path -> that file, which must exist and be complete."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest(directory)
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {path}")
    if path.with_suffix(".json").exists() and not is_complete(path):
        raise ValueError(f"checkpoint {path} does not match its manifest (truncated or corrupt)")
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict; never runs code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values only.

    NumPy's state holds an array: it is stored as a list so the checkpoint stays loadable with
    weights_only=True.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """When to save: every `every_steps` steps and/or `every_minutes` minutes, and at the end."""

    def __init__(
        self,
        directory: str | Path,
        every_steps: int | None,
        every_minutes: float | None,
        keep_last: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.keep_last = keep_last
        self._clock = clock
        self._last_time = clock()

    def should_save(self, step: int, final: bool = False) -> bool:
        """Must give the same answer on every rank: the caller broadcasts rank 0's time-based verdict."""
        if final:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and self._clock() - self._last_time >= 60 * self.every_minutes

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = save_checkpoint(state, self.directory, step, self.keep_last)
        self._last_time = self._clock()
        logger.info("saved checkpoint %s", path)
        return path
