"""Manifest / img2dataset tars (+ caption sidecar) -> shuffled RecordIO shards + meta JSON.

The steps, each restartable, under a lock on the output folder (two runs never write into one):
1. (alip.data.ingest.shard_plan) Index the inputs (rows, tar members) into columns (SampleIndex: about
   240 bytes a row for YFCC-length texts, so 15M rows fit in a few GB), join captions, and count every row that
   cannot become a sample, with its reason. Stat every image file: its size and mtime tell a rerun which shards
   are stale.
2. (alip.data.ingest.shard_plan) Shuffle the whole dataset once with a seed. DALI's reader only
   shuffles within a buffer, so shards must already be mixed. Cut the shuffled list into shards by record count and/or
   estimated size. The plan is a pure function of the inputs and options; its fingerprint is
   saved, so a rerun with different inputs cannot silently mix two plans.
3. Write the shards in parallel worker processes. Each worker decodes and validates every image,
   tokenises both texts, and writes `.rec`/`.idx` plus a texts sidecar under temporary names.
   It renames them when done and writes `{stem}.done.json` last, with the size and mtime of its
   image files. A shard without that file is incomplete, and one whose image files changed since
   is stale: both are redone on the next run, so a killed run resumes without duplicates and a
   run after fixing images picks the fixed files up. A worker killed from outside (the OOM killer)
   stops the run with the names of the unfinished shards; a rerun finishes them.
4. Write the meta JSON (shards, counts, checksums, tokenizer, layout, source) and the report of
   every skipped input.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alip.cli import UserError
from alip.data.format import schema
from alip.data.format.images import BadImage, prepare_image
from alip.data.format.recordio import RecordIOWriter
from alip.data.ingest.shard_plan import (
    NO_PLAN,
    ConvertOptions,
    ShardTask,
    index_inputs,
    input_paths,
    own_files,
    plan_fingerprint,
    plan_shards,
    shard_stamp,
    stat_images,
)
from alip.data.ingest.sources import (
    InputError,
    SourceSample,
    read_image_bytes,
    read_sidecar_header,
)
from alip.data.ingest.typed_columns import decode_tokens, open_tokens_npy, read_inputs
from alip.files import (
    FolderLock,
    claim_folder,
    refuse_overlap,
    sha256_file,
    write_json_atomic,
)

logger = logging.getLogger(__name__)


@dataclass
class ShardResult:
    stem: str
    records: int
    bytes: int
    sha256: str
    skipped: list[dict]
    stats: dict[str, int]
    seconds: float = 0.0  # time this shard took inside its worker
    inputs: str = ""  # shard_stamp() of the image files it was written from


@dataclass
class ConvertReport:
    meta_path: Path
    num_inputs: int
    num_records: int
    skipped: Counter
    stats: Counter
    seconds: float  # the whole run
    write_seconds: float  # wall time of the writing phase, worker start-up included (no indexing)
    worker_seconds: float  # summed time the workers spent on this run's shards: per-worker throughput
    images_written: int  # inputs processed by this run (fewer than all when resuming)


class WorkerLostError(UserError):
    """A worker process ended abruptly (OOM killer, kill -9); the message names the unfinished shards."""


# ---------------------------------------------------------------- 3. write

_worker: dict = {}  # per-process state: tokenizer, options, progress counter


def _init_worker(opts: ConvertOptions, counter) -> None:
    import open_clip  # imported here: only the workers tokenise

    tokens = open_tokens_npy(opts.tokens_npy) if opts.tokens_npy is not None else None  # mmap: shared pages
    _worker.update(tokenizer=open_clip.get_tokenizer(opts.tokenizer), opts=opts, counter=counter, tokens=tokens)


def _tokenize(texts: list[str]) -> np.ndarray:
    import ftfy

    # ftfy repairs mojibake first; the CLIP tokenizer then applies its own cleaning and truncates
    # to 77 tokens keeping the end token (as the original release's data did).
    return _worker["tokenizer"]([ftfy.fix_text(t) for t in texts]).numpy()


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard under temporary names, then rename; `{stem}.done.json` is written last."""
    started = time.perf_counter()
    out = _worker["opts"].out_dir
    final = {ext: out / f"{task.stem}{ext}" for ext in (".rec", ".idx", ".texts.jsonl")}
    tmp = {ext: p.with_name(p.name + ".tmp") for ext, p in final.items()}
    try:
        count, nbytes, skipped, stats = _write_records(task, tmp)
    except BaseException:
        for p in tmp.values():  # no partial files left behind (a full disk most of all)
            p.unlink(missing_ok=True)
        raise
    for ext in final:  # rec, idx, texts: all present before the done marker says so
        os.replace(tmp[ext], final[ext])
    seconds = time.perf_counter() - started
    result = ShardResult(
        task.stem, count, nbytes, sha256_file(final[".rec"]), skipped, stats, seconds, shard_stamp(task)
    )
    write_json_atomic(out / f"{task.stem}.done.json", asdict(result))
    return result


