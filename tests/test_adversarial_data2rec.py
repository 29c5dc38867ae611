"""The adversarial sweep of issue 17, data2rec's part: each case failed before its fix.

Hostile or careless inputs (hand-written TSVs, float TIFFs, huge PNGs), a worker killed from
outside, two runs on one folder, a rerun after fixing images. Every input row must end up as a
record or a reported skip, and no run may hang.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_factory import PHOTOS, jpeg_bytes, photo

from alip.data.format import schema
from alip.data.format.images import BadImage, prepare_image
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.shard_plan import index_inputs, plan_shards
from alip.data.ingest.sources import Columns, InputError
from alip.files import FolderLock

ROOT = Path(__file__).resolve().parents[1]
DATA2REC = [sys.executable, str(ROOT / "tools/data2rec.py")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small real photos, good0.jpg .. good5.jpg."""
    d = tmp_path_factory.mktemp("images")
    for i, name in enumerate(PHOTOS):
        small = Image.fromarray(photo(name)).resize((64, 64))
        (d / f"good{i}.jpg").write_bytes(jpeg_bytes(np.asarray(small)))
    return d


def opts_for(out, image_root, **kw):
    kw.setdefault("columns", Columns(caption="caption"))
    return ConvertOptions(out_dir=out, image_root=image_root, workers=1, progress=False, **kw)


def texts_by_image(meta_path):
    """{image file name: its texts entry} over all shards of a run."""
    out = {}
    for shard in schema.resolve_shards(meta_path):
        for line in Path(shard.texts).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            out[Path(entry["source"]).name] = entry
    return out


def skips_of(out_dir):
    return [json.loads(line) for line in (out_dir / "train.skipped.jsonl").read_text().splitlines()]


def run_data2rec(*args, timeout=180):
    """data2rec in its own process group, killed with its workers if it outlives `timeout`."""
    proc = subprocess.Popen(
        [*DATA2REC, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"data2rec {' '.join(map(str, args))} still running after {timeout} s: it hangs")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------- item 1: manifests, every row counted


def test_tsv_is_read_literally_and_a_row_with_a_tab_in_its_text_is_a_reported_skip(images, tmp_path):
    manifest = tmp_path / "hand.tsv"
    manifest.write_text(
        "image\ttext\tcaption\n"
        'good0.jpg\t"a stray quote opens this text\tcaption 0\n'  # CSV quoting would swallow the next rows
        "good1.jpg\ttext 1\tcaption 1\n"
        'good2.jpg\ttext 2 says "hi"\tcaption 2\n'
        "good3.jpg\ta tab\tinside the text\tcaption 3\n"  # 4 fields: the caption column would shift
        "\n"
        "good4.jpg\ttext 4\tcaption 4\r\n",
        encoding="utf-8",
    )
    report = convert([manifest], opts_for(tmp_path / "out", images))
    got = texts_by_image(report.meta_path)
    assert got.keys() == {"good0.jpg", "good1.jpg", "good2.jpg", "good4.jpg"}
    assert got["good0.jpg"]["raw_text"] == '"a stray quote opens this text'
    assert got["good2.jpg"]["raw_text"] == 'text 2 says "hi"' and got["good4.jpg"]["caption"] == "caption 4"
    [skip] = skips_of(tmp_path / "out")
    assert skip["source"] == "hand.tsv row 3"
    assert skip["reason"].startswith("line 5: 4 tab-separated fields, the header has 3")
    assert report.num_inputs == 5 and report.num_records + len(skips_of(tmp_path / "out")) == 5


def test_csv_keeps_quoting_reports_wrong_field_counts_and_refuses_broken_quoting(images, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image,text,caption\n"
        'good0.jpg,"quoted, with a comma\nand a line break",caption 0\n'
        "good1.jpg,an unquoted text, with a comma,caption 1\n"  # 4 fields
        "good2.jpg,text 2,caption 2\n",
        encoding="utf-8",
    )
    report = convert([manifest], opts_for(tmp_path / "out", images))
    got = texts_by_image(report.meta_path)
    assert got.keys() == {"good0.jpg", "good2.jpg"}
    assert got["good0.jpg"]["raw_text"] == "quoted, with a comma\nand a line break"
    [skip] = skips_of(tmp_path / "out")
    assert skip["source"] == "m.csv row 1" and skip["reason"] == "line 4: 4 comma-separated fields, the header has 3"

    broken = tmp_path / "broken.csv"
    broken.write_text('image,text,caption\ngood0.jpg,"stray quote,caption 0\ngood1.jpg,"text 1",caption 1\n')
    with pytest.raises(InputError, match=r"broken.csv: line \d+: malformed CSV quoting"):
        convert([broken], opts_for(tmp_path / "out2", images))


def test_jsonl_line_that_is_not_an_object_is_a_reported_skip(images, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"image": "good0.jpg", "text": "t0", "caption": "c0"}),
        json.dumps(["good1.jpg", "t1", "c1"]),
        json.dumps("good2.jpg"),
        "null",
        json.dumps({"image": "good3.jpg", "text": "t3", "caption": "c3"}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    report = convert([manifest], opts_for(tmp_path / "out", images))
    assert texts_by_image(report.meta_path).keys() == {"good0.jpg", "good3.jpg"}
    reasons = {s["source"]: s["reason"] for s in skips_of(tmp_path / "out")}
    assert reasons == {
        "m.jsonl row 1": "line 2 is an array, not a JSON object",
        "m.jsonl row 2": "line 3 is a string, not a JSON object",
        "m.jsonl row 3": "line 4 is null, not a JSON object",
    }
    assert report.num_records + len(reasons) == report.num_inputs == 5


# ---------------------------------------------------------------- items 6 and 9: images that are hard to convert


def tiff_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def stored_gray(data, **kw):
    """The shard's JPEG of `data`, decoded to one gray channel."""
    prepared = prepare_image(data, **kw)
    rgb = np.asarray(Image.open(io.BytesIO(prepared.jpeg)).convert("RGB")).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() <= 2  # gray stays gray
    return rgb[..., 0]


RAMP = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (32, 1))  # [32, 64], left black, right white


