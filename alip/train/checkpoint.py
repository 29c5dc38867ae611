"""Checkpoint files: atomic writes, keep-last-K, finding the latest usable one, RNG state.

A checkpoint is `step-00001000.pt` (a dict of tensors and plain values, loadable with
`torch.load(weights_only=True)`) plus `step-00001000.json` beside it. The JSON holds the size and
sha256 of the .pt and is written only after the .pt has been renamed into place. So a checkpoint
counts as complete when its JSON exists and the .pt matches it. A crash mid-write, a truncated
copy or a bit flip is passed over for the previous one, never chosen as latest.

Checkpoints that exist are never silently ignored or overwritten (CheckpointError, a user error):
- `--resume latest` where checkpoints exist but none is usable is refused, not a fresh start;
- a run refuses a folder whose checkpoints it would overwrite or prune (`claim_directory`): a fresh
  run in a used folder, a resume from another folder, or from a checkpoint with newer ones beside it.
A .pt is renamed into place only once complete, so a missing or unreadable manifest beside a .pt
whose own content checks out (a training checkpoint of its step) is rebuilt, with a warning. An
unusable checkpoint newer than the one resumed is renamed `*.unusable` rather than overwritten.

`Checkpointer` decides when to save (every N steps and/or M minutes, and at the end): the
training loop only asks `checkpointer.should_save(step)`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alip.files import sha256_file, write_json_atomic
from alip.model import CheckpointError, extract_state_dict, read_checkpoint

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")
# What `Trainer.state_dict` writes: a file without all of these is not a checkpoint to resume.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "loss", "train_state", "world_size", "ranks", "config")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int | None = None) -> Path:
    """Write `state` atomically as the checkpoint of `step`; then drop all but the `keep_last` newest.

    A failed write leaves no partial file, and a full disk says so (CheckpointError): PyTorch reports
    it as "enforce fail at inline_container.cc", with neither the errno nor the path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name says they are
        os.replace(tmp, path)
        write_manifest(path, step)
    except (RuntimeError, OSError) as e:
        full = _disk_full(e, directory, state)
        for partial in (tmp, path.with_suffix(".json.tmp")):
            partial.unlink(missing_ok=True)
        if full:
            raise CheckpointError(
                f"no space left on device: {path} (the checkpoint needs about {_tensor_bytes(state) / 2**20:.0f} MiB; "
                "the partial file was removed, the earlier checkpoints are intact)"
            ) from e
        raise
    if keep_last is not None:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def write_manifest(path: Path, step: int) -> None:
    manifest = {"step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path), "time": time.time()}
    write_json_atomic(path.with_suffix(".json"), manifest, indent=None)


def _disk_full(error: BaseException, directory: Path, state: Any) -> bool:
    """An errno where Python saw it; else (PyTorch's writer) less free space than the checkpoint's tensors."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return shutil.disk_usage(directory).free <= _tensor_bytes(state)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint .pt files in `directory`, oldest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest beside `path`, or None when it is missing or unreadable."""
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("bytes"), int):
        return None
    return manifest


def checkpoint_problem(path: Path, verify_hash: bool = True) -> str | None:
    """Why `path` is not a complete checkpoint; None when its manifest vouches for it."""
    if not path.is_file():
        return "missing"
    manifest = _read_manifest(path)
    if manifest is None:
        return "damaged manifest" if path.with_suffix(".json").exists() else "no manifest"
    size = path.stat().st_size
    if size != manifest["bytes"]:
        return f"{size} bytes where its manifest says {manifest['bytes']} (truncated?)"
    if verify_hash and sha256_file(path) != manifest.get("sha256"):
        return "content differs from its manifest's sha256 (corrupt)"
    return None


def is_complete(path: Path, verify_hash: bool = True) -> bool:
    return checkpoint_problem(path, verify_hash) is None


