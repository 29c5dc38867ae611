"""Adversarial sweep, corrupt shards (issue 17, items 12 and 13): damage the start-up preflight
cannot see — a flipped bit in a label, an undecodable JPEG, a changed file — is named by the
loaders (shard and record key) and listed by the deep check."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alip.data.format import schema
from alip.data.format.recordio import IR_SIZE, RecordIOError, read_idx
from alip.data.loaders.config import LoaderConfig
from alip.data.loaders.preflight import prepare_shards
from alip.data.loaders.torch_loader import TorchLoader

ROOT = Path(__file__).resolve().parents[1]
IMAGE_AT = IR_SIZE + 4 * schema.LABEL_LENGTH  # the JPEG follows the IRHeader and the 154 floats
NOT_A_JPEG = b"\xff\xd8" + bytes(40)  # keeps the size, so the framing (all the preflight reads) stays intact


def label_at(position: int) -> int:
    return IR_SIZE + 4 * position


def damaged_copy(shards, out: Path, key: int, at: int, data: bytes) -> tuple[Path, Path]:
    """A copy of the test shards with bytes of record `key` overwritten in place, `at` bytes into its
    payload; returns (meta JSON, the damaged .rec)."""
    shutil.copytree(shards.meta.parent, out)
    meta = out / shards.meta.name
    for info in schema.resolve_shards(meta):
        offsets = dict(read_idx(info.idx))
        if key in offsets:
            with open(info.rec, "r+b") as f:
                f.seek(offsets[key] + 8 + at)  # past the record's 8-byte frame header
                f.write(data)
            return meta, Path(info.rec)
    raise KeyError(key)


def config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 4, "image_size": 32, "num_threads": 1, "num_workers": 0, **kw})


def inspect(*args):
    cmd = [sys.executable, str(ROOT / "tools" / "inspect_rec.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------- item 12: corrupt token floats


def test_token_fault_reads_the_floats_before_the_int_cast():
    labels = np.zeros((3, schema.LABEL_LENGTH), np.float32)
    assert schema.token_fault(labels) is None
    for value, shown in (
        (-1003.0, "-1003.0"),
        (np.nan, "nan"),
        (np.inf, "inf"),
        (1000.5, "1000.5"),
        (49408, "49408.0"),
    ):
        labels[1, 80] = value
        assert schema.token_fault(labels) == (1, f"caption token 3 is {shown}, not a token id (an integer in 0..49407)")
    with pytest.raises(schema.TokenError, match="caption token 3 is 49408.0") as e:
        schema.decode_label(labels)
    assert e.value.row == 1


@pytest.mark.parametrize("value, what", [(-1003.0, "raw text token 1 is -1003.0"), (np.nan, "raw text token 1 is nan")])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_torch_loader_names_the_shard_and_record_of_a_bad_token(shards, tmp_path, value, what, num_workers):
    meta, rec = damaged_copy(shards, tmp_path / "s", 13, label_at(1), np.float32(value).tobytes())
    prepare_shards(meta)  # the start-up preflight reads frame headers only: it cannot see this
    loader = TorchLoader(meta, config(num_workers=num_workers), train=False)
    with pytest.raises(RecordIOError) as e:
        list(loader)
    message = str(e.value)
    assert f"{rec}: record key 13: {what}" in message and "inspect_rec.py --check --deep" in message
    assert "\n" not in message  # one line, also when the record was read in a worker process
    loader.close()


def test_dali_loader_names_the_shard_and_record_of_a_bad_token(shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    from alip.data.loaders.dali import DaliLoader

    meta, rec = damaged_copy(shards, tmp_path / "s", 13, label_at(78), np.float32(-1003.0).tobytes())
    loader = DaliLoader(meta, config(), train=False, device="cpu")
    with pytest.raises(RecordIOError, match=rf"{rec}: record key 13 at byte \d+: caption token 1 is -1003\.0"):
        list(loader)
    loader.close()


# ---------------------------------------------------------------- item 13: undecodable JPEGs, checksums


def test_dali_decode_failure_names_the_shards_and_the_deep_check(shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    from alip.data.loaders.dali import DaliLoader

    meta, rec = damaged_copy(shards, tmp_path / "s", 13, IMAGE_AT, NOT_A_JPEG)
    loader = DaliLoader(meta, config(), train=False, device="cpu")
    with pytest.raises(RecordIOError) as e:
        list(loader)
    message = str(e.value)
    assert str(rec) in message and "nvImageCodec" in message and "inspect_rec.py --check --deep" in message
    loader.close()


def test_torch_loader_names_an_undecodable_image(shards, tmp_path):
    meta, rec = damaged_copy(shards, tmp_path / "s", 13, IMAGE_AT, NOT_A_JPEG)
    with pytest.raises(RecordIOError, match=rf"{rec}: record key 13: corrupt or unreadable image"):
        list(TorchLoader(meta, config(), train=False))


def test_deep_check_lists_every_damaged_record_and_verifies_checksums(shards, tmp_path):
    meta, rec = damaged_copy(shards, tmp_path / "s", 13, IMAGE_AT, NOT_A_JPEG)
    with open(rec, "r+b") as f:  # two more records of the same shard: a bad token, a lost start token
        for key, at, value in ((14, label_at(2), np.nan), (15, label_at(0), 5.0)):
            f.seek(dict(read_idx(rec.with_suffix(".idx")))[key] + 8 + at)
            f.write(np.float32(value).tobytes())
    found = schema.deep_check_shard(schema.resolve_shards(meta)[1])
    assert found.checksum == "mismatch" and found.num_problems == 4
    assert found.problems[0].startswith(f"{rec}: sha256 ") and "the meta JSON says" in found.problems[0]
    assert found.problems[1:] == [
        f"{rec}: record key 13: corrupt or unreadable image: cannot identify image file",
        f"{rec}: record key 14: raw text token 2 is nan, not a token id (an integer in 0..49407)",
        f"{rec}: record key 15: raw text starts with token 5, not the start token 49406",
    ]
    res = inspect(meta, "--check", "--deep", "--workers", "2")
    assert res.returncode == 1, res.stderr  # the check ran and found damage: 1, not a usage error
    assert "FAIL" in res.stdout and "record key 15" in res.stdout and "2/3 shards ok" in res.stdout
    assert "checksum verified, every label and image good" in res.stdout  # the other shards
    # the loaders' opt-in: the same check at start, refusing with the first problem
    with pytest.raises(RecordIOError, match=r"deep check: 4 problem\(s\) in .*train-00001\.rec, the first: .*sha256"):
        TorchLoader(meta, config(deep_check=True))


def test_deep_check_passes_good_shards_and_the_official_release():
    from shard_factory import OFFICIAL_REC

    res = inspect(OFFICIAL_REC, "--check", "--deep")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "7 records" in res.stdout and "not verified: no checksum" in res.stdout and "1/1 shards ok" in res.stdout


def test_training_with_data_deep_check_refuses_damaged_shards_at_start(shards, tmp_path, capsys):
    from alip.train.__main__ import main

    meta, rec = damaged_copy(shards, tmp_path / "s", 13, IMAGE_AT, NOT_A_JPEG)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    argv = [str(tiny), f"data.train={meta}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    assert main([*argv, "data.deep_check=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deep check: 2 problem(s)" in err and str(rec) in err  # checksum + image
