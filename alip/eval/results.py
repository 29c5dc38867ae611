"""Results records: the JSON written per run and the table printed on stdout."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from alip.files import sha256_file

_PACKAGES = ("alip", "torch", "torchvision", "open_clip_torch", "clip-benchmark", "numpy", "pillow")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_record(model_name: str, checkpoint: str | None) -> dict[str, Any]:
    """Model name, checkpoint path and its sha256 (None for a randomly initialised or hub model)."""
    record: dict[str, Any] = {"name": model_name, "checkpoint": checkpoint, "checkpoint_sha256": None}
    if checkpoint is not None and Path(checkpoint).is_file():
        record["checkpoint"] = str(Path(checkpoint).resolve())
        record["checkpoint_sha256"] = sha256_file(checkpoint)
    return record


def build_record(task: str, model: dict[str, Any], datasets: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """One results record: task, model, every dataset's description and metrics, settings, versions."""
    return {
        "task": task,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": model,
        "settings": settings,
        "versions": package_versions(),
        "datasets": datasets,
    }


def write_record(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table: one row per dataset, numbers with two decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