def _write_records(task: ShardTask, tmp: dict[str, Path]) -> tuple[int, int, list[dict], dict[str, int]]:
    """Every image of the shard decoded, checked and written, or skipped with its reason."""
    opts: ConvertOptions = _worker["opts"]
    samples = [s for _, s in task.items]
    inputs = read_inputs(samples, opts.columns, opts.image_root, _worker.get("tokens"))  # parquet: by row group
    raw_tokens = _token_rows([i.raw for i in inputs])
    cap_tokens = _caption_rows(inputs, len(opts.more_captions))  # [N, 77], or [N, K, 77] with K slots
    skipped, stats = [], Counter()
    with RecordIOWriter(tmp[".rec"], tmp[".idx"]) as writer, open(tmp[".texts.jsonl"], "w", encoding="utf-8") as texts:
        for i, ((key, sample), inp) in enumerate(zip(task.items, inputs, strict=True)):
            try:
                if inp.error is not None:
                    raise BadImage(inp.error)  # a null or bad value read with the row: skipped the same way
                data = inp.image if inp.image is not None else read_image_bytes(sample)
                inp.image = None  # embedded bytes: free each image once used, not the whole shard's at the end
                img = prepare_image(data, opts.max_side, opts.jpeg_quality, opts.max_pixels)
            except BadImage as e:
                skipped.append({"source": sample.source, "key": sample.key, "reason": str(e)})
            else:
                writer.write(key, schema.make_record(key, img.jpeg, raw_tokens[i], cap_tokens[i]))
                entry = _text_entry(key, sample, raw_tokens[i], cap_tokens[i], inp)
                texts.write(json.dumps(entry, ensure_ascii=False) + "\n")
                stats["passthrough" if img.passthrough else "reencoded"] += 1
                stats[f"mode_{img.source_mode}"] += 1
                stats["empty_raw_text"] += not entry["raw_text"].strip()
                stats["truncated_raw_text"] += bool(raw_tokens[i][-1])
                _caption_stats(stats, cap_tokens[i], inp, opts.texts[1:])
            if i % 16 == 15:
                _bump(16)
        _bump(len(task.items) % 16)
        writer.close(fsync=True)
        return writer.count, writer.bytes_written, skipped, dict(stats)


def _caption_stats(stats: Counter, caps: np.ndarray, inp, names: tuple[str, ...]) -> None:
    """Truncated captions (the first slot's as before K slots existed, later ones by slot) and token-id texts."""
    rows = caps.reshape(-1, schema.CONTEXT_LENGTH)  # [K, 77]
    stats["truncated_caption"] += bool(rows[0][-1])
    for name, row in zip(names[1:], rows[1:], strict=True):
        stats[f"truncated_caption_{name}"] += bool(row[-1])
    given = [inp.raw, inp.caption, *(inp.more_captions or [])]
    stats["token_id_texts"] += sum(isinstance(t, np.ndarray) for t in given)


def _caption_rows(inputs: list, more: int) -> np.ndarray:
    """[N, 77] caption ids, or [N, 1 + more, 77] with `more` caption slots after the first ("" for none)."""
    first = _token_rows([i.caption if i.caption is not None else "" for i in inputs])
    if not more:
        return first
    rest = [_token_rows([_or_empty(i.more_captions[slot]) for i in inputs]) for slot in range(more)]
    return np.stack([first, *rest], axis=1)


def _or_empty(text: str | np.ndarray | None) -> str | np.ndarray:
    return "" if text is None else text


def _token_rows(texts: list[str | np.ndarray]) -> np.ndarray:
    """[N, 77] ids: strings tokenised, rows of checked ids (pre-tokenised inputs) as they are."""
    rows = _tokenize([t if isinstance(t, str) else "" for t in texts])
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            rows[i] = t
    return rows