def find_latest(directory: str | Path, verify_hash: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt ones are reported and passed over."""
    for path in reversed(list_checkpoints(directory)):
        if is_complete(path, verify_hash):
            return path
        logger.warning("passing over incomplete or corrupt checkpoint %s", path)
    return None


def find_resumable(directory: str | Path) -> Path | None:
    """`--resume latest`: the newest usable checkpoint, rebuilding a lost manifest where the .pt checks
    out. None when there is no checkpoint at all; CheckpointError when there are some but none usable."""
    found = list_checkpoints(directory)
    reasons = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is not None and _read_manifest(path) is None:
            problem = _rebuild_manifest(path, problem)
        if problem is None:
            return path
        reasons.append(f"{path.name}: {problem}")
        logger.warning("passing over incomplete or corrupt checkpoint %s: %s", path, problem)
    if found:
        raise CheckpointError(
            f"{len(found)} checkpoints found, none usable: {', '.join(reasons)}. To start afresh, move them "
            f"out of {directory} or choose another output_dir"
        )
    return None


def _rebuild_manifest(path: Path, problem: str) -> str | None:
    """Write the manifest of a .pt that has none (or a damaged one) if the .pt's own content checks out:
    a training checkpoint of its step. Returns why not, or None once rebuilt."""
    try:
        state = load_training_state(path)
    except CheckpointError as e:
        return f"{problem}, and {e}"
    if state["train_state"].get("step") != step_of(path):
        return f"{problem}, and it holds step {state['train_state'].get('step')}"
    write_manifest(path, step_of(path))
    logger.warning("rebuilt the manifest of %s (%s): its content is a complete checkpoint of its step", path, problem)
    return None


def resolve_resume(resume: str | None, directory: str | Path) -> Path | None:
    """`--resume latest` -> newest usable checkpoint in `directory` (None if there is none yet); a path
    -> that file, which must exist and match its manifest where it has one."""
    if not resume:
        return None
    if resume == "latest":
        return find_resumable(directory)
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None and _read_manifest(path) is not None:
        raise CheckpointError(f"checkpoint {path} does not match its manifest: {problem}")
    return path


def claim_directory(directory: str | Path, start: Path | None) -> list[Path]:
    """Before a run writes into `directory`: refuse where it would overwrite or prune checkpoints it did
    not write. Returns the unusable checkpoints newer than `start` (the checkpoint resumed; None: fresh),
    which `set_aside` moves out of the way once nothing else can refuse the run: a refused resume
    leaves the folder as it was."""
    directory = Path(directory)
    existing = list_checkpoints(directory)
    if start is None and existing:
        raise CheckpointError(
            f"{directory} already holds checkpoints (newest {existing[-1].name}): continue that run with "
            "--resume latest, or choose another output_dir"
        )
    if start is None or start.resolve().parent != directory.resolve():
        if existing:
            raise CheckpointError(
                f"{directory} holds checkpoints of another run (newest {existing[-1].name}), which resuming "
                f"{start} there would overwrite or prune: choose another output_dir"
            )
        return []
    newer = [p for p in existing if step_of(p) > step_of(start)]
    usable = [p.name for p in newer if is_complete(p)]
    if usable:
        raise CheckpointError(
            f"{directory} holds checkpoints newer than {start.name} ({', '.join(usable)}), which this run "
            "would overwrite: move them away, or resume into another output_dir"
        )
    return newer


def set_aside(unusable: list[Path]) -> None:
    """Rename unusable checkpoints (and their manifests) to `*.unusable`: kept for inspection, never
    overwritten by the steps this run writes again."""
    for path in unusable:
        for part in (path, path.with_suffix(".json")):
            if part.exists():
                part.rename(part.with_name(part.name + ".unusable"))
        logger.warning("set aside unusable checkpoint %s as %s.unusable", path, path.name)


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict; never runs code (weights_only). Unreadable files raise CheckpointError."""
    return read_checkpoint(path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `Trainer.state_dict`; any other file is refused, saying what it is."""
    state = load_state(path)
    if isinstance(state, Mapping) and all(key in state for key in TRAINING_KEYS):
        return dict(state)
    try:
        _, fmt = extract_state_dict(state, str(path))
    except CheckpointError:
        fmt = None
    if fmt in ("open_clip", "state_dict"):
        raise CheckpointError(
            f"{path} is a weights file (model weights only: no optimizer, schedule or data position), not a "
            f"training checkpoint to resume; to start a new run from these weights, use model.pretrained={path}"
        )
    missing = [key for key in TRAINING_KEYS if not isinstance(state, Mapping) or key not in state]
    raise CheckpointError(f"{path} is not an alip.train checkpoint (it lacks {', '.join(missing)})")


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
        # One state per visible device; a resume on another machine shape (--reshard) may see fewer.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


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
