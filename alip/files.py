"""Small file helpers shared by the data tools, checkpoints and evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from alip.cli import UserError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (shards and checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Write JSON under a temporary name, then rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class FolderLockedError(UserError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on an output folder, so two runs never write into one folder at once.

        with FolderLock(out_dir, "data2rec"):
            ...

    `flock` on `{folder}/.alip.lock`: the kernel drops the lock when its holder exits, kill -9
    included, so a crashed run never leaves a stale lock behind. The file records the holder's
    PID, host and command for the refusal message. flock is per host on some network filesystems:
    there the lock still protects against a second run on the same node.
    """

    NAME = ".alip.lock"

    def __init__(self, folder: str | Path, what: str) -> None:
        self.path = Path(folder) / self.NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl
        import socket
        import sys
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                who = (
                    f"{info.get('what')} (PID {info.get('pid')} on host {info.get('host')}, "
                    f"started {info.get('started')})"
                )
            except (ValueError, AttributeError):
                who = "another process"
            raise FolderLockedError(
                f"{self.path.parent} is in use by {who}; wait for it to finish or use another folder"
            ) from None
        info = {
            "what": self.what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def json_lines(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not valid
    JSON raises `error` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON: {e}") from None


# ---------------------------------------------------------------- outputs never touch inputs


class OutputOverlapError(UserError):
    """An output path that is, contains or lies inside one of the command's inputs."""


def _variants(path: str | Path) -> set[Path]:
    """The path as written (absolute, `..` folded) and with its symlinks resolved: an overlap through
    either is one."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def refuse_overlap(
    output: tuple[str, str | Path],
    inputs: Iterable[tuple[str, str | Path]],
    beside: Iterable[tuple[str, str | Path]] = (),
) -> None:
    """Refuse, before anything is written, an output that is, contains or lies inside an input.

    output: (its option, e.g. "--out-dir", path). inputs: (option, path) pairs of files and folders the
    command reads. beside: folders the output may lie inside but neither be nor contain (a manifest's
    folder, the default root of its image paths: writing beside the manifest is the usual layout).
    Symlinks and `..` are resolved. Raises OutputOverlapError naming both paths."""
    what, out = output
    outs = _variants(out)
    checks = [(label, path, True) for label, path in inputs] + [(label, path, False) for label, path in beside]
    for label, path, strict in checks:
        for o in outs:
            for i in _variants(path):
                relation = _relation(o, i)
                if relation is None or (relation == "lies inside" and not strict):
                    continue
                raise OutputOverlapError(
                    f"{what} {out} {relation} the input {label} {path}; write the output elsewhere, nothing was changed"
                )


def _own_and_strangers(folder: Path, patterns: Iterable[str], own: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """The files of `folder` matching `patterns` (globs), split into those named in `own` (what this tool's
    stamps say it wrote) and the others (strangers: never deleted, never overwritten)."""
    own = set(own)
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file() or p.is_symlink()})
    return [p for p in found if p.name in own], [p for p in found if p.name not in own]


def few(paths: Sequence[Path], shown: int = 5) -> str:
    """A list of files for one line of a message: "a, b, c and 7 more"."""
    names = [p.name for p in paths[:shown]]
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(names) + more


def _remove_own(files: Sequence[Path], tool: str, log: logging.Logger) -> None:
    """--overwrite: delete exactly `files` (this tool's own, from its stamps), saying how many and which first."""
    if not files:
        return
    log.info("--overwrite: removing %d file(s) %s wrote earlier: %s", len(files), tool, few(files))
    for p in files:
        p.unlink(missing_ok=True)


def claim_folder(
    out: Path,
    prefix: str,
    tool: str,
    *,
    plan: str,
    earlier: set[str],
    names: set[str],
    overwrite: bool,
    error: type[Exception],
    log: logging.Logger,
    keep: frozenset[str] = frozenset(),
) -> None:
    """Before `tool` writes the files `names` into `out`: what may happen to the files with its prefix there.

    plan: what the folder's plan file says of the run before: "none" (no plan file), "same" (this run's
    plan: a resume), "empty" (a run that left nothing worth keeping), "other" (a run with other inputs).
    earlier: the names that run wrote (from its plan). keep: names of the tool's that stay even with
    --overwrite. Raises `error` where a stranger's file has a name the run would write, where another
    run's files are there without --overwrite, and, without a plan, where a stranger's `{prefix}-*` files
    are (they would mix with the new shards); else --overwrite (or an "empty" plan) removes the earlier
    run's own files, and a stranger's are left where they are."""
    own, strangers = _own_and_strangers(out, [f"{prefix}-*", f"{prefix}.*"], earlier | keep)
    own = [p for p in own if p.name not in keep]
    strangers = [p for p in strangers if p.name not in keep]
    clash = [p for p in strangers if p.name in names]
    if clash:
        raise error(
            f"{out} holds {len(clash)} file(s) not made by {tool} under names it would write: {few(clash)}; "
            f"move them away, or choose another --out-dir/--prefix ({tool} never deletes or writes over them)"
        )
    if plan == "other" and not overwrite:
        raise error(
            f"{out} already holds '{prefix}' files from a {tool} run with other inputs or options; pass "
            f"--overwrite to replace them (only the files that run wrote), or choose another --out-dir/--prefix"
        )
    foreign = [p for p in strangers if p.name.startswith(f"{prefix}-")]
    if plan == "none" and foreign and not overwrite:
        raise error(
            f"{out} already holds {len(foreign)} file(s) '{prefix}-*' not made by {tool}: {few(foreign)}; move "
            "them away or choose another --out-dir/--prefix (--overwrite writes beside them and leaves them)"
        )
    if overwrite or plan == "empty":
        _remove_own(own, tool, log)
    if overwrite and strangers:
        log.info("--overwrite leaves %d file(s) %s did not write: %s", len(strangers), tool, few(strangers))
