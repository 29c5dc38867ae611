"""The demo's report folder: PNG plots and a markdown summary of the three demo runs.

`make demo` trains the same tiny model three ways (CLIP on the raw text, ALIP without gates, full
ALIP), evaluates each, and scores every training pair with the ALIP checkpoint (`alip score`).
`write_report` turns those artefacts into:

- `training_curves.png`: training loss per step (raw + moving average) and the in-training eval
  metrics per step, one colour per run;
- `gate_weights.png` (only with a scores CSV): how well the gate weights and the raw-text/caption
  similarity separate the clean pairs from the noisy ones, overall and per noise kind, with the
  ROC-AUCs in the panel titles;
- `results.png`: the final metrics as a grouped bar chart;
- `report.md`: the metrics table, the AUCs and links to the PNGs.

Inputs:

- `runs`: run name -> run folder with `losses.jsonl` (one JSON per optimizer step: `step`, `loss`,
  ...; NaN losses are skipped) and optionally `eval.jsonl` (one JSON per evaluation: `step` and
  `eval/<dataset>/<metric>` keys). Insertion order fixes each run's colour.
- `summary`: run name -> {metric name -> value}, the final metrics.
- `scores`: the CSV of `alip score` (columns `weight_sample`, `s_raw_caption`, `noisy`, `noise`, ...).

The figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state), so
the same inputs give the same files. `format_table` renders the summary as a plain-text table for
the console; it needs no matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alip.score import parse_noisy, roc_auc

__all__ = ["write_report", "format_table", "read_scores", "GateScores"]

DPI = 110
# A fixed colour per run position (matplotlib's tab10 order).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
CLEAN_COLOUR = "#2ca02c"
NOISY_COLOUR = "#d62728"
# The demo dataset's noise kinds in their usual order (alip.demo.data.NOISE_KINDS); others are appended sorted.
NOISE_ORDER = ("swap", "attribute", "hashtags", "filename", "empty")
MAX_EVAL_PANELS = 3
LOSS_NOTE = "the gated loss is weighted, so loss values are not comparable across objectives: compare the eval metrics"
SCORE_COLUMNS = ("weight_sample", "s_raw_caption", "noisy", "noise")
_RC = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.titlesize": 10.5,
}


# ----------------------------------------------------------------------------------------------
# small helpers (no matplotlib)


def _auc(labels: Sequence[Any], scores: Sequence[float]) -> float:
    """`alip.score.roc_auc` with the labels first, NaN (not an error) when either class is empty:
    a report of a run without noisy pairs still draws."""
    y = np.asarray(labels).astype(bool).ravel()
    if y.all() or not y.any():
        return float("nan")
    return roc_auc(scores, y)


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points; the first points average what there is so far."""
    if values.size == 0:
        return values
    window = max(1, min(int(window), values.size))
    csum = np.cumsum(np.concatenate(([0.0], values)))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; blank lines are skipped, a bad line names its place."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _fmt(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _fmt_auc(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def _check_summary(summary: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[str]]:
    """Run names and metric names (first-seen order) of a non-empty summary."""
    if not summary:
        raise ValueError("summary is empty: need {run name: {metric name: value}} for at least one run")
    metrics: list[str] = []
    for run, values in summary.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"summary[{run!r}] must be a mapping of metric name -> value, got {type(values).__name__}")
        for name in values:
            if name not in metrics:
                metrics.append(name)
    if not metrics:
        raise ValueError("summary has no metrics: every run's mapping is empty")
    return list(summary), metrics