def _text_entry(key: int, sample: SourceSample, raw: np.ndarray, cap: np.ndarray, inp) -> dict:
    # the original strings, for inspection and noise reports (the shard holds only tokens); texts
    # given as token ids are decoded with the tokenizer and marked so (spacing and case may differ)
    raw_decoded, cap_decoded = isinstance(inp.raw, np.ndarray), isinstance(inp.caption, np.ndarray)
    slots, cap = cap, cap.reshape(-1, schema.CONTEXT_LENGTH)[0]  # the first caption slot: K = 1's caption
    entry = {
        "key": key,
        "sample_key": sample.key,
        "source": sample.source,
        "raw_text": decode_tokens(_worker["tokenizer"], raw) if raw_decoded else sample.raw_text,
        "caption": decode_tokens(_worker["tokenizer"], cap) if cap_decoded else sample.caption,
        "raw_truncated": bool(raw[-1]),
        "caption_truncated": bool(cap[-1]),
    }
    if raw_decoded or cap_decoded:
        entry["raw_decoded"], entry["caption_decoded"] = raw_decoded, cap_decoded
    if inp.more_captions is not None:
        _add_slots(entry, slots, inp)
    return entry


def _add_slots(entry: dict, cap: np.ndarray, inp) -> None:
    """K > 1 caption slots: every caption by slot name (the first is also "caption", for K = 1 readers)."""
    names = _worker["opts"].texts[1:]
    given = [inp.caption, *inp.more_captions]
    texts, truncated, decoded = {}, {}, {}
    for name, text, row in zip(names, given, cap, strict=True):
        decoded[name] = isinstance(text, np.ndarray)
        texts[name] = decode_tokens(_worker["tokenizer"], row) if decoded[name] else text
        truncated[name] = bool(row[-1])
    texts[names[0]] = entry["caption"]
    entry["captions"], entry["captions_truncated"] = texts, truncated
    if any(decoded.values()):
        entry["captions_decoded"] = decoded


def _bump(n: int) -> None:
    counter = _worker.get("counter")
    if counter is not None and n:
        with counter.get_lock():
            counter.value += n


# ---------------------------------------------------------------- 4. orchestrate


def convert(inputs: list[Path], opts: ConvertOptions) -> ConvertReport:
    """Run (or finish) a conversion. Raises InputError on unusable input or when nothing survives,
    FolderLockedError while another run writes into the folder, WorkerLostError when a worker was killed."""
    refuse_overlap(("--out-dir", opts.out_dir), *input_paths(inputs, opts))
    with FolderLock(opts.out_dir, "data2rec"):
        return _convert(inputs, opts)


def _convert(inputs: list[Path], opts: ConvertOptions) -> ConvertReport:
    start = time.perf_counter()
    out = opts.out_dir
    samples, index_skips = index_inputs(inputs, opts)
    num_inputs = len(samples) + len(index_skips)
    if not samples:
        _claim_output(out, opts, NO_PLAN, 0)  # the skip report is data2rec's own file too
        _write_skip_report(out, opts.prefix, [asdict(s) for s in index_skips])
        raise InputError(f"none of the {num_inputs} input rows is usable; reasons in {opts.prefix}.skipped.jsonl")
    stat_images(samples)
    tasks = plan_shards(samples, opts)
    _claim_output(out, opts, plan_fingerprint(tasks, opts), len(tasks))
    done = _completed_shards(out, tasks)
    todo = [t for t in tasks if t.stem not in done]
    write_start = time.perf_counter()
    already = sum(t.num_samples for t in tasks) - sum(t.num_samples for t in todo)
    for result in _run_workers(todo, opts, total=len(samples), already=already):
        done[result.stem] = result
    write_seconds = time.perf_counter() - write_start
    worker_seconds = sum(done[t.stem].seconds for t in todo)
    results = [done[t.stem] for t in tasks]
    skipped = [asdict(s) for s in index_skips] + [s for r in results for s in r.skipped]
    _write_skip_report(out, opts.prefix, skipped)
    num_records = sum(r.records for r in results)
    if num_records == 0:
        raise InputError(f"every one of the {num_inputs} inputs failed; reasons in {opts.prefix}.skipped.jsonl")
    stats = Counter()
    for r in results:
        stats.update(r.stats)
    reasons = Counter(_reason_kind(s["reason"]) for s in skipped)
    meta = _build_meta(inputs, opts, results, num_inputs, reasons, stats)
    schema.write_meta(schema.meta_path(out, opts.prefix), meta)
    if num_records + len(skipped) != num_inputs:  # every input is a record or a reported skip
        raise RuntimeError(f"bookkeeping error: {num_records} records + {len(skipped)} skipped != {num_inputs} inputs")
    return ConvertReport(
        schema.meta_path(out, opts.prefix),
        num_inputs,
        num_records,
        reasons,
        stats,
        seconds=time.perf_counter() - start,
        write_seconds=write_seconds,
        worker_seconds=worker_seconds,
        images_written=sum(t.num_samples for t in todo),
    )


