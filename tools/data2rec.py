#!/usr/bin/env python
"""Pack image-text pairs (+ synthetic captions) into shuffled RecordIO shards for ALIP training.

Inputs: manifests (.tsv/.csv/.jsonl/.parquet) with an image-path column (relative to --image-root,
default the manifest's folder), a raw-text column and optionally a caption column; or img2dataset
webdataset .tar shards ({key}.jpg/.txt/.json). Captions can also come from a sidecar
(--captions, JSONL/parquet with "key" or "path" and "caption"), as written by tools/caption.py.

The hub's parquet form (most image datasets on Hugging Face, the published YFCC15M): the image
column may hold the images themselves (binary, or the `datasets` Image struct {bytes, path}), and
text columns may hold CLIP token ids (list<int>, or fixed 77-id rows); the kind is read from the
column's type. `--show-schema INPUT` lists the columns, their kinds and the flags that pack them.
Such rows are read by row group when their shard is written, and the shuffle mixes whole row
groups (see alip.data.ingest.convert). --tokens-col NAME reads both texts from one column of 77-id texts
end to end, a record label's layout (the published YFCC15M's `texts`); --token-slots picks which
77-id texts are the raw text and the caption (default 0,1). --tokens-npy FILE supplies them by
row order instead: an .npy of [N, 154] (raw text and caption) or [N, 77] (raw text), integer or
integral float, one row per input row (all manifests together, in the order given). Token ids
must open with the start token 49406, hold the end token 49407 and be < 49408; more than 77 ids
are cut keeping the end token; a bad row is skipped and reported. The texts sidecar then holds
the decoded text, marked "raw_decoded"/"caption_decoded". JSONL manifests hold paths and strings.

Several captions per image (K caption slots): give each caption source a slot name, NAME=SOURCE,
as often as needed: --caption-col blip=caption_blip --caption-col llm=caption_llm --captions
ofa=ofa_caps.jsonl (columns, img2dataset JSON fields or tools/caption.py sidecars, in any mix).
Each record's label then holds 77 x (1 + K) token ids, the raw text first, then the captions in
the order given; the meta JSON names them ("texts": ["raw", "blip", "llm", "ofa"]) and each texts
sidecar entry gets "captions": {name: string}. A token-id column works as a slot's source too, and
--token-slots 0,ofa=1,llm=2 takes named caption slots from --tokens-col/--tokens-npy. A
sample missing one of its captions is skipped as a missing caption is, the reason naming the
slot ("no llm caption for this sample"). Without names, one --caption-col and/or one --captions
give the single caption of the release's 154-float layout, exactly as before.

TSV manifests are read literally: one line per row, fields split on tabs, no CSV quoting (a `"`
is part of the text); a line whose field count differs from the header's is skipped and reported.
CSV manifests use standard CSV quoting. JSONL lines must be JSON objects.

Every image is decoded and checked before it enters a shard. Zero-byte, truncated and corrupt
files, missing files and decompression bombs are skipped and listed with their reason in
{prefix}.skipped.jsonl. PNGs with alpha, grayscale and CMYK images are converted to RGB JPEG;
RGB/grayscale JPEGs pass through unchanged unless --max-side asks for a resize. The dataset is
shuffled once with --seed, then cut into shards {prefix}-00000.rec/.idx. Each shard gets a
{stem}.texts.jsonl with its records' original strings. {prefix}.meta.json lists the shards, their
counts and checksums, the tokenizer and the layout. Rerunning the same command after an
interruption (a kill, a worker lost to the out-of-memory killer) finishes the job without
duplicates; it also redoes the shards whose image files changed since (by size or mtime), so
fixed images replace their skips. A second run into the same --out-dir is refused while the first
is running. Errors in the inputs or options print one line and exit with status 2.

Examples:
  python tools/data2rec.py --show-schema part-00000.parquet
  python tools/data2rec.py /data/yfcc15m_hf/data/*.parquet --image-col images --tokens-col texts \\
      --out-dir /data/yfcc15m_rec --workers 32
  python tools/data2rec.py yfcc15m.tsv --image-root /data/yfcc/images --text-col title \\
      --captions yfcc15m_captions.jsonl --out-dir /data/yfcc15m_rec --workers 32
  python tools/data2rec.py /data/img2dataset/*.tar --captions caps.jsonl --out-dir shards/
  python tools/data2rec.py m.jsonl --caption-col blip=caption_blip --captions llm=llm_caps.jsonl --out-dir shards/
"""

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path

