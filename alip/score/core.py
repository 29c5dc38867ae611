"""`score_shards`: the steps of `alip score`, in order, from a checkpoint and shards to a `ScoreResult`.

Everything a user can get wrong (checkpoint, shards, truth file, model name, gate options) is
checked before the model is built, so a mistake costs seconds, not a model pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alip.data import schema
from alip.data.loader_config import prepare_shards
from alip.data.recordio import ShardCheck
from alip.data.torch_loader import RecordDataset
from alip.gates import PAIR_GATES
from alip.score.common import ScoreInputError, _Warnings
from alip.score.ranking import BASE_COLUMNS, RANKING, ScoreResult, _ranked_rows
from alip.score.signals import (
    _Checkpoint,
    _gate_weights,
    _Gated,
    _load_model,
    _pick_device,
    _read_checkpoint,
    _require_finite,
    _Scored,
    _shard_texts,
    _similarities,
)
from alip.score.truth import TRUTH_COLUMNS, _join_truth, read_truth


@dataclass
class _Shards:
    spec: str | list[str]  # as given, for the summary
    checks: list[ShardCheck]  # the non-empty shards, preflighted, in reading order
    infos: list[schema.ShardInfo]  # the same shards' meta (texts sidecar paths)


@dataclass
class _Settings:
    model: str
    power: float
    pair_gate: str


def _resolve_shards(shards: str | Path | Sequence[str | Path]) -> _Shards:
    """Find and preflight the shards; a missing path or a broken shard fails here, naming the file."""
    spec = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else str(shards)
    for one in spec if isinstance(spec, list) else [spec]:
        if not any(ch in one for ch in "*?[") and not Path(one).exists():
            raise FileNotFoundError(f"shards not found: {one}")
    checks = prepare_shards(spec)  # preflight: a broken shard fails here, naming the file and record
    by_rec = {str(Path(info.rec)): info for info in schema.resolve_shards(spec)}
    return _Shards(spec, checks, [by_rec[str(c.rec_path)] for c in checks])


def _resolve_settings(
    ckpt: _Checkpoint, model: str | None, power: float | None, pair_gate: str | None, warnings: _Warnings
) -> _Settings:
    """The model name, power and pair_gate: the caller's, else the checkpoint's, else the defaults."""
    model_name = model or ckpt.model_name
    if model_name is None:
        raise ScoreInputError(
            f"{ckpt.path} is a weights file without a training config, so the architecture is unknown: "
            "pass --model NAME (the open_clip model name, e.g. ViT-B-32 or ALIP-Tiny)"
        )
    if model and ckpt.model_name and model != ckpt.model_name:
        warnings.add(f"--model {model} overrides the checkpoint's model {ckpt.model_name}")
    if ckpt.kind == "weights":
        warnings.add(
            f"{ckpt.path} is a weights file with no EMA state: using the dataset means of the similarities as mu"
        )
    power = float(power if power is not None else ckpt.power if ckpt.power is not None else 2.0)
    pair_gate = pair_gate or ckpt.pair_gate or "official"
    if not power > 0.0:
        raise ScoreInputError(f"power must be > 0, got {power}")
    if pair_gate not in PAIR_GATES:
        raise ScoreInputError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
    return _Settings(model_name, power, pair_gate)


def _summary(
    *,
    records: int,
    shards: _Shards,
    ckpt: _Checkpoint,
    checkpoint_format: str,
    settings: _Settings,
    gated: _Gated,
    with_text: int,
    device: torch.device,
) -> dict[str, Any]:
    """The summary JSON before the truth join, warnings and time (its keys in this order)."""
    w_s = gated.weights[:, 0]
    return {
        "records": records,
        "shards": len(shards.infos),
        "shard_spec": shards.spec,
        "checkpoint": str(ckpt.path),
        "checkpoint_kind": ckpt.kind,
        "checkpoint_format": checkpoint_format,
        "model": settings.model,
        "ema": gated.mu,
        "ema_source": gated.ema_source,
        "dataset_mean": gated.means,
        "power": settings.power,
        "pair_gate": settings.pair_gate,
        "ranking": RANKING,
        "flagged": int((w_s < 1.0).sum()),  # records whose sample weight the LCG lowers
        "flagged_fraction": float((w_s < 1.0).mean()),
        "mean_weight_sample": float(w_s.mean()),
        "records_with_text": with_text,
        "device": str(device),
    }


def score_shards(
    checkpoint: str | Path,
    shards: str | Path | Sequence[str | Path],
    *,
    model: str | None = None,
    truth: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int = 0,
    power: float | None = None,
    pair_gate: str | None = None,
) -> ScoreResult:
    """Score every record of `shards` with `checkpoint`'s model and gates; see the `alip.score` docstring.

    Args:
        checkpoint: an `alip.train` checkpoint (model name, EMA, power and pair_gate come from it) or any
            weights file `alip.load_checkpoint` reads (then `model` is required and mu = dataset means).
        shards: what `alip.data.schema.resolve_shards` accepts (meta JSON, folder, .rec glob, .rec, list).
        model: open_clip model name; overrides the training checkpoint's.
        truth: optional ground truth (JSONL or CSV of key, noisy[, noise]) joined on the sample key.
        device: default cuda if available, else cpu.
        num_workers: data loader processes decoding JPEGs (0: in this process).
        power, pair_gate: override the checkpoint's (defaults 2.0 and "official" when it has none).
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ScoreInputError(f"batch_size must be >= 1, got {batch_size}")
    warnings = _Warnings()
    ckpt = _read_checkpoint(Path(checkpoint), warnings)
    found = _resolve_shards(shards)
    truth_map = read_truth(truth) if truth is not None else None  # fail on a bad truth file before the model runs
    settings = _resolve_settings(ckpt, model, power, pair_gate, warnings)

    dev = _pick_device(device)
    clip, preprocess, fmt = _load_model(settings.model, ckpt.path, dev)
    texts = _shard_texts(found.infos, warnings)
    records = RecordDataset(found.checks, None, train=False)
    keys, sims = _similarities(clip, _Scored(records, preprocess), dev, batch_size, num_workers, progress)
    _require_finite(keys, sims)
    gated = _gate_weights(sims, ckpt.ema, settings.power, settings.pair_gate)

    rows, with_text = _ranked_rows(records, keys, sims, gated.weights, texts, warnings)
    summary = _summary(
        records=len(rows),
        shards=found,
        ckpt=ckpt,
        checkpoint_format=fmt,
        settings=settings,
        gated=gated,
        with_text=with_text,
        device=dev,
    )
    columns = list(BASE_COLUMNS)
    if truth_map is not None:
        no_texts = all(b is None for b in texts.bounds)
        summary.update(_join_truth(rows, truth_map, truth, no_texts=no_texts, warnings=warnings))
        columns += TRUTH_COLUMNS
    summary["warnings"] = list(warnings)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return ScoreResult(rows, summary, columns)