def format_table(summary: Mapping[str, Mapping[str, float]], decimals: int = 1) -> str:
    """The summary as an aligned plain-text table: runs as rows, metrics as columns, `decimals` decimals."""
    runs, metrics = _check_summary(summary)
    header = ["run", *metrics]
    rows = [[run, *(_fmt(_finite(summary[run].get(m)), decimals) for m in metrics)] for run in runs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _markdown_table(summary: Mapping[str, Mapping[str, float]], decimals: int = 1) -> str:
    runs, metrics = _check_summary(summary)
    out = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for run in runs:
        cells = [_fmt(_finite(summary[run].get(m)), decimals) for m in metrics]
        out.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# inputs


class _Run:
    """One run's loss and eval curves."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        folder = Path(folder)
        losses = folder / "losses.jsonl"
        if not losses.is_file():
            raise FileNotFoundError(f"run {name!r}: no losses file at {losses}")
        steps, values = [], []
        for row in _read_jsonl(losses):
            step, loss = _finite(row.get("step")), _finite(row.get("loss"))
            if step is not None and loss is not None:
                steps.append(step)
                values.append(loss)
        self.steps = np.asarray(steps, dtype=np.float64)
        self.loss = np.asarray(values, dtype=np.float64)
        # eval key -> (steps, values)
        self.evals: dict[str, tuple[list[float], list[float]]] = {}
        eval_path = folder / "eval.jsonl"
        if eval_path.is_file():
            for row in _read_jsonl(eval_path):
                step = _finite(row.get("step"))
                if step is None:
                    continue
                for key, value in row.items():
                    value = _finite(value)
                    if key.startswith("eval/") and value is not None:
                        xs, ys = self.evals.setdefault(key, ([], []))
                        xs.append(step)
                        ys.append(value)


def _eval_priority(key: str) -> int:
    """Which eval metrics get the (at most 3) panels: top-1 first, then R@1, then the rest."""
    metric = key.rsplit("/", 1)[-1].lower()
    if metric in ("top1", "acc1", "top-1"):
        return 0
    if metric.endswith("r@1"):
        return 1
    return 2


class GateScores:
    """The columns of an `alip score` CSV that the report uses (rows with non-finite numbers are dropped)."""

    def __init__(self, weight: np.ndarray, s_raw_caption: np.ndarray, noisy: np.ndarray, kinds: list[str]):
        self.weight = weight
        self.s_raw_caption = s_raw_caption
        self.noisy = noisy
        self.kinds = kinds  # "clean" for clean rows, the noise kind (or "noisy" when unnamed) otherwise

    def __len__(self) -> int:
        return int(self.weight.size)

    @property
    def auc_weight(self) -> float:
        """P(a clean pair's gate weight > a noisy pair's), ties 1/2."""
        return _auc(~self.noisy, self.weight)

    @property
    def auc_s_raw_caption(self) -> float:
        """P(a clean pair's raw-text/caption similarity > a noisy pair's), ties 1/2."""
        return _auc(~self.noisy, self.s_raw_caption)

    def kind_order(self) -> list[str]:
        """The noisy categories present: the demo's noise kinds in order, then any others sorted."""
        present = {k for k, n in zip(self.kinds, self.noisy, strict=True) if n}
        return [k for k in NOISE_ORDER if k in present] + sorted(present - set(NOISE_ORDER))

    def per_kind(self) -> list[dict[str, Any]]:
        """Per noise kind: count, mean weight and the AUCs of clean vs that kind."""
        kinds = np.asarray(self.kinds, dtype=object)
        clean = ~self.noisy
        out = []
        for kind in self.kind_order():
            sel = self.noisy & (kinds == kind)
            both = clean | sel
            out.append(
                {
                    "kind": kind,
                    "n": int(sel.sum()),
                    "mean_weight": float(self.weight[sel].mean()),
                    "auc_weight": _auc(clean[both], self.weight[both]),
                    "auc_s_raw_caption": _auc(clean[both], self.s_raw_caption[both]),
                }
            )
        return out


def read_scores(path: str | Path) -> GateScores:
    """Read the `alip score` CSV; a missing file or missing columns raise an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scores CSV at {path}")
    weight, sim, noisy, kinds = [], [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in SCORE_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: scores CSV lacks column(s) {', '.join(missing)} (has: {', '.join(columns)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                w, s = float(row["weight_sample"]), float(row["s_raw_caption"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: weight_sample/s_raw_caption must be numbers, "
                    f"got {row['weight_sample']!r}, {row['s_raw_caption']!r}"
                ) from None
            is_noisy = parse_noisy(row["noisy"] or "", where)  # an empty cell: no truth, counted clean
            if not (math.isfinite(w) and math.isfinite(s)):
                continue
            weight.append(w)
            sim.append(s)
            noisy.append(is_noisy)
            kinds.append(((row["noise"] or "").strip() or "noisy") if is_noisy else "clean")
    if not weight:
        raise ValueError(f"{path}: scores CSV has no rows with finite weight_sample and s_raw_caption")
    return GateScores(
        np.asarray(weight, dtype=np.float64), np.asarray(sim, dtype=np.float64), np.asarray(noisy, dtype=bool), kinds
    )


# ----------------------------------------------------------------------------------------------
# figures


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo report needs matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig, path: Path) -> Path:
    # No "Software" metadata: the bytes then depend on the inputs only, not on the matplotlib version.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    fig.clear()
    return path


def _plot_training_curves(path: Path, runs: list[_Run], colours: Mapping[str, str], title: str) -> Path:
    keys: list[str] = []
    for run in runs:
        for key in run.evals:
            if key not in keys:
                keys.append(key)
    keys = sorted(keys, key=_eval_priority)[:MAX_EVAL_PANELS]  # stable: first-seen order within a priority
    n_panels = 1 + len(keys)
    fig = _figure(4.3 * n_panels, 3.7)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]

    ax = axes[0]
    for run in runs:
        colour = colours[run.name]
        if run.loss.size == 0:
            ax.plot([], [], color=colour, label=f"{run.name} (no finite loss)")
            continue
        window = max(1, round(run.loss.size / 20))
        ax.plot(run.steps, run.loss, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(run.steps, _moving_average(run.loss, window), color=colour, linewidth=1.8, label=run.name)
    ax.set_title("training loss (light: per step, dark: moving average)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")

    for ax, key in zip(axes[1:], keys, strict=True):
        for run in runs:
            if key in run.evals:
                xs, ys = run.evals[key]
                ax.plot(xs, ys, color=colours[run.name], marker="o", markersize=3.5, linewidth=1.5, label=run.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(key.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    if not keys:
        axes[0].text(0.99, 0.01, "no in-training eval", transform=axes[0].transAxes, ha="right", va="bottom", alpha=0.6)

    fig.suptitle(f"{title}: training curves\n{LOSS_NOTE}")
    fig.tight_layout()
    return _save(fig, path)


def _plot_gate_weights(path: Path, scores: GateScores, title: str) -> Path:
    fig = _figure(14.0, 4.0)
    ax_w, ax_s, ax_k = fig.subplots(1, 3)
    clean, noisy = ~scores.noisy, scores.noisy

    # 1. gate weights, clean vs noisy, on shared bins over [0, max]
    top = float(scores.weight.max())
    bins = np.linspace(0.0, top if top > 0 else 1.0, 31)
    for sel, label, colour in ((clean, "clean", CLEAN_COLOUR), (noisy, "noisy", NOISY_COLOUR)):
        if sel.any():
            ax_w.hist(scores.weight[sel], bins=bins, alpha=0.55, color=colour, label=f"{label} (n={int(sel.sum())})")
    ax_w.set_title(f"gate weight per pair: ROC-AUC clean > noisy = {_fmt_auc(scores.auc_weight)}")
    ax_w.set_xlabel("weight_sample")
    ax_w.set_ylabel("pairs")
    ax_w.legend(loc="best")

    # 2. raw-text/caption similarity, clean vs noisy
    lo, hi = float(scores.s_raw_caption.min()), float(scores.s_raw_caption.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    for sel, label, colour in ((clean, "clean", CLEAN_COLOUR), (noisy, "noisy", NOISY_COLOUR)):
        if sel.any():
            ax_s.hist(scores.s_raw_caption[sel], bins=bins, alpha=0.55, color=colour, label=label)
    ax_s.set_title(f"raw text vs caption similarity: ROC-AUC = {_fmt_auc(scores.auc_s_raw_caption)}")
    ax_s.set_xlabel("s_raw_caption")
    ax_s.set_ylabel("pairs")
    ax_s.legend(loc="best")

    # 3. similarity per noise kind: box plot with the points on top (fixed jitter)
    kinds = np.asarray(scores.kinds, dtype=object)
    per_kind = {k["kind"]: k for k in scores.per_kind()}
    categories = (["clean"] if clean.any() else []) + scores.kind_order()
    data = [scores.s_raw_caption[kinds == c] for c in categories]
    labels = []
    for c, d in zip(categories, data, strict=True):
        auc = f"\nAUC {_fmt_auc(per_kind[c]['auc_s_raw_caption'])}" if c in per_kind else ""
        labels.append(f"{c}\nn={d.size}{auc}")
    positions = np.arange(1, len(categories) + 1)
    ax_k.boxplot(data, positions=positions, widths=0.55, showfliers=False)
    rng = np.random.default_rng(0)
    for pos, c, d in zip(positions, categories, data, strict=True):
        jitter = rng.uniform(-0.18, 0.18, size=d.size)
        ax_k.scatter(pos + jitter, d, s=9, alpha=0.6, color=CLEAN_COLOUR if c == "clean" else NOISY_COLOUR)
    ax_k.set_xticks(positions, labels)
    ax_k.set_title("s_raw_caption per noise kind (AUC: clean vs that kind)")
    ax_k.set_ylabel("s_raw_caption")
    for ax in (ax_w, ax_s, ax_k):
        ax.grid(alpha=0.3)

    fig.suptitle(f"{title}: gate weights of the ALIP checkpoint on the training pairs ({len(scores)} pairs)")
    fig.tight_layout()
    return _save(fig, path)


def _plot_results(path: Path, summary: Mapping[str, Mapping[str, float]], colours: Mapping[str, str], title: str):
    runs, metrics = _check_summary(summary)
    width = 0.8 / len(runs)
    fig = _figure(min(14.0, max(5.5, 1.1 + len(metrics) * (0.55 + 0.5 * len(runs)))), 4.0)
    ax = fig.subplots()
    x = np.arange(len(metrics), dtype=np.float64)
    top = 0.0
    for i, run in enumerate(runs):
        xs, ys = [], []
        for j, metric in enumerate(metrics):
            value = _finite(summary[run].get(metric))
            if value is not None:
                xs.append(x[j] + (i - (len(runs) - 1) / 2) * width)
                ys.append(value)
        if not xs:
            continue
        bars = ax.bar(xs, ys, width=width * 0.95, color=colours[run], label=run)
        ax.bar_label(bars, labels=[_fmt(v) for v in ys], padding=2, fontsize=7.5)
        top = max(top, *ys)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("value")
    if top > 0:
        ax.set_ylim(top=top * 1.3)  # headroom: the legend sits above the tallest bar, not on its label
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(runs))
    ax.set_title(f"{title}: final metrics")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# report


def _report_markdown(
    title: str,
    summary: Mapping[str, Mapping[str, float]],
    files: Mapping[str, Path],
    scores: GateScores | None,
) -> str:
    def image(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({files[name].name})", ""] if name in files else []

    lines = [f"# {title}", "", "## Final metrics", "", _markdown_table(summary), ""]
    lines += image("results", "final metrics")
    lines += ["## Training curves", "", f"Note: {LOSS_NOTE}.", ""]
    lines += image("training_curves", "training curves")
    if scores is not None:
        n_noisy = int(scores.noisy.sum())
        lines += [
            "## Gate weights",
            "",
            f"{len(scores)} training pairs scored with the ALIP checkpoint, {n_noisy} of them noisy.",
            "ROC-AUC = the chance that a clean pair scores higher than a noisy one (ties count 1/2).",
            "",
            f"- gate weight (weight_sample) AUC: {_fmt_auc(scores.auc_weight)}",
            f"- raw text vs caption similarity (s_raw_caption) AUC: {_fmt_auc(scores.auc_s_raw_caption)}",
            "",
        ]
        per_kind = scores.per_kind()
        if per_kind:
            lines += [
                "| noise kind | pairs | mean weight | AUC weight | AUC s_raw_caption |",
                "|---|---:|---:|---:|---:|",
            ]
            clean = ~scores.noisy
            if clean.any():
                mean_clean = float(scores.weight[clean].mean())
                lines.append(f"| clean | {int(clean.sum())} | {mean_clean:.3f} | | |")
            for k in per_kind:
                lines.append(
                    f"| {k['kind']} | {k['n']} | {k['mean_weight']:.3f} | {_fmt_auc(k['auc_weight'])} | "
                    f"{_fmt_auc(k['auc_s_raw_caption'])} |"
                )
            lines.append("")
        lines += image("gate_weights", "gate weights")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    runs: Mapping[str, str | Path],
    summary: Mapping[str, Mapping[str, float]],
    scores: str | Path | None = None,
    title: str = "ALIP demo",
) -> dict[str, Path]:
    """Write the report folder; returns {"training_curves", "results", "gate_weights" (with scores), "report"} -> path.

    All inputs are read and checked before anything is written: a run without `losses.jsonl`
    raises FileNotFoundError naming the path, an empty summary ValueError, a scores CSV without
    the needed columns ValueError naming them.
    """
    if not runs:
        raise ValueError("runs is empty: need {run name: run folder} for at least one run")
    _check_summary(summary)
    loaded = [_Run(name, Path(folder)) for name, folder in runs.items()]
    gate_scores = read_scores(scores) if scores is not None else None

    names = list(runs) + [name for name in summary if name not in runs]
    colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo report needs matplotlib: pip install matplotlib") from e
    with matplotlib.rc_context(_RC):
        files["training_curves"] = _plot_training_curves(out / "training_curves.png", loaded, colours, title)
        if gate_scores is not None:
            files["gate_weights"] = _plot_gate_weights(out / "gate_weights.png", gate_scores, title)
        files["results"] = _plot_results(out / "results.png", summary, colours, title)
    report = out / "report.md"
    report.write_text(_report_markdown(title, summary, files, gate_scores), encoding="utf-8")
    files["report"] = report
    return files