@pytest.mark.parametrize(
    "name, array",
    [
        ("float in 0..1", RAMP),
        ("float of any range", RAMP * 1000 - 300),
        ("16-bit", (RAMP * 65535).round().astype(np.uint16)),
        ("32-bit integer", (RAMP * 1e6).astype(np.int32)),
    ],
)
def test_high_depth_tiffs_are_scaled_to_8_bits_not_clipped(name, array):
    data = tiff_bytes(array)
    assert Image.open(io.BytesIO(data)).mode in ("F", "I;16", "I")  # what PIL makes of these files
    gray = stored_gray(data, quality=100)
    assert np.abs(gray - np.rint(RAMP * 255)).max() <= 3, name  # the ramp survives: not all black


def test_float_tiff_with_nan_is_a_skip():
    array = RAMP.copy()
    array[0, 0] = np.nan
    with pytest.raises(BadImage, match="NaN or infinite"):
        prepare_image(tiff_bytes(array))


def test_image_too_wide_for_jpeg_is_a_skip_not_an_abort(images, tmp_path):
    buf = io.BytesIO()
    Image.new("L", (70000, 2), 128).save(buf, format="PNG")
    (tmp_path / "wide.png").write_bytes(buf.getvalue())
    for name in ("good0.jpg", "good1.jpg"):
        (tmp_path / name).write_bytes((images / name).read_bytes())
    rows = [{"image": n, "text": n, "caption": n} for n in ("good0.jpg", "wide.png", "good1.jpg")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = convert([manifest], opts_for(tmp_path / "out", tmp_path))
    assert texts_by_image(report.meta_path).keys() == {"good0.jpg", "good1.jpg"}
    [skip] = skips_of(tmp_path / "out")
    assert skip["reason"].startswith("too large for JPEG: 70000x2 (at most 65500 pixels a side)")
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert prepare_image(buf.getvalue(), max_side=1000).width == 1000  # --max-side makes it fit


def test_any_jpeg_encoding_error_is_a_skip_with_its_reason(monkeypatch):
    def failing_save(self, fp, format=None, **params):
        raise OSError("encoder error -2 when writing image file")

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(BadImage, match="^cannot convert to JPEG: encoder error -2"):
        prepare_image(png.getvalue())


# ---------------------------------------------------------------- item 8: a worker killed from outside


def workers_of(pid):
    """PIDs of the multiprocessing workers that process `pid` spawned (from /proc: no psutil)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(d.name))
    return found


def reading(pid, path):
    try:
        return any(os.readlink(fd) == os.path.realpath(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False  # the process ended while we looked


def shard_of(image, manifest, opts):
    """The stem of the shard that data2rec plans for `image`."""
    samples, _ = index_inputs([manifest], opts)
    return next(t.stem for t in plan_shards(samples, opts) if any(Path(s.image).name == image for _, s in t.items))


@pytest.mark.slow
def test_killed_worker_fails_fast_naming_its_shard_and_a_rerun_finishes(images, tmp_path):
    """A worker blocks on a FIFO 'image', so it is surely mid-shard, and is killed with SIGKILL."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(12):
        (img / f"{i}.jpg").symlink_to(images / f"good{i % 6}.jpg")
        rows.append({"image": f"{i}.jpg", "text": f"text {i}", "caption": f"caption {i}"})
    fifo = img / "slow.jpg"
    os.mkfifo(fifo)
    rows.append({"image": "slow.jpg", "text": "slow", "caption": "slow"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = [manifest, "--image-root", img, "--caption-col", "caption", "--out-dir", out]
    args += ["--shard-records", "3", "--no-progress"]
    stuck_shard = shard_of("slow.jpg", manifest, opts_for(out, img, shard_records=3))

    proc = subprocess.Popen(
        [*DATA2REC, *map(str, args), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        writer, stuck = None, []
        while not stuck:  # the write end opens once a worker opens the FIFO to read; then find that worker
            assert proc.poll() is None and time.monotonic() < deadline, "data2rec never read the FIFO"
            time.sleep(0.05)
            try:
                writer = writer or os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            stuck = [w for w in workers_of(proc.pid) if reading(w, fifo)]
        os.kill(stuck[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # before the fix, multiprocessing.Pool waited forever here
        os.close(writer)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "a worker process ended abruptly" in err and "rerun the same command to resume" in err
    assert "not finished:" in err and stuck_shard in err

    fifo.unlink()  # the rerun may read a real image there
    (img / "slow.jpg").write_bytes((images / "good0.jpg").read_bytes())
    res = run_data2rec(*args, "--workers", "1")  # as the message advises: fewer workers
    assert res.returncode == 0, res.stderr
    got = texts_by_image(out / "train.meta.json")
    assert len(got) == 13 and "slow.jpg" in got


# ---------------------------------------------------------------- item 10: one run per output folder


def test_second_run_on_a_locked_folder_is_refused_with_the_holder(images, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "good0.jpg", "text": "t", "caption": "c"}) + "\n")
    out = tmp_path / "out"
    with FolderLock(out, "data2rec"):  # this test process plays the first run
        res = run_data2rec(manifest, "--image-root", images, "--caption-col", "caption", "--out-dir", out)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.startswith(f"error: {out} is in use by data2rec (PID {os.getpid()} on host ")
        assert not (out / "train.plan.json").exists()  # refused before touching anything
    report = convert([manifest], opts_for(out, images))  # the lock went with its holder
    assert report.num_records == 1


# ---------------------------------------------------------------- item 16: reruns see changed image files


def test_rerun_after_fixing_a_bad_image_redoes_its_shard_and_overwrite_redoes_all(images, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(6):
        (img / f"{i}.jpg").write_bytes((images / f"good{i}.jpg").read_bytes())
        rows.append({"image": f"{i}.jpg", "text": f"text {i}", "caption": f"caption {i}"})
    (img / "3.jpg").write_bytes(b"not a jpeg at all")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    first = convert([manifest], opts_for(out, img, shard_records=2))
    assert first.num_records == 5 and [Path(s["source"]).name for s in skips_of(out)] == ["3.jpg"]

    (img / "3.jpg").write_bytes((images / "good3.jpg").read_bytes())  # fixed: another size and mtime
    fixed = convert([manifest], opts_for(out, img, shard_records=2))  # the same command again
    assert fixed.num_records == 6 and not skips_of(out) and "3.jpg" in texts_by_image(fixed.meta_path)
    assert fixed.images_written == 2  # only the shard of the fixed image was redone

    again = convert([manifest], opts_for(out, img, shard_records=2, overwrite=True))
    assert again.num_records == 6 and again.images_written == 6  # --overwrite redoes everything


# ---------------------------------------------------------------- item 14: user errors are one line, exit 2


def test_bad_option_is_one_line_with_exit_2_and_debug_shows_the_traceback(images, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "good0.jpg", "text": "t", "caption": "c"}) + "\n")
    args = [manifest, "--image-root", images, "--caption-col", "caption", "--out-dir", tmp_path / "out"]
    res = run_data2rec(*args, "--shard-size-mb", "0")
    assert res.returncode == 2 and res.stderr == "error: shard_bytes must be >= 1, got 0\n"
    res = run_data2rec(*args, "--max-pixels", "0", "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "max_pixels must be >= 1" in res.stderr
