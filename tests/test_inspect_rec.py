"""tools/inspect_rec.py through its command line."""

import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from shard_factory import FIXTURES, OFFICIAL

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    cmd = [sys.executable, str(ROOT / "tools" / "inspect_rec.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def squash(text: str) -> str:
    """CLIP's decode lowercases and puts spaces between BPE words: compare without them."""
    return "".join(text.lower().split())


def test_dump_writes_images_and_decoded_texts(tmp_path):
    res = run(FIXTURES / "alip_official.rec", "-n", "7", "--dump", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "img _ 2 0 9 3 . jpg" in res.stdout  # record 1's raw text "IMG_2093.JPG"
    for i, sample in enumerate(OFFICIAL):  # keys are 0..6 in the fixture
        with Image.open(tmp_path / f"{i}.jpg") as im:
            h, w, _ = sample["image_shape_hwc"]
            assert im.format == "JPEG" and im.size == (w, h)
        raw_line, caption_line = (tmp_path / f"{i}.txt").read_text(encoding="utf-8").splitlines()
        assert squash(caption_line) == "caption:" + squash(sample["caption"])
        if i != 5:  # record 5's raw text is longer than 77 tokens: truncated
            assert squash(raw_line) == "raw:" + squash(sample["raw_text"])


def test_check_reports_counts_and_failures(tmp_path):
    res = run(FIXTURES / "alip_official.rec", "--check")
    assert res.returncode == 0, res.stderr
    assert "7 records" in res.stdout and "1/1 shards ok" in res.stdout
    shutil.copy(FIXTURES / "alip_official.idx", tmp_path / "cut.idx")
    (tmp_path / "cut.rec").write_bytes((FIXTURES / "alip_official.rec").read_bytes()[:200_000])
    res = run(tmp_path / "cut.rec", "--check")
    assert res.returncode == 1
    assert "FAIL" in res.stdout and "cut.rec" in res.stdout and "0/1 shards ok" in res.stdout


def test_help_and_missing_input():
    res = run("--help")
    assert res.returncode == 0 and "--dump" in res.stdout and "--check" in res.stdout
    res = run("/nonexistent/train-*.rec")  # a usage error (2), not a failed check (1)
    assert res.returncode == 2 and "no .rec files match" in res.stderr and "Traceback" not in res.stderr
