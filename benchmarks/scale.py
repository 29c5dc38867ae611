#!/usr/bin/env python
"""How the per-dataset stages grow with the dataset: time and peak RSS at 10k, 100k and 1M records,
a log-log fit, and the extrapolation to 15M (YFCC15M) and 100M.

Stages (each stage and size runs in its own process, twice, the faster run kept; peak RSS is that
process's VmHWM, of which "base" is what it held before the stage began: the interpreter and its
imports). The time is extrapolated along the log-log slope between the two largest sizes (at least
1: every stage touches every record or shard); the memory the stage adds, linearly.
  - index:   data2rec's index_inputs on a TSV manifest (key, image path, text, caption columns);
  - join:    index_inputs with the captions from a JSONL caption sidecar joined by key;
  - plan:    index, then stat every image, shuffle and cut into shards, the plan fingerprint and
             the per-shard stamps a rerun compares (alip.data.ingest.convert: everything before writing);
  - index_parquet, plan_parquet: the same two on the hub's parquet form, as the published YFCC15M
             release holds it: the images embedded in a `datasets` Image column (struct<bytes, path>),
             the raw text and caption as CLIP token ids (list<int32>), files of 10k rows in row
             groups of 100 (what `datasets` writes for image data); no key column (keys are row
             numbers). Only the footers are read: the images and ids stay in the files until a
             worker writes their shard;
  - start:   the loaders' default start-up check (alip.data.loaders.preflight.prepare_shards) on
             shards of tiny records, page cache warm ("nothing changed");
  - start_cold: the same after evicting the shards from the page cache (posix_fadvise DONTNEED);
  - full_check: the opt-in full check (every record's frame header), page cache warm;
  - dali_index: the DALI loader's combined index over all shards (alip.data.loaders.dali.combined_index);
  - torch_index: the torch loader's record table (alip.data.loaders.torch_loader.RecordDataset);
  - dali_start: a whole DaliLoader construction on the CPU (rank 0 of 8): the check, the combined
             index, DALI's pipeline build (its reader parses the index) and its first prefetch;
  - score:   `alip score`'s ranking: read the texts sidecars, gate weights, rank, write the CSV
             (the model's forward pass is not included: it is per record and runs on the GPU);
  - merge:   the caption tool's merge of 8 part files into the final sidecar (alip.caption.sidecar).
  - caption_start: the caption tool's start on a rank (alip.caption.run.start_work; no model): index the
             manifest, read the entries of an interrupted run (4 of the 8 part files: half the samples),
             select the samples without an entry and take rank 0 of 8's share. `held` is what the
             process still holds after it (RSS over base): what a rank keeps while it captions.
  - filter:  `alip-filter --keep-fraction 0.7` from a scores CSV: read it, match it to the shards (and
             their texts sidecars' sample keys), copy the kept records, write the dropped report and meta.
             The records are tiny, so the copy here is cheap: on real data it moves the kept bytes.

The data2rec and loader-index stages also record their own CPU time (`cpu_seconds`; `index_cpu_s`
for plan's index): on a shared machine the wall time includes waiting for a core.

Inputs are synthetic: one tiny JPEG reused for every record, texts of YFCC-like length, image paths
that do not exist (stat fails fast, as it would not on a real filesystem). The parquet stages' files
are made only when one of them runs (in SIZE/parquet/), the others' inputs only when one of those does.

    .venv/bin/python benchmarks/scale.py                       # 10k, 100k, 1M; table on stdout
    .venv/bin/python benchmarks/scale.py --sizes 10000 100000 --stages start score --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "index",
    "join",
    "plan",
    "index_parquet",
    "plan_parquet",
    "start",
    "start_cold",
    "full_check",
    "dali_index",
    "torch_index",
    "dali_start",
    "score",
    "merge",
    "caption_start",
    "filter",
)
SHARDS = 100  # shards per dataset, whatever its size (YFCC15M at 10k records per shard has 1500)
PARQUET_STAGES = ("index_parquet", "plan_parquet")
PARQUET_ROWS = 10_000  # rows per parquet file: the published YFCC15M has 1,507 files of about 10k rows
ROW_GROUP = 100  # rows per row group: what `datasets` writes for image data
TARGETS = (15_000_000, 100_000_000)


def _text(i: int, words: int) -> str:
    return " ".join(f"w{(i * 7 + j * 13) % 9973}" for j in range(words))


# ---------------------------------------------------------------- inputs (made once per size)


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_parquet_inputs(n: int, folder: Path) -> None:
    """Parquet files in the hub's form: {bytes, path} image structs and list<int32> token-id texts."""
    if (folder / "ready").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    def ids(i: int, words: int) -> list[int]:  # start, YFCC-like length of valid ids, end; unpadded as stored
        return [49406, *((i * 7 + j * 13) % 49000 + 256 for j in range(words)), 49407]

    raws, caps = [ids(i, 16) for i in range(97)], [ids(i + 1, 12) for i in range(97)]  # 97 distinct rows, cycled
    jpeg = _tiny_jpeg()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for k, first in enumerate(range(0, n, PARQUET_ROWS)):
        rows = range(first, min(first + PARQUET_ROWS, n))
        images = pa.StructArray.from_arrays(
            [pa.array([jpeg] * len(rows), pa.binary()), pa.array([f"{i:09d}.jpg" for i in rows])],
            fields=list(image_type),
        )
        raw = pa.array([raws[i % 97] for i in rows], pa.list_(pa.int32()))
        cap = pa.array([caps[i % 97] for i in rows], pa.list_(pa.int32()))
        table = pa.table({"image": images, "raw": raw, "caption": cap})
        pq.write_table(table, folder / f"train-{k:05d}.parquet", row_group_size=ROW_GROUP, use_dictionary=False)
    (folder / "ready").write_text("ok")


