"""Small shards in the real on-disk format for loader tests: real photos (skimage.data), known tokens.

Written with alip.data.format.recordio + alip.data.format.schema directly (not through data2rec), so loader tests
do not depend on the converter.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from alip.data.format import schema
from alip.data.format.recordio import RecordIOWriter

FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"
OFFICIAL_REC = FIXTURES / "alip_official.rec"  # written by MXNet 1.9.1 in the original release's layout
# its per-record texts, token lists and image shapes
OFFICIAL = json.loads((FIXTURES / "alip_official_samples.json").read_text(encoding="utf-8"))

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera"]


def photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class TestShards:
    meta: Path
    keys: list[int]
    raw_tokens: dict[int, np.ndarray]  # key -> [77]
    caption_tokens: dict[int, np.ndarray]
    jpegs: dict[int, bytes]


def write_test_shards(out_dir: Path, num_records: int = 24, per_shard: int = 10, prefix: str = "train") -> TestShards:
    """`num_records` records over ceil(num_records / per_shard) shards, plus the meta JSON.

    Record k: photo PHOTOS[k % 6] (JPEG, quality 95), raw tokens [49406, 1000 + k, 49407, 0...],
    caption tokens [49406, 2000 + k, 3000 + k % 6, 49407, 0...]: every record is identifiable
    from its tokens alone.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = {name: jpeg_bytes(photo(name)) for name in PHOTOS}
    result = TestShards(schema.meta_path(out_dir, prefix), [], {}, {}, {})
    shards = []
    for first in range(0, num_records, per_shard):
        stem = schema.shard_stem(prefix, len(shards))
        rec, idx = out_dir / f"{stem}.rec", out_dir / f"{stem}.idx"
        with RecordIOWriter(rec, idx) as w:
            for key in range(first, min(first + per_shard, num_records)):
                raw = np.zeros(77, np.int64)
                raw[:3] = [49406, 1000 + key, 49407]
                cap = np.zeros(77, np.int64)
                cap[:4] = [49406, 2000 + key, 3000 + key % len(PHOTOS), 49407]
                jpeg = encoded[PHOTOS[key % len(PHOTOS)]]
                w.write(key, schema.make_record(key, jpeg, raw, cap))
                result.keys.append(key)
                result.raw_tokens[key], result.caption_tokens[key], result.jpegs[key] = raw, cap, jpeg
            count = w.count
        shards.append(
            schema.ShardInfo(
                rec.name, idx.name, count, rec.stat().st_size, hashlib.sha256(rec.read_bytes()).hexdigest()
            )
        )
    meta = schema.DatasetMeta(shards=shards, tokenizer={"name": "test tokens"}, source={"kind": "test"})
    schema.write_meta(result.meta, meta)
    return result


def read_packed(meta_path: str | Path, by: str) -> dict[str, tuple]:
    """{texts-sidecar entry[by]: (record key, raw ids [77], caption ids [77], jpeg, entry)} over all
    shards of a data2rec output, each shard fully checked and its sidecar matched record by record."""
    from alip.data.format.recordio import RecordIOReader, check_shard

    out = {}
    for shard in schema.resolve_shards(meta_path):
        check_shard(shard.rec, shard.idx, label_length=154, expected_records=shard.records)
        texts = [json.loads(line) for line in Path(shard.texts).read_text().splitlines()]
        with RecordIOReader(shard.rec, shard.idx) as reader:
            for (key, record), entry in zip(reader, texts, strict=True):
                k, raw, cap, jpeg = schema.parse_record(record)
                assert k == key == entry["key"]
                out[entry[by]] = (key, raw, cap, jpeg, entry)
    return out


def take_batches(loader, n: int) -> list[dict]:
    """The next `n` batches of a loader, over epoch ends; a loop left early continues where it stopped
    (what a resumed loader is compared on)."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    """Two runs of a loader gave bitwise the same images, texts and captions, batch by batch."""
    import torch  # the factory itself needs no torch

    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        for k in ("image", "text", "caption"):
            assert torch.equal(a[k], b[k]), f"batch {i} differs in {k}"


def memory_per_row(fn, n: int) -> tuple[float, float]:
    """(bytes held after, peak bytes during) `fn()` per row, as tracemalloc counts them (NumPy included):
    how the index tests bound what a stage costs per sample without timing anything."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        kept = fn()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return held / n, peak / n
