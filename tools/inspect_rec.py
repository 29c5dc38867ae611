#!/usr/bin/env python
"""Look inside ALIP RecordIO shards: print records, dump them to files, or check every shard.

SHARDS is a meta JSON (`{prefix}.meta.json`), a directory holding one, a quoted glob of .rec files
or a single .rec with its .idx beside it (the original ALIP release's file); several may be given.

For each of the first N records it prints the key, the image (format, width x height, mode, bytes)
and the raw text and caption decoded from their CLIP BPE tokens with open_clip's tokenizer (CLIP
lowercases and respaces text, so "IMG_2093.JPG" reads back as "img _ 2 0 9 3 . jpg").

Examples:
    python tools/inspect_rec.py data/yfcc15m/train.meta.json -n 5
    python tools/inspect_rec.py ALIP_YFCC15M.rec -n 20 --dump /tmp/peek   # {key}.jpg + {key}.txt
    python tools/inspect_rec.py "data/yfcc15m/train-*.rec" --check        # preflight every shard

--check runs the loaders' preflight (framing, .idx against .rec, record counts against the meta
JSON, 154-float labels) on every shard and prints one line per shard; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from alip.data import schema
from alip.data.recordio import RecordIOError, RecordIOReader, check_shard

SPECIAL_TOKENS = (0, 49406, 49407)  # padding, start of text, end of text


def decode_tokens(tokenizer, tokens: np.ndarray) -> str:
    """CLIP BPE ids -> text, without the start/end/padding tokens."""
    return tokenizer.decode([int(t) for t in tokens if int(t) not in SPECIAL_TOKENS]).strip()


def describe_image(jpeg: bytes) -> str:
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            return f"{im.format} {im.width}x{im.height} {im.mode}, {len(jpeg)} bytes"
    except OSError as e:
        return f"undecodable image ({e}), {len(jpeg)} bytes"


def check(shards: list[schema.ShardInfo]) -> int:
    failed, total = 0, 0
    for shard in shards:
        try:
            result = check_shard(shard.rec, shard.idx, schema.LABEL_LENGTH, shard.records)
        except RecordIOError as e:
            failed += 1
            print(f"FAIL {e}")
            continue
        total += result.num_records
        print(f"ok   {result.rec_path}: {result.num_records} records, {result.num_bytes} bytes")
    print(f"{len(shards) - failed}/{len(shards)} shards ok, {total} records in the good ones")
    return 1 if failed else 0


def show(shards: list[schema.ShardInfo], count: int, dump: Path | None) -> None:
    import alip  # the tokenizer pulls in open_clip: only when records are decoded

    tokenizer = alip.get_tokenizer("ViT-B-32")
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    shown = 0
    for shard in shards:
        with RecordIOReader(shard.rec, shard.idx) as reader:
            for key_in_idx, offset in reader.index:
                if shown == count:
                    return
                key, raw, caption, jpeg = schema.parse_record(reader.read_at(offset, f"record key {key_in_idx}"))
                raw_text, caption_text = decode_tokens(tokenizer, raw), decode_tokens(tokenizer, caption)
                print(f"[{shown}] key {key} ({Path(shard.rec).name} @ {offset}): {describe_image(jpeg)}")
                print(f"    raw:     {raw_text}")
                print(f"    caption: {caption_text}")
                if dump is not None:
                    (dump / f"{key}.jpg").write_bytes(jpeg)
                    (dump / f"{key}.txt").write_text(f"raw: {raw_text}\ncaption: {caption_text}\n", encoding="utf-8")
                shown += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="meta JSON, directory with one, quoted .rec glob, or .rec file")
    parser.add_argument("-n", "--num", type=int, default=10, help="records to show, from the first shard on (10)")
    parser.add_argument("--dump", type=Path, help="write {key}.jpg and {key}.txt (decoded raw text + caption) here")
    parser.add_argument("--check", action="store_true", help="preflight every shard instead of printing records")
    args = parser.parse_args(argv)
    if args.num < 0:
        parser.error("--num must be >= 0")
    try:
        shards = schema.resolve_shards(args.shards)
        if args.check:
            return check(shards)
        show(shards, args.num, args.dump)
    except (FileNotFoundError, ValueError) as e:  # RecordIOError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
