"""`alip-score`: rank training pairs by how noisy a trained ALIP model's gates find them.

For every record of a set of shards it computes, with the checkpoint's model, the three similarities
the gates read (DESIGN.md section 4):

    s_raw_caption   = cos(raw text, caption)   s_tc, the Language Consistency Gate's input
    s_image_raw     = cos(image, raw text)     s_it, the image-raw-text pair gate's input
    s_image_caption = cos(image, caption)      s_ic, the image-caption pair gate's input

and the gate weights under the checkpoint's EMA state (`alip.gates.gate_weights`, no EMA update).
It writes a CSV of all records, most likely noisy first (ascending s_raw_caption: the order of the
sample weight before its clamp at 1, without the ties the clamp makes), with the original strings
from the shards' texts sidecars, and a summary JSON. Given a ground-truth file of noise flags it
also reports how well the gates detect noise (ROC-AUC, precision at the number of noisy pairs).

Checkpoints: a training checkpoint (`alip.train`) carries the model name, the gates' EMA values,
power and pair_gate. Any other weights file `alip.load_checkpoint` reads (open_clip export,
safetensors, the original release) needs `--model`, and has no EMA state: the dataset means of the
similarities stand in for it (reported as "ema_source": "dataset_mean").
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alip.cli import UserError, add_debug_flag, guarded
from alip.data import schema
from alip.data.loader_config import prepare_shards
from alip.data.torch_loader import RecordDataset, worker_errors
from alip.gates import PAIR_GATES
from alip.model import quiet_random_init

logger = logging.getLogger(__name__)

SIMILARITIES = ("s_raw_caption", "s_image_raw", "s_image_caption")
EMA_NAMES = {"tc": "ema_tc", "it": "ema_it", "ic": "ema_ic"}  # buffer names in alip.gates.ConsistencyGates
BASE_COLUMNS = (
    "rank",
    "record_key",
    "sample_key",
    "weight_sample",
    "weight_raw",
    "weight_caption",
    *SIMILARITIES,
    "raw_text",
    "caption",
)
TRUTH_COLUMNS = ("noisy", "noise")
RANKING = "ascending s_raw_caption (most likely noisy first; ties keep shard order)"
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


class ScoreInputError(UserError, ValueError):
    """A problem with what alip-score was given (a truth or texts file, an option); the message says which."""


# ---------------------------------------------------------------- metrics (pure)


def roc_auc(scores: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC-AUC of `scores` (higher = more likely positive) against boolean `labels`.

    The Mann-Whitney U statistic with average ranks for ties, so a tie between a positive and a
    negative counts one half (as sklearn.metrics.roc_auc_score). Raises ValueError when the labels
    hold only one class or a score is not finite.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes, got {n_pos} positive and {n_neg} negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first occurrence
    ranks = (first + (counts - 1) / 2.0)[inverse.ravel()]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _auc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    try:
        return roc_auc(scores, labels)
    except ValueError:
        return None


# ---------------------------------------------------------------- result


@dataclass
class ScoreResult:
    """Ranked rows (the CSV's columns, most likely noisy first) and the summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    columns: list[str] = field(default_factory=lambda: list(BASE_COLUMNS))

    def write(self, csv_path: str | Path, summary_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the CSV and the summary JSON, each atomically; returns their paths.

        The summary goes to `<csv stem>.summary.json` beside the CSV unless `summary_path` is given.
        """
        csv_path = Path(csv_path)
        summary_path = Path(summary_path) if summary_path is not None else default_summary_path(csv_path)
        self.summary["csv"] = str(csv_path)
        self.summary["summary"] = str(summary_path)
        for path in (csv_path, summary_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, csv_path)
        tmp = summary_path.with_name(summary_path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, summary_path)
        return csv_path, summary_path


def default_summary_path(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.summary.json")


class _Warnings(list):
    """Warnings logged once each and kept for the summary."""

    def add(self, message: str) -> None:
        if message not in self:
            logger.warning(message)
            self.append(message)


# ---------------------------------------------------------------- checkpoint


@dataclass
class _Checkpoint:
    path: Path
    kind: str  # "alip-train" or "weights"
    model_name: str | None
    ema: dict[str, float] | None  # tc/it/ic, None when the checkpoint has no usable EMA state
    power: float | None
    pair_gate: str | None


def _find_ema(loss_state: Any) -> dict[str, float] | None:
    if not isinstance(loss_state, Mapping):
        return None
    ema = {}
    for short, buffer in EMA_NAMES.items():
        # "gates.ema_tc" in AlipLoss.state_dict(); match the suffix so wrapper prefixes do not matter
        found = [v for k, v in loss_state.items() if str(k) == buffer or str(k).endswith("." + buffer)]
        if len(found) != 1:
            return None
        ema[short] = float(torch.as_tensor(found[0]).float().item())
    return ema


def _read_checkpoint(path: Path, warnings: _Warnings) -> _Checkpoint:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state: Any = None
    if path.suffix != ".safetensors":
        from alip.train.checkpoint import load_state

        try:
            state = load_state(path)
        except Exception as e:  # unreadable or unsafe: alip.load_checkpoint will say exactly why
            logger.debug("torch.load(%s) failed (%s); treating it as a weights file", path, e)
    if not (isinstance(state, Mapping) and isinstance(state.get("model"), Mapping)):
        return _Checkpoint(path, "weights", None, None, None, None)
    config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    loss_cfg = config.get("loss") if isinstance(config.get("loss"), Mapping) else {}
    ema = None
    if "loss" not in state:
        warnings.add(f"{path} has no 'loss' state (the gates' EMA values): using the dataset means as mu")
    else:
        ema = _find_ema(state["loss"])
        if ema is None:
            warnings.add(f"{path}: no ema_tc/ema_it/ema_ic in its 'loss' state: using the dataset means as mu")
    if ema is not None and (loss_cfg.get("use_gates") is False or loss_cfg.get("use_caption") is False):
        warnings.add(
            f"{path} was trained without gates (use_gates/use_caption false), so its EMA values were never "
            "updated: using the dataset means as mu"
        )
        ema = None
    if ema is not None and all(v == 1.0 for v in ema.values()):
        warnings.add(f"{path}: the gates' EMA values are still at their initial 1.0 (saved before any step?)")
    power = loss_cfg.get("power")
    pair_gate = loss_cfg.get("pair_gate")
    return _Checkpoint(
        path,
        "alip-train",
        model_cfg.get("name"),
        ema,
        float(power) if power is not None else None,
        str(pair_gate) if pair_gate is not None else None,
    )


# ---------------------------------------------------------------- data


def _texts_path(shard: schema.ShardInfo) -> Path | None:
    if shard.texts:
        return Path(shard.texts)
    beside = Path(shard.rec).with_suffix(".texts.jsonl")  # data2rec's name, for a .rec glob
    return beside if beside.is_file() else None


def _read_texts(path: Path) -> dict[int, dict[str, str]]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = int(entry["key"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ScoreInputError(f"{path}:{lineno}: not a texts sidecar entry ({e})") from None
            out[key] = {
                "sample_key": "" if entry.get("sample_key") is None else str(entry["sample_key"]),
                "raw_text": entry.get("raw_text") or "",
                "caption": entry.get("caption") or "",
            }
    return out


class _Scored(Dataset):
    """The records of a `RecordDataset` with the model's eval transform, their key and position."""

    def __init__(self, records: RecordDataset, preprocess: Any) -> None:
        self.records, self.preprocess = records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, raw, cap, image = self.records.read(i)
        return {
            "image": self.preprocess(image),
            "raw": torch.from_numpy(raw),
            "caption": torch.from_numpy(cap),
            "key": key,
            "index": i,
        }


# ---------------------------------------------------------------- truth


def parse_noisy(value: Any, where: str) -> bool:
    """A truth flag or a CSV cell as a bool: true/false, 1/0, yes/no (case-insensitive)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ScoreInputError(f"{where}: 'noisy' must be a boolean (true/false/1/0), got {value!r}")


def read_truth(path: str | Path) -> dict[str, tuple[bool, str | None]]:
    """Ground truth: sample key -> (noisy, noise kind or None).

    JSONL lines {"key": ..., "noisy": bool, "noise": kind or null, ...} (other fields ignored), or a
    CSV with columns key,noisy[,noise].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    is_csv = path.suffix.lower() == ".csv" or (
        path.suffix.lower() not in (".jsonl", ".json", ".ndjson") and not text.lstrip().startswith("{")
    )
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if is_csv:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"key", "noisy"} - set(reader.fieldnames or [])
        if missing:
            raise ScoreInputError(f"{path}: a truth CSV needs columns key,noisy[,noise]; missing {sorted(missing)}")
        entries = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(entry, Mapping) or "key" not in entry or "noisy" not in entry:
                raise ScoreInputError(
                    f"{path}:{lineno}: truth lines need 'key' and 'noisy', got {line.strip()[:200]!r}"
                )
            entries.append((f"{path}:{lineno}", entry))
    truth: dict[str, tuple[bool, str | None]] = {}
    for where, entry in entries:
        key = str(entry["key"])
        if key in truth:
            raise ScoreInputError(f"{where}: sample key {key!r} appears twice in the truth file")
        noisy = parse_noisy(entry["noisy"], where)
        noise = entry.get("noise")
        noise = None if noise is None or str(noise) == "" or not noisy else str(noise)
        truth[key] = (noisy, noise)
    if not truth:
        raise ScoreInputError(f"{path}: the truth file has no entries")
    return truth


def _truth_summary(rows: list[dict[str, Any]], truth: dict[str, tuple[bool, str | None]]) -> dict[str, Any]:
    """AUCs and precision@#noisy over the ranked rows that have a truth entry (sets rows' noisy/noise)."""
    matched_keys = set()
    for row in rows:
        entry = truth.get(row["sample_key"]) if row["sample_key"] else None
        row["noisy"], row["noise"] = entry if entry is not None else (None, None)
        if entry is not None:
            matched_keys.add(row["sample_key"])
    ranked = [r for r in rows if r["noisy"] is not None]  # already in rank order
    out: dict[str, Any] = {
        "truth_entries": len(truth),
        "truth_matched_records": len(ranked),
        "truth_keys_not_in_shards": len(truth.keys() - matched_keys),
        "records_without_truth": len(rows) - len(ranked),
    }
    if not ranked:
        return out
    y = np.array([r["noisy"] for r in ranked], dtype=bool)
    w_s = np.array([r["weight_sample"] for r in ranked])
    w_t = np.array([r["weight_raw"] for r in ranked])
    s_tc = np.array([r["s_raw_caption"] for r in ranked])
    n_noisy = int(y.sum())
    out.update(
        noisy=n_noisy,
        clean=int(len(y) - n_noisy),
        noise_rate=n_noisy / len(y),
        auc_weight_sample=_auc_or_none(1.0 - w_s, y),
        auc_s_raw_caption=_auc_or_none(-s_tc, y),
        auc_weight_min=_auc_or_none(1.0 - np.minimum(w_s, w_t), y),
        precision_at_noisy=float(y[:n_noisy].mean()) if n_noisy else None,
        flagged_precision=float(y[w_s < 1.0].mean()) if (w_s < 1.0).any() else None,
        flagged_recall=float((w_s[y] < 1.0).mean()) if n_noisy else None,
    )
    kinds = Counter((r["noise"] or "unspecified") for r in ranked if r["noisy"])
    clean = ~y
    by_noise = {}
    for kind, count in sorted(kinds.items()):
        sel = np.array([bool(r["noisy"]) and (r["noise"] or "unspecified") == kind for r in ranked]) | clean
        by_noise[kind] = {"count": count, "auc_weight_sample": _auc_or_none(1.0 - w_s[sel], y[sel])}
    out["by_noise"] = by_noise
    return out


# ---------------------------------------------------------------- scoring


def _pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def _similarities(
    model: torch.nn.Module,
    dataset: _Scored,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(record keys [N], similarities [N, 3] as s_tc, s_it, s_ic in float64), in dataset order."""
    from tqdm import tqdm

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    n = len(dataset)
    keys = np.zeros(n, dtype=np.int64)
    sims = np.full((n, 3), np.nan, dtype=np.float64)
    with tqdm(total=n, unit="rec", desc="alip-score", disable=not progress) as bar, worker_errors():
        for batch in loader:
            b = batch["image"].shape[0]
            image = batch["image"].to(device, non_blocking=True)
            tokens = torch.cat([batch["raw"], batch["caption"]]).to(device, non_blocking=True)
            v = model.encode_image(image, normalize=True).float()
            t, c = model.encode_text(tokens, normalize=True).float().split(b)  # one pass, as BiPathCLIP
            s = torch.stack([(t * c).sum(-1), (v * t).sum(-1), (v * c).sum(-1)], dim=1)
            idx = batch["index"].numpy()
            sims[idx] = s.double().cpu().numpy()
            keys[idx] = batch["key"].numpy()
            bar.update(b)
    return keys, sims


def _shard_texts(shards: list[schema.ShardInfo], warnings: _Warnings) -> list[dict[int, dict[str, str]] | None]:
    """Each shard's texts sidecar by record key; None for a shard without one (warned once)."""
    texts: list[dict[int, dict[str, str]] | None] = []
    for shard in shards:
        path = _texts_path(shard)
        texts.append(_read_texts(path) if path is not None and path.is_file() else None)
    without = [shard.rec for shard, t in zip(shards, texts, strict=True) if t is None]
    if without:
        warnings.add(
            f"{len(without)} of {len(shards)} shards have no texts sidecar (data2rec writes "
            f"<shard>.texts.jsonl beside the .rec), e.g. {without[0]}: their sample keys, raw texts and "
            "captions are left blank"
        )
    return texts


def _ranked_rows(
    records: RecordDataset,
    keys: np.ndarray,
    sims: np.ndarray,
    w: np.ndarray,
    texts: list[dict[int, dict[str, str]] | None],
    warnings: _Warnings,
) -> tuple[list[dict[str, Any]], int]:
    """One CSV row per record with its original strings, most likely noisy first; and how many
    records found their strings."""
    rows = []
    missing_text = with_text = 0
    for i in range(len(records)):
        shard_id = records.shard_of(i)
        entry = texts[shard_id].get(int(keys[i])) if texts[shard_id] is not None else None
        if texts[shard_id] is not None:
            missing_text += entry is None
            with_text += entry is not None
        entry = entry or {"sample_key": "", "raw_text": "", "caption": ""}
        rows.append(
            {
                "rank": 0,
                "record_key": int(keys[i]),
                "sample_key": entry["sample_key"],
                "weight_sample": float(w[i, 0]),
                "weight_raw": float(w[i, 1]),
                "weight_caption": float(w[i, 2]),
                "s_raw_caption": float(sims[i, 0]),
                "s_image_raw": float(sims[i, 1]),
                "s_image_caption": float(sims[i, 2]),
                "raw_text": entry["raw_text"],
                "caption": entry["caption"],
            }
        )
    if missing_text:
        warnings.add(f"{missing_text} records have no entry in their shard's texts sidecar: their strings are blank")
    rows.sort(key=lambda r: r["s_raw_caption"])  # stable: ties keep shard order
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows, with_text


def _join_truth(
    rows: list[dict[str, Any]],
    truth_map: dict[str, tuple[bool, str | None]],
    truth: str | Path,
    *,
    no_texts: bool,
    warnings: _Warnings,
) -> dict[str, Any]:
    """The truth summary (AUCs, counts); a clear error when no record matches the truth file."""
    report = _truth_summary(rows, truth_map)
    if not report["truth_matched_records"]:
        if no_texts:
            why = "the shards have no texts sidecar, so their sample keys are unknown"
        else:
            example = next((r["sample_key"] for r in rows if r["sample_key"]), "")
            why = f"the shards' sample keys look like {example!r}"
        raise ScoreInputError(
            f"no record of the shards matches a key of the truth file {truth} "
            f"({report['truth_entries']} keys, e.g. {next(iter(truth_map))!r}): {why}"
        )
    if report["truth_keys_not_in_shards"] or report["records_without_truth"]:
        warnings.add(
            f"truth join: {report['truth_keys_not_in_shards']} truth keys are not in the shards, "
            f"{report['records_without_truth']} records have no truth entry (both left out of the AUCs)"
        )
    return {"truth": str(truth), **report}


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
    """Score every record of `shards` with `checkpoint`'s model and gates; see the module docstring.

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
    import alip  # lazy: alip.model imports open_clip

    started = time.perf_counter()
    if batch_size < 1:
        raise ScoreInputError(f"batch_size must be >= 1, got {batch_size}")
    warnings = _Warnings()
    ckpt = _read_checkpoint(Path(checkpoint), warnings)
    shard_spec = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else str(shards)
    for spec in shard_spec if isinstance(shard_spec, list) else [shard_spec]:
        if not any(ch in spec for ch in "*?[") and not Path(spec).exists():
            raise FileNotFoundError(f"shards not found: {spec}")
    checks = prepare_shards(shard_spec)  # preflight: a broken shard fails here, naming the file and record
    by_rec = {str(Path(info.rec)): info for info in schema.resolve_shards(shard_spec)}
    shard_infos = [by_rec[str(c.rec_path)] for c in checks]  # the non-empty shards, in reading order
    truth_map = read_truth(truth) if truth is not None else None  # fail on a bad truth file before the model runs

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

    dev = _pick_device(device)
    with quiet_random_init():  # the checkpoint's weights are loaded right after
        clip, _, preprocess = alip.create_model(model_name)
    fmt = alip.load_checkpoint(clip, ckpt.path)
    clip.to(dev).eval()

    texts = _shard_texts(shard_infos, warnings)

    records = RecordDataset(checks, None, train=False)
    keys, sims = _similarities(clip, _Scored(records, preprocess), dev, batch_size, num_workers, progress)
    bad = ~np.isfinite(sims).all(axis=1)
    if bad.any():
        raise ScoreInputError(
            f"the model gave non-finite features for {int(bad.sum())} of {len(sims)} records "
            f"(e.g. record key {int(keys[bad][0])}): is the checkpoint broken?"
        )

    means = {short: float(sims[:, j].mean()) for j, short in enumerate(EMA_NAMES)}
    ema_source = "checkpoint" if ckpt.ema is not None else "dataset_mean"
    mu = ckpt.ema if ckpt.ema is not None else means
    s = torch.from_numpy(sims)
    weights = alip.gate_weights(s[:, 0], s[:, 1], s[:, 2], mu["tc"], mu["it"], mu["ic"], power, pair_gate)
    w = torch.stack([weights.sample, weights.raw, weights.caption], dim=1).numpy()

    rows, with_text = _ranked_rows(records, keys, sims, w, texts, warnings)
    w_s = w[:, 0]
    summary: dict[str, Any] = {
        "records": len(rows),
        "shards": len(shard_infos),
        "shard_spec": shard_spec,
        "checkpoint": str(ckpt.path),
        "checkpoint_kind": ckpt.kind,
        "checkpoint_format": fmt,
        "model": model_name,
        "ema": mu,
        "ema_source": ema_source,
        "dataset_mean": means,
        "power": power,
        "pair_gate": pair_gate,
        "ranking": RANKING,
        "flagged": int((w_s < 1.0).sum()),  # records whose sample weight the LCG lowers
        "flagged_fraction": float((w_s < 1.0).mean()),
        "mean_weight_sample": float(w_s.mean()),
        "records_with_text": with_text,
        "device": str(dev),
    }
    columns = list(BASE_COLUMNS)
    if truth_map is not None:
        summary.update(_join_truth(rows, truth_map, truth, no_texts=all(t is None for t in texts), warnings=warnings))
        columns += TRUTH_COLUMNS
    summary["warnings"] = list(warnings)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return ScoreResult(rows, summary, columns)


# ---------------------------------------------------------------- command line


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_summary(result: ScoreResult, show: int = 10) -> str:
    """A short human-readable table of the summary and the top `show` ranked pairs."""
    s = result.summary
    lines = [
        f"records          {s['records']} in {s['shards']} shard(s)",
        f"checkpoint       {s['checkpoint']} ({s['checkpoint_kind']})",
        f"model            {s['model']}",
        "ema (tc/it/ic)   " + " / ".join(_fmt(s["ema"][k]) for k in EMA_NAMES) + f"   [{s['ema_source']}]",
        f"power, pair_gate {_fmt(s['power'])}, {s['pair_gate']}",
        f"flagged (w_s<1)  {s['flagged']} ({100 * s['flagged_fraction']:.1f}%)",
    ]
    if "truth" in s:
        lines += [
            f"truth            {s['truth_matched_records']} matched, {s['truth_keys_not_in_shards']} truth keys "
            f"not in shards, {s['records_without_truth']} records without truth",
        ]
        if "noisy" in s:
            lines += [
                f"noisy            {s['noisy']} of {s['truth_matched_records']}",
                f"AUC w_sample     {_fmt(s['auc_weight_sample'])}",
                f"AUC s_raw_capt.  {_fmt(s['auc_s_raw_caption'])}",
                f"AUC min(w_s,w_t) {_fmt(s['auc_weight_min'])}",
                f"precision@noisy  {_fmt(s['precision_at_noisy'])}",
            ]
            lines += [
                f"  {kind:14s} n={v['count']:<6d} AUC w_sample {_fmt(v['auc_weight_sample'])}"
                for kind, v in s["by_noise"].items()
            ]
    if show > 0 and result.rows:
        lines.append(f"most likely noisy (top {min(show, len(result.rows))}):")
        for r in result.rows[:show]:
            mark = "" if r.get("noisy") is None else (" [noisy]" if r["noisy"] else " [clean]")
            raw = r["raw_text"] if len(r["raw_text"]) <= 40 else r["raw_text"][:37] + "..."
            cap = r["caption"] if len(r["caption"]) <= 40 else r["caption"][:37] + "..."
            lines.append(
                f"  {r['rank']:>5d} key={r['sample_key'] or r['record_key']} w_s={r['weight_sample']:.3f} "
                f"s_tc={r['s_raw_caption']:.3f} raw={raw!r} caption={cap!r}{mark}"
            )
    return "\n".join(lines)


EPILOG = """\
outputs:
  CSV (--out): one row per record, most likely noisy first (ascending s_raw_caption), with columns
    rank, record_key, sample_key, weight_sample, weight_raw, weight_caption, s_raw_caption,
    s_image_raw, s_image_caption, raw_text, caption [, noisy, noise with --truth]
  summary JSON (--summary, default <out stem>.summary.json): counts, model, EMA values and their
    source, power, pair_gate; with --truth the ROC-AUCs of the gate weights as noise detectors
    (auc_weight_sample, auc_s_raw_caption, auc_weight_min, per noise kind) and precision_at_noisy.

examples:
  alip-score --checkpoint runs/yfcc/checkpoints/step-00100000.pt --shards /data/yfcc15m_rec/ --out yfcc_scores.csv
  alip-score --checkpoint final.safetensors --model ALIP-Tiny --shards demo/shards/train.meta.json \\
      --truth demo/data/train_truth.jsonl --out demo_scores.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alip-score",
        description=(
            "Score training pairs with a trained ALIP model's gates and rank them, most likely noisy first. "
            "Computes per record s_raw_caption = cos(raw text, caption) (the Language Consistency Gate's "
            "input), s_image_raw and s_image_caption (the pair gates' inputs) and the gate weights under the "
            "checkpoint's EMA state; optionally measures them against ground-truth noise flags."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="alip.train checkpoint (.pt), or a weights file with --model")
    p.add_argument(
        "--shards", required=True, nargs="+", help="shard meta JSON, folder holding one, .rec glob or .rec file(s)"
    )
    p.add_argument("--model", default=None, help="open_clip model name; required for a weights file")
    p.add_argument("--truth", default=None, help="ground truth JSONL {key, noisy, noise} or CSV key,noisy[,noise]")
    p.add_argument("--out", default="scores.csv", help="ranked CSV (default: scores.csv)")
    p.add_argument("--summary", default=None, help="summary JSON (default: <out stem>.summary.json beside --out)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="JPEG decoding processes (0: in this process)")
    p.add_argument("--power", type=float, default=None, help="override the checkpoint's gate power (default 2)")
    p.add_argument("--pair-gate", choices=["official", "paper"], default=None, help="override the checkpoint's")
    p.add_argument("--show", type=int, default=10, help="print this many top-ranked pairs (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line; returns the summary. User errors raise (`cli` turns them into one line)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    result = score_shards(
        args.checkpoint,
        args.shards if len(args.shards) > 1 else args.shards[0],
        model=args.model,
        truth=args.truth,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        num_workers=args.workers,
        power=args.power,
        pair_gate=args.pair_gate,
    )
    csv_path, summary_path = result.write(args.out, args.summary)
    print(format_summary(result, show=args.show))
    print(f"wrote {csv_path} and {summary_path}")
    return result.summary


@guarded
def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point (`alip-score`): a user error is one `error: ...` line and exit status 2."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