from alip.cli import add_debug_flag, guarded
from alip.data.ingest import sources, typed_columns
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import CaptionSource, Columns

# NAME=SOURCE names a caption slot; a source that merely holds "=" (a path like a=b.jsonl) has no valid name
_SLOT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class _CaptionSourceAction(argparse.Action):
    """--caption-col and --captions append (kind, value) to one list: the slots keep the command line's order."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (self.const, value)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="manifest file(s) or img2dataset .tar shard(s)")
    p.add_argument("--out-dir", type=Path, help="folder for the shards, meta JSON and reports (required)")
    p.add_argument(
        "--show-schema",
        action="store_true",
        help="print each column of the input(s) with its type, detected kind and the flags that pack it; write nothing",
    )
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--image-root", type=Path, help="folder the manifest's image paths are relative to")
    p.add_argument(
        "--image-col",
        default="image",
        help="manifest column with the image path, bytes or {bytes, path} (default: image)",
    )
    p.add_argument(
        "--text-col",
        help="manifest column with the raw web text, a string or token ids (default: text, or none with --tokens-npy)",
    )
    p.add_argument(
        "--caption-col",
        dest="caption_sources",
        action=_CaptionSourceAction,
        const="column",
        help="manifest column (or img2dataset JSON field) with the synthetic caption, a string or token ids; "
        "NAME=COLUMN names a caption slot (repeatable: K caption slots, see above)",
    )
    p.add_argument(
        "--tokens-col",
        help="parquet column of 77-id texts end to end, as a record's label (e.g. 154 ids: raw text, caption)",
    )
    p.add_argument(
        "--token-slots",
        help="which 77-id texts of --tokens-col/--tokens-npy are the raw text and the caption, e.g. 0,2 "
        "(default: 0,1; 0 for a 77-wide .npy); named caption slots give K of them: 0,ofa=1,llm=2",
    )
    p.add_argument(
        "--tokens-npy",
        type=Path,
        help=".npy of token ids by input row: [N, 154] raw text + caption, or [N, 77] raw text",
    )
    p.add_argument("--key-col", help="manifest column with a unique sample key (default: the row number)")
    p.add_argument(
        "--captions",
        dest="caption_sources",
        action=_CaptionSourceAction,
        const="sidecar",
        help="caption sidecar (JSONL/parquet: key or path -> caption); NAME=FILE names a caption slot (repeatable)",
    )
    p.add_argument("--no-caption", action="store_true", help="allow samples without caption (empty caption; CLIP)")
    p.add_argument("--shard-records", type=int, default=10_000, help="max records per shard (default: 10000)")
    p.add_argument("--shard-size-mb", type=float, help="max shard size in MB, estimated from the input sizes")
    p.add_argument("--seed", type=int, default=0, help="seed of the one global shuffle (default: 0)")
    p.add_argument("--workers", type=int, default=ConvertOptions.workers, help="worker processes (default: all cores)")
    p.add_argument("--max-side", type=int, help="resize images whose longer side exceeds this (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (default: 95)")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="reject images with more pixels (bombs)")
    p.add_argument("--tokenizer", default="ViT-B-32", help="open_clip model whose tokenizer to use (default: ViT-B-32)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the files an earlier run with this --prefix wrote into --out-dir (its plan names them; no other "
        "file is touched) and convert everything again",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show_schema:
        for path in args.inputs:
            print(schema_report(path))
        return 0
    if args.out_dir is None:
        raise sources.InputError("--out-dir is required (or --show-schema to only look at the inputs)")
    text_col = args.text_col if args.text_col is not None else (None if args.tokens_npy or args.tokens_col else "text")
    slots, slot_names = token_slots(args.token_slots)
    caption_col, captions, caption_name, more_captions = caption_slots(args.caption_sources or [])
    if len(slot_names) > 1:  # K > 1 caption slots, all from the token ids
        if args.caption_sources:
            raise sources.InputError("--token-slots names several caption slots: no --caption-col/--captions with it")
        caption_name, more_captions = slot_names[0], tuple(CaptionSource(n) for n in slot_names[1:])
    elif slot_names and slot_names[0] and not args.caption_sources:
        caption_name = slot_names[0]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("alip").setLevel(logging.INFO)  # ours; open_clip's INFO lines are noise here
    opts = ConvertOptions(
        out_dir=args.out_dir,
        prefix=args.prefix,
        image_root=args.image_root,
        columns=Columns(args.image_col, text_col, caption_col, args.key_col, args.tokens_col, slots),
        captions=captions,
        caption_name=caption_name,
        more_captions=more_captions,
        tokens_npy=args.tokens_npy,
        require_caption=not args.no_caption,
        shard_records=args.shard_records,
        shard_bytes=int(args.shard_size_mb * 1e6) if args.shard_size_mb is not None else None,
        seed=args.seed,
        workers=args.workers,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        max_pixels=args.max_pixels,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    report = convert(args.inputs, opts)  # user errors (InputError, RecordIOError, ...) are alip.cli.UserErrors
    print(
        f"{report.num_records} records from {report.num_inputs} inputs in {report.seconds:.1f} s "
        f"({report.images_written / max(report.write_seconds, 1e-9):.0f} images/s while writing); "
        f"skipped {sum(report.skipped.values())}: {dict(report.skipped) or 'none'}"
    )
    print(f"meta: {report.meta_path}")
    return 0


def token_slots(spec: str | None) -> tuple[tuple[int, ...] | None, list[str | None]]:
    """--token-slots RAW[,CAPTION] or RAW,NAME=I,NAME=J,...: (slot numbers, caption slot names, None where unnamed)."""
    if spec is None:
        return None, []
    numbers, names = [], []
    for i, item in enumerate(spec.split(",")):
        name, sep, number = item.rpartition("=")
        if (sep and (i == 0 or not _SLOT_NAME.match(name))) or not number.strip().isdigit():
            raise sources.InputError(
                f"--token-slots {spec!r}: give the raw text's slot number, then the caption's (0,1), or named "
                "caption slots (0,ofa=1,llm=2)"
            )
        numbers.append(int(number))
        if i:
            names.append(name or None)
    if len(names) > 1 and not all(names):
        raise sources.InputError(f"--token-slots {spec!r}: with several caption slots, name each (0,ofa=1,llm=2)")
    return tuple(numbers), names


def _named(kind: str, value: str) -> tuple[str | None, str]:
    """(slot name or None, the column or file) of one --caption-col / --captions value."""
    name, sep, rest = value.partition("=")
    if not sep or not rest or not _SLOT_NAME.match(name) or (kind == "sidecar" and Path(value).exists()):
        return None, value
    return name, rest


def caption_slots(given: list[tuple[str, str]]) -> tuple[str | None, Path | None, str, tuple[CaptionSource, ...]]:
    """(first slot's column, its sidecar, its name, slots 2..K) from the --caption-col / --captions values.

    Unnamed values are the release's single caption (a column, a sidecar, or both: the sidecar's
    captions take precedence); named ones are caption slots, one each, in the order given."""
    named = [(kind, *_named(kind, value)) for kind, value in given]
    if not any(name for _, name, _ in named):
        columns = [v for kind, _, v in named if kind == "column"]
        sidecars = [v for kind, _, v in named if kind == "sidecar"]
        if len(columns) > 1 or len(sidecars) > 1:
            raise sources.InputError(
                "several caption sources: give each a slot name, e.g. --caption-col blip=caption_blip "
                "--captions llm=llm_captions.jsonl"
            )
        return (columns or [None])[0], Path(sidecars[0]) if sidecars else None, "caption", ()
    unnamed = [v for _, name, v in named if name is None]
    if unnamed:
        raise sources.InputError(f"caption source(s) {unnamed} have no slot name: with several, name each (NAME=...)")
    names = [name for _, name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise sources.InputError(f"caption slot name(s) {twice} given more than once")
    slots = [
        CaptionSource(name, column=v) if kind == "column" else CaptionSource(name, sidecar=Path(v))
        for kind, name, v in named
    ]
    first = slots[0]
    return first.column, first.sidecar, first.name, tuple(slots[1:])


_FLAG_OF_KIND = {
    typed_columns.IMAGE_PATH: "--image-col (with --image-root: the folder the paths are relative to)",
    typed_columns.IMAGE_BYTES: "--image-col",
    typed_columns.IMAGE_STRUCT: "--image-col",
    typed_columns.TEXT: "--text-col or --caption-col",
    typed_columns.TOKEN_IDS: "--text-col or --caption-col",
}
_CAPTION_NAME = re.compile(r"cap|synth|generated|blip|llm", re.IGNORECASE)
_KEY_NAME = re.compile(r"^(key|id|uid|sample_?id|photo_?id|__key__)$", re.IGNORECASE)


def schema_report(path: Path) -> str:
    """The columns of `path` with their kinds, and a data2rec command line guessed from them."""
    num_rows, columns = typed_columns.describe_columns(path)
    rows = f"{num_rows} rows" if num_rows is not None else "rows not counted"
    lines = [f"{path} ({rows})", f"  {'column':<24} {'type':<36} {'kind':<16} flag"]
    for c in columns:
        flag = "--tokens-npy" if path.suffix == ".npy" else _FLAG_OF_KIND.get(c.kind, "")
        if c.label_layout:
            flag = f"--tokens-col ({c.width // 77} texts of 77 ids: raw text, caption, ...; --token-slots picks)"
        if _KEY_NAME.match(c.name) and c.kind not in (*typed_columns.IMAGE_KINDS, typed_columns.IMAGE_PATH):
            flag = "--key-col"
        lines.append(f"  {c.name:<24} {c.type[:36]:<36} {c.kind:<16} {flag}")
        if c.example:
            lines.append(f"  {'':<24} e.g. {c.example}")
    if path.suffix == ".npy":
        return "\n".join(lines)
    images = [c for c in columns if c.kind in typed_columns.IMAGE_KINDS] or [
        c for c in columns if c.kind == typed_columns.IMAGE_PATH
    ]
    labels = [c for c in columns if c.label_layout]
    texts = [
        c
        for c in columns
        if c.kind in (typed_columns.TEXT, typed_columns.TOKEN_IDS)
        and not c.label_layout
        and not _KEY_NAME.match(c.name)
    ]
    captions = [c for c in texts if _CAPTION_NAME.search(c.name)]
    raws = [c for c in texts if c not in captions]
    keys = [c for c in columns if _KEY_NAME.match(c.name)]
    cmd = ["python", "tools/data2rec.py", str(path)]
    if images:
        cmd += ["--image-col", images[0].name]
        if images[0].kind == typed_columns.IMAGE_PATH:
            cmd += ["--image-root", "IMAGE_FOLDER"]
    if labels:
        cmd += ["--tokens-col", labels[0].name]
    elif raws:
        cmd += ["--text-col", raws[0].name]
    if captions and not labels:
        cmd += ["--caption-col", captions[0].name]
    elif not labels:
        cmd += ["--no-caption"]
    if keys:
        cmd += ["--key-col", keys[0].name]
    cmd += ["--out-dir", "OUT_DIR"]
    lines.append("suggested (check which column is the raw text and which the caption):")
    lines.append("  " + shlex.join(cmd))
    if not images:
        lines.append("  no image column found: images must be paths (strings), binary, or {bytes, path} structs")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(guarded(main)())
