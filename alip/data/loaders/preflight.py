"""What a reader checks before it trusts a set of shards (the loaders, `alip score`, `alip filter`).

`prepare_dataset` resolves what the user named (meta JSON, folder, .rec glob, .rec) and checks every
shard: quickly by default, every record's framing with `full`, every byte with `deep`. A bad shard
fails here, with the file named, instead of inside a DALI worker thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, ShardCheck, check_shard, quick_check_shard

logger = logging.getLogger(__name__)


def _deep_checked(info: schema.ShardInfo, slots: schema.TextSlots) -> ShardCheck:
    found = schema.deep_check_shard(info, keep=1, slots=slots)
    if found.num_problems:
        raise RecordIOError(
            f"deep check: {found.num_problems} problem(s) in {found.shard.rec_path}, the first: "
            f"{found.problems[0]}; {schema.DEEP_CHECK_HINT}"
        )
    return found.shard


def prepare_shards(
    spec: str | Path | list[str | Path], preflight: bool = True, deep: bool = False, full: bool = False
) -> list[ShardCheck]:
    """`prepare_dataset` without the texts (every caller that reads K = 1 labels only)."""
    return prepare_dataset(spec, preflight, deep, full)[0]


def prepare_dataset(
    spec: str | Path | list[str | Path], preflight: bool = True, deep: bool = False, full: bool = False
) -> tuple[list[ShardCheck], schema.TextSlots]:
    """Resolve `spec` (see schema.resolve_dataset) and check every shard before a loader trusts it.

    Returns the checked shards and the texts of their labels (the meta JSON's "texts", else the
    label length of the records), on which all shards must agree.
    With `preflight`, each shard goes through `quick_check_shard` (sizes and record counts against
    the meta JSON, the .idx against the .rec's size, three records' framing and label length),
    so a bad shard fails here with the file named instead of inside a DALI worker thread. `full`
    runs `check_shard` instead (every record's framing), `deep` runs `schema.deep_check_shard`
    (the full check plus checksums, every label, every image decoded: it reads everything).
    Shards without records are dropped (DALI's RecordIO index cannot represent an empty file
    between two others). Raises FileNotFoundError / ValueError / RecordIOError.
    """
    resolved = schema.resolve_dataset(spec)
    slots = schema.agreed_slots(resolved)
    shards = []
    for info, named in resolved:
        try:
            checked = _check_one(info, slots, preflight, deep, full)
        except RecordIOError as e:
            if named is None or "floats, expected" not in str(e):
                raise
            # a label length that disagrees with the meta JSON: say what the meta JSON promised
            raise RecordIOError(f"{e}: the meta JSON names {len(slots.names)} texts {list(slots.names)}") from None
        if checked.num_records == 0:
            logger.warning("skipping empty shard %s", checked.rec_path)
            continue
        shards.append(checked)
    if not shards:
        raise RecordIOError(f"no records in the shards of {spec}")
    return shards, slots


def _check_one(info: schema.ShardInfo, slots: schema.TextSlots, preflight: bool, deep: bool, full: bool) -> ShardCheck:
    length = slots.label_length
    if deep:
        return _deep_checked(info, slots)
    if full:
        return check_shard(info.rec, info.idx, label_length=length, expected_records=info.records)
    if preflight:
        return quick_check_shard(info.rec, info.idx, length, expected_records=info.records, expected_bytes=info.bytes)
    # Only the record count, from the .idx: the cheapest thing a loader cannot do without.
    with open(info.idx, encoding="ascii") as f:
        count = sum(1 for line in f if line.strip())
    return ShardCheck(Path(info.rec), Path(info.idx), count, Path(info.rec).stat().st_size)