def _claim_output(out: Path, opts: ConvertOptions, fingerprint: str, num_shards: int) -> None:
    """Refuse to mix two different plans in one folder, and to write over files data2rec did not write.
    --overwrite removes what the earlier plan (`{prefix}.plan.json`) says data2rec wrote, and only that."""
    plan_path = out / f"{opts.prefix}.plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is None:
        state = "none"
    elif plan.get("fingerprint") == fingerprint:
        state = "same"  # a rerun of the same plan: resume
    else:  # a run that found no usable row left only its skip report: nothing to keep
        state = "other" if plan.get("num_shards") else "empty"
    earlier = own_files(opts.prefix, int(plan.get("num_shards", 0))) if plan else set()
    names = own_files(opts.prefix, num_shards)
    claim_folder(
        out, opts.prefix, "data2rec", plan=state, earlier=earlier, names=names, overwrite=opts.overwrite,
        error=InputError, log=logger,
    )  # fmt: skip
    if state != "same" or opts.overwrite:
        write_json_atomic(plan_path, {"fingerprint": fingerprint, "num_shards": num_shards, "seed": opts.seed})


def _completed_shards(out: Path, tasks: list[ShardTask]) -> dict[str, ShardResult]:
    """Shards an earlier run of this plan finished, from image files that have not changed since."""
    done, stale = {}, 0
    for task in tasks:
        result = _load_done(out / f"{task.stem}.done.json")
        if result is not None and result.inputs != shard_stamp(task):
            stale += 1  # an image was replaced (a bad one fixed?), added or removed: its old skips are stale
        elif result is not None:
            done[task.stem] = result
    if stale:
        logger.info("redoing %d shard(s) whose image files changed since they were written", stale)
    if done:
        logger.info("resuming: %d of %d shards already complete", len(done), len(tasks))
    return done


def _load_done(path: Path) -> ShardResult | None:
    if not path.exists():
        return None
    result = ShardResult(**json.loads(path.read_text()))
    rec = path.parent / f"{result.stem}.rec"
    if not rec.exists() or rec.stat().st_size != result.bytes:
        return None  # files changed since: redo the shard
    return result


def _run_workers(todo: list[ShardTask], opts: ConvertOptions, total: int, already: int):
    """Yield ShardResults as shards finish, with a progress bar over images."""
    from tqdm import tqdm

    if not todo:
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold torch/OpenMP threads
    counter = ctx.Value("q", 0)
    bar = tqdm(total=total, initial=already, unit="img", desc="data2rec", disable=not opts.progress, smoothing=0.1)
    if opts.workers == 1:  # in this process: no pool start-up cost for small jobs and tests
        _init_worker(opts, counter)
        for task in todo:
            result = write_shard(task)
            bar.update(already + counter.value - bar.n)
            yield result
        bar.close()
        return
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker is killed (OOM killer, kill -9),
    # Pool silently replaces it and waits forever for its shard; the executor raises BrokenProcessPool.
    workers = min(opts.workers, len(todo))
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(opts, counter))
    # a few shards queued per worker, not all: a queued task holds its shard's SourceSamples
    waiting, pending = deque(todo), {}
    try:
        while True:
            while waiting and len(pending) < 2 * workers:
                pending[pool.submit(write_shard, waiting[0])] = waiting[0]
                waiting.popleft()
            if not pending:
                break
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.update(already + counter.value - bar.n)
            for future in finished:
                result = future.result()  # re-raises a worker's exception here
                del pending[future]
                bar.set_postfix(shard=result.stem, skipped=len(result.skipped), refresh=False)
                yield result
    except BrokenProcessPool:
        unfinished = [t.stem for f, t in pending.items() if not (f.done() and f.exception() is None)]
        unfinished += [t.stem for t in waiting]
        raise WorkerLostError(_lost_worker_message(unfinished, len(todo))) from None
    finally:
        # After an error, queued shards are dropped and running ones finish (and are kept). Always wait: with
        # wait=False the pool's manager thread may close its wake-up pipe while the interpreter's exit hook
        # writes to it, printing an "OSError: Bad file descriptor" traceback at exit (CPython 3.11, seen in CI).
        pool.shutdown(wait=True, cancel_futures=True)
    bar.update(already + counter.value - bar.n)
    bar.close()