def make_inputs(n: int, folder: Path) -> None:
    """Manifest + caption sidecar + shards (with texts sidecars and meta JSON) + caption parts."""
    if (folder / "ready").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    from alip.data.format import schema
    from alip.data.format.recordio import RecordIOWriter

    with open(folder / "manifest.tsv", "w", encoding="utf-8") as m, open(folder / "nocap.tsv", "w") as nc:
        m.write("key\timage\ttext\tcaption\n")
        nc.write("key\timage\ttext\n")
        for i in range(n):
            path, raw, cap = f"images/{i // 10000:05d}/{i:09d}.jpg", _text(i, 12), _text(i + 1, 10)
            m.write(f"k{i}\t{path}\t{raw}\t{cap}\n")
            nc.write(f"k{i}\t{path}\t{raw}\n")
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {"captioner": {"model": "synthetic"}}}) + "\n")
        for i in range(n):
            f.write(json.dumps({"key": f"k{i}", "caption": _text(i + 1, 10)}) + "\n")
    parts = 8
    handles = [open(folder / f"captions.out.jsonl.part{r:05d}.jsonl", "w", encoding="utf-8") for r in range(parts)]
    for h in handles:
        h.write(json.dumps({"meta": {"captioner": {"model": "synthetic"}}}) + "\n")
    for i in range(n):
        handles[i % parts].write(json.dumps({"key": f"k{i}", "path": f"{i:09d}.jpg", "caption": _text(i, 10)}) + "\n")
    for h in handles:
        h.close()

    jpeg = _tiny_jpeg()
    raw = np.zeros(77, np.int64)
    raw[:4] = [49406, 320, 1125, 49407]
    shards = []
    per = math.ceil(n / SHARDS)
    for k, first in enumerate(range(0, n, per)):
        stem = schema.shard_stem("train", k)
        with (
            RecordIOWriter(folder / f"{stem}.rec", folder / f"{stem}.idx") as w,
            open(folder / f"{stem}.texts.jsonl", "w", encoding="utf-8") as t,
        ):
            for key in range(first, min(first + per, n)):
                w.write(key, schema.make_record(key, jpeg, raw, raw))
                entry = {"key": key, "sample_key": f"k{key}", "raw_text": _text(key, 12), "caption": _text(key, 10)}
                t.write(json.dumps(entry) + "\n")
            count, nbytes = w.count, w.bytes_written
        shards.append(schema.ShardInfo(f"{stem}.rec", f"{stem}.idx", count, nbytes, None, f"{stem}.texts.jsonl"))
    schema.write_meta(folder / "train.meta.json", schema.DatasetMeta(shards=shards, tokenizer={"model": "synthetic"}))
    (folder / "ready").write_text("ok")


