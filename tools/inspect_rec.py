#!/usr/bin/env python
"""Look inside ALIP RecordIO shards: print records, dump them to files, or check every shard.

SHARDS is a meta JSON (`{prefix}.meta.json`), a directory holding one, a quoted glob of .rec files
or a single .rec with its .idx beside it (the original ALIP release's file); several may be given.

For each of the first N records it prints the key, the image (format, width x height, mode, bytes)
and the raw text and caption decoded from their CLIP BPE tokens with open_clip's tokenizer (CLIP
lowercases and respaces text, so "IMG_2093.JPG" reads back as "img _ 2 0 9 3 . jpg"). Records with
K > 1 caption slots show every caption, named as the meta JSON's "texts" names them ("blip: ...").

Examples:
    python tools/inspect_rec.py data/yfcc15m/train.meta.json -n 5
    python tools/inspect_rec.py ALIP_YFCC15M.rec -n 20 --dump /tmp/peek   # {key}.jpg + {key}.txt
    python tools/inspect_rec.py "data/yfcc15m/train-*.rec" --check        # full framing check of every shard
    python tools/inspect_rec.py data/yfcc15m/ --check --deep --workers 16   # read and decode everything

--check runs the full framing check on every shard (every record's frame header and label length,
.idx against .rec, record counts against the meta JSON: it reads the 8-byte record headers only)
and prints one line per shard. The loaders run it at start only with `full_check`
(`data.full_check=true`); by default they check sizes, counts, the .idx and three records per shard.
--check --deep adds what the full check leaves out because it reads every byte: each shard's
sha256 and size against the meta JSON, every label (finite, integral token ids below 49408, a
start and an end token in each non-empty text) and every image, fully decoded.
Run it once after copying or converting a dataset, and whenever training reports a damaged record.

Exit status: 0 when every shard passes; 1 when --check finds a damaged shard (each finding is
printed, the check itself ran); 2 on a usage error, such as a missing file or an unreadable meta
JSON: one "error: ..." line (the traceback with --debug or ALIP_DEBUG=1).
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from alip.cli import add_debug_flag, guarded
from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, RecordIOReader, check_shard

CHECK_FAILED = 1  # a damaged shard: distinct from a usage error (alip.cli.USER_ERROR_STATUS, 2)

SPECIAL_TOKENS = (0, 49406, 49407)  # padding, start of text, end of text


@functools.cache
def clip_tokenizer():
    import alip  # pulls in open_clip and torch: only once a record is decoded

    return alip.get_tokenizer("ViT-B-32")


def decode_tokens(tokens: np.ndarray) -> str:
    """CLIP BPE ids -> text, without the start/end/padding tokens."""
    return clip_tokenizer().decode([int(t) for t in tokens if int(t) not in SPECIAL_TOKENS]).strip()


def describe_image(jpeg: bytes) -> str:
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            return f"{im.format} {im.width}x{im.height} {im.mode}, {len(jpeg)} bytes"
    except OSError as e:
        return f"undecodable image ({e}), {len(jpeg)} bytes"


def _deep_lines(shard: schema.ShardInfo, slots: schema.TextSlots) -> tuple[int | None, list[str]]:
    found = schema.deep_check_shard(shard, slots=slots)
    checked = found.shard
    head = f"{checked.rec_path}: {checked.num_records} records, {checked.num_bytes} bytes, checksum {found.checksum}"
    if not found.num_problems:
        return checked.num_records, [f"ok   {head}, every label and image good"]
    lines = [f"FAIL {head}, {found.num_problems} problem(s):", *(f"       {p}" for p in found.problems)]
    if found.num_problems > len(found.problems):
        lines.append(f"       ... and {found.num_problems - len(found.problems)} more")
    return None, lines


def check_one(
    shard: schema.ShardInfo, deep: bool, slots: schema.TextSlots | None = None
) -> tuple[int | None, list[str]]:
    """(its record count, or None when it is damaged; the lines to print) for one shard whose labels
    hold `slots` (K = 1 by default).

    A damaged shard is a finding of the check, not an error of the command.
    """
    slots = slots if slots is not None else schema.TextSlots()
    try:
        if deep:
            return _deep_lines(shard, slots)
        result = check_shard(shard.rec, shard.idx, slots.label_length, shard.records)
    except RecordIOError as e:
        return None, [f"FAIL {e}"]
    return result.num_records, [f"ok   {result.rec_path}: {result.num_records} records, {result.num_bytes} bytes"]


def check(shards: list[schema.ShardInfo], deep: bool, workers: int, slots: schema.TextSlots | None = None) -> int:
    task = functools.partial(check_one, deep=deep, slots=slots)
    failed, total = 0, 0
    with ProcessPoolExecutor(workers) as pool:  # starts no process until used
        for records, lines in pool.map(task, shards) if workers > 1 else map(task, shards):  # in shard order
            print("\n".join(lines), flush=True)
            failed += records is None
            total += records or 0
    print(f"{len(shards) - failed}/{len(shards)} shards ok, {total} records in the good ones")
    return CHECK_FAILED if failed else 0


def label_texts(label: np.ndarray, slots: schema.TextSlots) -> list[tuple[str, str]]:
    """(name, decoded text) of every text of a label: ("raw", ...), then each caption slot by name
    ("caption" for K = 1, as the meta JSON names it otherwise)."""
    names = ("raw", "caption") if slots.num_captions == 1 else slots.names
    try:
        raw, captions = schema.decode_label(label, slots)
        rows = [raw, *np.asarray(captions).reshape(-1, schema.CONTEXT_LENGTH)]
        return [(name, decode_tokens(row)) for name, row in zip(names, rows, strict=True)]
    except schema.TokenError as e:  # show the damage and go on: this is an inspection tool
        return [(name, f"<damaged label: {e}>") for name in names]


def show(shards: list[schema.ShardInfo], count: int, dump: Path | None, slots: schema.TextSlots | None = None) -> None:
    slots = slots if slots is not None else schema.TextSlots()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    shown = 0
    for shard in shards:
        with RecordIOReader(shard.rec, shard.idx) as reader:
            for key_in_idx, offset in reader.index:
                if shown == count:
                    return
                key, label, jpeg = schema.split_record(reader.read_at(offset, f"record key {key_in_idx}"), slots)
                texts = label_texts(label, slots)
                width = max(len(name) for name, _ in texts) + 1  # "raw:     " / "caption: " for K = 1
                print(f"[{shown}] key {key} ({Path(shard.rec).name} @ {offset}): {describe_image(jpeg)}")
                for name, text in texts:
                    print(f"    {name + ':':<{width}} {text}")
                if dump is not None:
                    (dump / f"{key}.jpg").write_bytes(jpeg)
                    lines = "".join(f"{name}: {text}\n" for name, text in texts)
                    (dump / f"{key}.txt").write_text(lines, encoding="utf-8")
                shown += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="meta JSON, directory with one, quoted .rec glob, or .rec file")
    parser.add_argument("-n", "--num", type=int, default=10, help="records to show, from the first shard on (10)")
    parser.add_argument("--dump", type=Path, help="write {key}.jpg and {key}.txt (decoded raw text + caption) here")
    parser.add_argument("--check", action="store_true", help="preflight every shard instead of printing records")
    parser.add_argument(
        "--deep", action="store_true", help="with --check: also checksums, every label, every image decoded"
    )
    parser.add_argument("--workers", type=int, default=1, help="with --check: shards checked in parallel (1)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.num < 0:
        parser.error("--num must be >= 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.deep and not args.check:
        parser.error("--deep goes with --check")
    resolved = schema.resolve_dataset(args.shards)
    shards, slots = [info for info, _ in resolved], schema.agreed_slots(resolved)
    if args.check:
        return check(shards, args.deep, args.workers, slots)
    show(shards, args.num, args.dump, slots)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main)())