def _lost_worker_message(unfinished: list[str], num_todo: int) -> str:
    names = ", ".join(unfinished[:10]) + (f" and {len(unfinished) - 10} more" if len(unfinished) > 10 else "")
    return (
        "a worker process ended abruptly (killed by the out-of-memory killer or a signal, or crashed: see any "
        f"error above); {len(unfinished)} of the {num_todo} shards of this run are not finished: {names}. "
        "The finished shards are kept: rerun the same command to resume (with fewer --workers if memory ran out)"
    )


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _write_skip_report(out: Path, prefix: str, skipped: list[dict]) -> None:
    path = out / f"{prefix}.skipped.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for entry in sorted(skipped, key=lambda s: s["source"]):
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _tokenizer_info(name: str) -> dict:
    import open_clip

    tok = open_clip.get_tokenizer(name)
    if getattr(tok, "context_length", None) != schema.CONTEXT_LENGTH:
        raise InputError(f"tokenizer of {name} has context length {tok.context_length}; the layout needs 77")
    return {
        "model": name,
        "type": type(tok).__name__,
        "context_length": tok.context_length,
        "vocab_size": len(getattr(tok, "encoder", {})) or None,
        "sot_token_id": getattr(tok, "sot_token_id", None),
        "eot_token_id": getattr(tok, "eot_token_id", None),
        "cleaning": "ftfy.fix_text, then the tokenizer's own cleaning (lowercase, whitespace)",
    }


def _sidecar_captioners(opts: ConvertOptions) -> dict[str, dict]:
    """Each caption slot's captioner settings from its sidecar's header (tools/caption.py records the
    model and decoding there), by slot name: which captioner or prompt filled which slot."""
    sidecars = [(opts.caption_name, opts.captions), *((c.name, c.sidecar) for c in opts.more_captions)]
    out = {}
    for name, path in sidecars:
        header = read_sidecar_header(path) if path is not None else None
        if header and header.get("captioner") is not None:
            out[name] = header["captioner"]
    return out


def _build_meta(inputs, opts, results, num_inputs, reasons, stats) -> schema.DatasetMeta:
    shards = [
        schema.ShardInfo(f"{r.stem}.rec", f"{r.stem}.idx", r.records, r.bytes, r.sha256, texts=f"{r.stem}.texts.jsonl")
        for r in results
        if r.records > 0  # a shard whose every image failed is left out (DALI cannot read an empty shard)
    ]
    from alip import __version__

    first_caption = str(opts.captions) if opts.captions else (opts.columns.caption and f"column {opts.columns.caption}")
    captions = first_caption
    if opts.more_captions:  # K > 1: where each slot's captions came from
        captions = {opts.caption_name: first_caption, **{c.name: c.describe() for c in opts.more_captions}}
    source = {
        "inputs": [str(p) for p in inputs],
        "kind": "tar" if inputs[0].suffix == ".tar" else "manifest",
        "captions": captions,
        "num_inputs": num_inputs,
        "num_skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons),
        "stats": dict(stats),
        "seed": opts.seed,
        "shard_records": opts.shard_records,
        "shard_bytes": opts.shard_bytes,
        "max_side": opts.max_side,
        "jpeg_quality": opts.jpeg_quality,
        "max_pixels": opts.max_pixels,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "alip_version": __version__,
    }
    if opts.tokens_npy is not None:
        source["tokens_npy"] = str(opts.tokens_npy)
    captioners = _sidecar_captioners(opts)
    if captioners:
        source["captioners"] = captioners
    slots = schema.TextSlots(opts.texts)
    return schema.DatasetMeta(
        shards=shards,
        tokenizer=_tokenizer_info(opts.tokenizer),
        source=source,
        layout=slots.layout(),
        texts=list(slots.names),
    )