# ---------------------------------------------------------------- stages (run in a child process)


def _opts(folder: Path, **kw):
    from alip.data.ingest.convert import ConvertOptions

    return ConvertOptions(out_dir=folder / "out", progress=False, workers=1, **kw)


def stage(name: str, n: int, folder: Path) -> None:
    """Run one stage; the timed part is between the two marks (`base` RSS and `seconds`)."""
    mark: dict = {}
    runner = next((run for names, run in RUNNERS if name in names), None)
    if runner is None:
        raise ValueError(name)
    runner(name, n, folder, mark)
    mark["peak_rss"] = _peak_rss()
    print(json.dumps(mark))


def _data2rec_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """data2rec's index (with a caption column or a caption sidecar join) and planning."""
    from alip.data.ingest import convert
    from alip.data.ingest.sources import Columns

    if name == "join":
        opts = _opts(folder, columns=Columns(key="key"), captions=folder / "captions.jsonl")
        inputs = [folder / "nocap.tsv"]
    elif name in PARQUET_STAGES:
        import pyarrow.parquet  # noqa: F401  imported before the clock starts: the import is not the index's cost

        opts = _opts(folder, columns=Columns(image="image", text="raw", caption="caption"))
        inputs = sorted((folder / "parquet").glob("train-*.parquet"))
    else:
        opts = _opts(folder, columns=Columns(key="key", caption="caption"))
        inputs = [folder / "manifest.tsv"]
    mark["base"] = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    samples, skips = convert.index_inputs(inputs, opts)
    if name in ("plan", "plan_parquet"):
        mark["index_s"], mark["index_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        convert.stat_images(samples)
        tasks = convert.plan_shards(samples, opts)
        convert.plan_fingerprint(tasks, opts)
        for task in tasks:
            convert.shard_stamp(task)
    mark["seconds"] = time.perf_counter() - t0
    mark["cpu_seconds"] = time.process_time() - c0  # its own CPU time: on a shared machine the wall time waits
    assert len(samples) == n, (len(samples), len(skips))


def _start_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """The loaders' start-up check: quick (warm or cold page cache) or full."""
    from alip.data.loaders.preflight import prepare_shards

    meta = folder / "train.meta.json"
    if name == "start_cold":
        _evict(folder)
    mark["base"] = _rss()
    t0 = time.perf_counter()
    checks = prepare_shards(meta, full=name == "full_check")
    mark["seconds"] = time.perf_counter() - t0
    assert sum(c.num_records for c in checks) == n


def _index_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """The loaders' record index: DALI's combined .idx, or the torch loader's record table."""
    from alip.data.loaders.preflight import prepare_shards

    if name == "dali_index":  # imported before the clock starts: the import is not the index's cost
        from alip.data.loaders.dali import combined_index
    else:
        from alip.data.loaders.torch_loader import RecordDataset
    checks = prepare_shards(folder / "train.meta.json")
    mark["base"] = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "dali_index":
        with tempfile.TemporaryDirectory() as tmp:
            combined_index(checks, Path(tmp) / "combined.idx")
            mark["seconds"], mark["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    else:
        assert len(RecordDataset(checks, None, train=False)) == n
        mark["seconds"], mark["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0


def _dali_start_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """A whole DaliLoader construction on the CPU, as rank 0 of 8."""
    from alip.data.loaders.config import LoaderConfig
    from alip.data.loaders.dali import DaliLoader

    config = LoaderConfig(batch_size=256, image_size=8, num_threads=1, num_workers=0)
    mark["base"] = _rss()
    t0 = time.perf_counter()
    loader = DaliLoader(folder / "train.meta.json", config, train=True, rank=0, world_size=8, device="cpu")
    mark["seconds"] = time.perf_counter() - t0
    loader.close()


def _merge_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """The caption tool's merge of its part files into one sidecar."""
    import shutil

    from alip.caption.sidecar import merge

    work = folder / "merge"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for part in folder.glob("captions.out.jsonl.part*.jsonl"):
        shutil.copy(part, work / part.name)
    expected = [(f"k{i}", f"{i:09d}.jpg") for i in range(n)]
    mark["base"] = _rss()
    t0 = time.perf_counter()
    report = merge(work / "captions.out.jsonl", expected, {"captioner": {"model": "synthetic"}})
    mark["seconds"] = time.perf_counter() - t0
    assert report.num_samples == n
    shutil.rmtree(work)


def _caption_start(inputs: list[Path], opts, settings: dict, rank: int, world: int) -> tuple[tuple, object]:
    """The start of alip.caption.run.caption_inputs: (samples, entries already there, this rank's
    share), and what caption_inputs keeps of it while the rank captions."""
    from alip.caption.run import start_work

    work = start_work(inputs, opts, settings, rank, world)
    return (len(work.samples), work.already, len(work.mine)), work


def _caption_start_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    """The caption tool's start on rank 0 of 8, with half the samples captioned by an interrupted run."""
    import gc
    import shutil

    from alip.caption.run import CaptionOptions  # imports torch: before the clock starts

    work = folder / "caption_start"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    parts = sorted(folder.glob("captions.out.jsonl.part*.jsonl"))
    for part in parts[: len(parts) // 2]:  # rank r of 8 wrote the keys k{i} with i % 8 == r
        shutil.copy(part, work / part.name)
    opts = CaptionOptions(output=work / "captions.out.jsonl", key_col="key", workers=0, progress=False)
    mark["base"] = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    got, kept = _caption_start([folder / "nocap.tsv"], opts, {"model": "synthetic"}, 0, 8)
    mark["seconds"], mark["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    mark["held"] = _rss() - mark["base"]  # the index and the share, kept while the rank captions
    already = sum(1 for i in range(n) if i % 8 < 4)
    assert got == (n, already, math.ceil((n - already) / 8)), got
    del kept
    shutil.rmtree(work)


def _score(n: int, folder: Path, mark: dict) -> None:
    import torch

    import alip
    from alip.data.format import schema
    from alip.score import ranking, signals

    infos = schema.resolve_shards(folder / "train.meta.json")
    counts = np.array([i.records for i in infos])

    class Records:  # what ranked_rows asks of the RecordDataset: its length and each record's shard
        def __init__(self) -> None:
            self._shard_ids = np.repeat(np.arange(len(counts)), counts)  # as RecordDataset holds them

        def __len__(self) -> int:
            return n

        def shard_of(self, i: int) -> int:
            return int(self._shard_ids[i])

    rng = np.random.default_rng(0)
    keys = np.arange(n)
    sims = rng.uniform(-0.1, 0.5, size=(n, 3)).astype(np.float32)  # [N, 3] what the model would give
    mark["base"] = _rss()
    t0 = time.perf_counter()
    warnings = signals.Warnings()
    texts = signals.shard_texts(infos, warnings)
    s = torch.from_numpy(sims)
    weights = alip.gate_weights(s[:, 0], s[:, 1], s[:, 2], 0.2, 0.2, 0.2, 2.0, "official")
    w = torch.stack([weights.sample, weights.raw, weights.caption], dim=1).numpy()
    rows, _ = ranking.ranked_rows(Records(), keys, sims, w, texts, warnings)
    with tempfile.TemporaryDirectory() as tmp:
        ranking.ScoreResult(rows, {"records": n}).write(Path(tmp) / "scores.csv")
    mark["seconds"] = time.perf_counter() - t0


def _score_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    _score(n, folder, mark)


def _scores_csv(n: int, folder: Path) -> Path:
    """A scores CSV in alip-score's columns for the shards of `make_inputs` (made once, not timed)."""
    import csv

    from alip.score import BASE_COLUMNS

    path = folder / "scores.csv"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tmp = path.with_name("scores.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BASE_COLUMNS)
        for key in range(n):
            s = rng.uniform(-0.1, 0.5, size=3)
            w = np.minimum(np.exp(s - 0.2), 1.0)
            writer.writerow([key + 1, key, f"k{key}", *w, *s, _text(key, 12), _text(key, 10)])
    os.replace(tmp, path)
    return path


def _filter_stage(name: str, n: int, folder: Path, mark: dict) -> None:
    import shutil

    from alip.score import Rule, filter_shards

    scores = _scores_csv(n, folder)
    out = folder / "filtered"
    shutil.rmtree(out, ignore_errors=True)
    mark["base"] = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    report = filter_shards(scores, folder / "train.meta.json", out, Rule(keep_fraction=0.7), progress=False)
    mark["seconds"] = time.perf_counter() - t0
    mark["cpu_seconds"] = time.process_time() - c0  # its own CPU time: the wall time waits on the disk and on others
    assert report.kept == round(0.7 * n), report
    shutil.rmtree(out)


# Each stage's names and the function that runs it (in a child process, see `stage`).
RUNNERS = (
    (("index", "join", "plan", *PARQUET_STAGES), _data2rec_stage),
    (("start", "start_cold", "full_check"), _start_stage),
    (("dali_index", "torch_index"), _index_stage),
    (("dali_start",), _dali_start_stage),
    (("score",), _score_stage),
    (("merge",), _merge_stage),
    (("caption_start",), _caption_start_stage),
    (("filter",), _filter_stage),
)


def _evict(folder: Path) -> None:
    """Drop the shards from the page cache (what a cold start on a fresh node sees)."""
    for p in folder.iterdir():
        if p.suffix in (".rec", ".idx") or p.name.endswith(".json"):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    return _status("VmHWM")


# ---------------------------------------------------------------- driver


def run_child(name: str, n: int, folder: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(n), str(folder)]
    started = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"stage": name, "n": n, "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"stage": name, "n": n, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(stage=name, n=n, wall=time.perf_counter() - started)
    return result


def fit(points: list[tuple[int, float]]) -> float | None:
    """Log-log slope through the two largest sizes (the smaller ones carry fixed costs)."""
    points = sorted(p for p in points if p[1] > 0)
    if len(points) < 2:
        return None
    (n0, y0), (n1, y1) = points[-2], points[-1]
    return math.log(y1 / y0) / math.log(n1 / n0)


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["stage"] for r in results):
        got = [r for r in results if r["stage"] == name and "error" not in r]
        row = {"stage": name, "by_size": {r["n"]: r for r in got}}
        row["errors"] = {r["n"]: r["error"] for r in results if r["stage"] == name and "error" in r}
        if got:
            top = max(got, key=lambda r: r["n"])
            row["time_slope"] = fit([(r["n"], r["seconds"]) for r in got])
            extra = [(r["n"], max(r["peak_rss"] - r["base"], 1)) for r in got]
            row["rss_slope"] = fit(extra)
            cpu = [(r["n"], r["cpu_seconds"]) for r in got if "cpu_seconds" in r]
            if len(cpu) >= 2:
                row["cpu_slope"] = fit(cpu)
            for target in TARGETS:
                scale = target / top["n"]
                # Every stage touches every record or every shard: a slope under 1 is the fixed costs
                # of the small sizes, so time is extrapolated at least linearly.
                # Memory: what the stage adds to its process grows linearly (the fitted slopes are
                # about 1 wherever that part is large enough to fit).
                ts = max(row["time_slope"] or 1.0, 1.0)
                row[f"seconds_{target}"] = top["seconds"] * scale**ts
                row[f"peak_rss_{target}"] = top["base"] + max(top["peak_rss"] - top["base"], 0) * scale
        rows.append(row)
    return rows


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.3g} min" if s < 7200 else f"{s / 3600:.3g} h"


def _fmt_b(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(rows: list[dict], sizes: list[int]) -> str:
    head = [
        "stage",
        *[f"{n:,}: time / peak RSS" for n in sizes],
        "slope (time, RSS)",
        "15M (extrapolated)",
        "100M (extrapolated)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["stage"]]
        for n in sizes:
            r = row["by_size"].get(n)
            cells.append(f"{_fmt_s(r['seconds'])} / {_fmt_b(r['peak_rss'])}" if r else row["errors"].get(n, "not run"))
        if "time_slope" in row:
            ts, rs = row["time_slope"], row["rss_slope"]
            cells.append(f"{ts:.2f}, {rs:.2f}" if ts is not None and rs is not None else "-")
            for target in TARGETS:
                cells.append(f"{_fmt_s(row[f'seconds_{target}'])} / {_fmt_b(row[f'peak_rss_{target}'])}")
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(rows: list[dict], sizes: list[int]) -> str:
    """The stages' own CPU time (of the run kept) and its log-log slope, for the stages that record it."""
    lines = []
    for row in rows:
        if "cpu_slope" not in row:
            continue
        cells = [row["stage"]]
        for n in sizes:
            r = row["by_size"].get(n)
            cells.append(_fmt_s(r["cpu_seconds"]) if r and "cpu_seconds" in r else "-")
        cells.append(f"{row['cpu_slope']:.3f}" if row["cpu_slope"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["stage", *[f"{n:,}: CPU time" for n in sizes], "slope (CPU time)"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        stage(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alip-scale")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per stage and size")
    p.add_argument("--repeat", type=int, default=2, help="runs per stage and size; the fastest is kept")
    p.add_argument("--json", type=Path, help="write all measurements here")
    p.add_argument("--report", type=Path, nargs="+", help="only print the table of earlier --json files")
    args = p.parse_args()
    results = []
    if args.report:
        for path in args.report:  # a later file's measurement of a stage and size replaces an earlier one
            results += json.loads(path.read_text())["results"]
        results = list({(r["stage"], r["n"]): r for r in results}.values())
        rows, sizes = summarise(results), sorted({r["n"] for r in results})
        print(table(rows, sizes))
        if cpu_table(rows, sizes):
            print("\n" + cpu_table(rows, sizes))
        return
    for n in args.sizes:
        folder = args.work / str(n)
        t0 = time.perf_counter()
        if set(args.stages) - set(PARQUET_STAGES):
            make_inputs(n, folder)
        if set(args.stages) & set(PARQUET_STAGES):
            make_parquet_inputs(n, folder / "parquet")
        print(f"inputs for {n:,} records: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for name in args.stages:
            runs = [run_child(name, n, folder, args.timeout) for _ in range(args.repeat)]
            for r in runs:
                print(json.dumps(r), file=sys.stderr, flush=True)
            good = [r for r in runs if "error" not in r]
            results.append(min(good, key=lambda r: r["seconds"]) if good else runs[0])
    rows = summarise(results)
    from importlib.metadata import version

    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": version("torch"),
        "pyarrow": version("pyarrow"),
        "shards": SHARDS,
        "command": " ".join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]]),
    }
    print(json.dumps(info))
    print(table(rows, args.sizes))
    if cpu_table(rows, args.sizes):
        print("\n" + cpu_table(rows, args.sizes))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
