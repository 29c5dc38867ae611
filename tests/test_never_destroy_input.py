"""No command destroys what it reads, and --overwrite removes only what the tool wrote (issue 21).

For every command that writes a folder or a file beside its inputs (data2rec, the caption tool, the
trainer, alip score, alip filter, the export), the output is placed on its inputs: equal to one,
inside one, holding them, through a symlink and through `..`, with and without --overwrite. Each is
refused with exit status 2 and one `error:` line naming both paths, and every input file is
byte-identical afterwards (sha256). A stranger's file in the output folder is never deleted nor
written over: a refusal names it, and --overwrite leaves it where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import PHOTOS, jpeg_bytes, photo
from test_adversarial_cli import tool

import alip
from alip.cli import guarded
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns
from alip.score import score_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
NUM = 12


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the lock file aside: a lock holds no data)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".alip.lock"
    }


def refused(capsys, call, argv: list, *named: str) -> None:
    """`call(argv)` (a guarded main) exits 2 with one `error:` line, the last, naming each of `named`."""
    status = call([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and lines == err.splitlines()[-1:] and "Traceback" not in err, err
    for text in named:
        assert str(text) in lines[0], (text, lines[0])


def unchanged(before: dict[str, str], root: Path) -> None:
    after = digests(root)
    assert {k: after.get(k) for k in before} == before, "an input or a stranger's file changed"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """D/manifest.jsonl, D/img/*.jpg, D/shards (data2rec's, 3 shards), D/ckpt.pt (an ALIP-Tiny training
    checkpoint), D/scores.csv (its scores of the shards)."""
    d = tmp_path_factory.mktemp("world")
    (d / "img").mkdir()
    rows = []
    for i in range(NUM):
        small = np.asarray(Image.fromarray(photo(PHOTOS[i % len(PHOTOS)])).resize((48, 48)))
        (d / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(small))
        rows.append({"key": f"k{i}", "image": f"{i}.jpg", "text": f"raw text {i}", "caption": f"a photo {i}"})
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cols = Columns(caption="caption", key="key")
    opts = ConvertOptions(out_dir=d / "shards", columns=cols, image_root=d / "img", shard_records=5, workers=1)
    meta = convert([d / "manifest.jsonl"], opts).meta_path
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    ckpt = d / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "loss": {f"gates.ema_{k}": torch.tensor(0.5) for k in ("tc", "it", "ic")},
            "config": {"model": {"name": "ALIP-Tiny"}, "loss": {"power": 2.0, "pair_gate": "official"}},
        },
        ckpt,
    )
    score_shards(ckpt, meta, device="cpu", progress=False).write(d / "scores.csv")
    return d


# ---------------------------------------------------------------- data2rec


def data2rec_argv(d: Path, out: Path, *extra) -> list:
    return [d / "manifest.jsonl", "--image-root", d / "img", "--caption-col", "caption", "--key-col", "key",
            "--out-dir", out, "--workers", "1", "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    ("where", "relation"),
    [
        ("img", "is the input --image-root"),
        ("img/out", "lies inside the input --image-root"),
        (".", "contains the input"),
        ("img/../img", "is the input --image-root"),
        ("link-to-img", "is the input --image-root"),
    ],
    ids=["equal", "inside", "holding", "dotdot", "symlink"],
)
def test_data2rec_refuses_an_output_on_its_inputs(world, tmp_path, capsys, where, relation, overwrite):
    d = tmp_path / "d"
    d.mkdir()
    (d / "img").mkdir()
    for p in (world / "img").iterdir():
        (d / "img" / p.name).write_bytes(p.read_bytes())
    (d / "manifest.jsonl").write_bytes((world / "manifest.jsonl").read_bytes())
    (d / "img" / "train-00000.rec").write_bytes(b"a stranger's file with a data2rec name")
    os.symlink(d / "img", d / "link-to-img")
    before = digests(d)
    main = guarded(tool("data2rec").main)
    refused(capsys, main, data2rec_argv(d, d / where, *(["--overwrite"] if overwrite else [])), relation)
    unchanged(before, d)
    assert not (d / "img" / ".alip.lock").exists() and not (d / "img" / "out").exists()  # nothing written


def test_data2rec_overwrite_removes_only_its_own_files(world, tmp_path, capsys, caplog):
    """The issue's second case: a user's train-00000.rec.bak beside data2rec's shards survives --overwrite;
    a stranger's file under a name data2rec would write refuses the run before anything is deleted."""
    out = tmp_path / "out"
    main = guarded(tool("data2rec").main)
    assert main([str(a) for a in data2rec_argv(world, out, "--shard-records", "4")]) == 0
    (out / "train-00000.rec.bak").write_bytes((out / "train-00000.rec").read_bytes())
    keep = digests(world) | {"bak": hashlib.sha256((out / "train-00000.rec.bak").read_bytes()).hexdigest()}
    # other options, no --overwrite: refused, naming the reason
    refused(capsys, main, data2rec_argv(world, out, "--shard-records", "6"), "other inputs or options", "--overwrite")
    # --overwrite: data2rec's own files go (3 shards of 4), the stranger's stays, byte for byte
    with caplog.at_level("INFO", logger="alip.data.ingest.convert"):
        assert main([str(a) for a in data2rec_argv(world, out, "--shard-records", "6", "--overwrite")]) == 0
    said = [r.getMessage() for r in caplog.records if "--overwrite" in r.getMessage()]
    # 3 shards x (.rec, .idx, .texts.jsonl, .done.json) + meta, plan, skip report; said before acting
    assert said[0].startswith("--overwrite: removing 15 file(s) data2rec wrote earlier: train-00000.done.json"), said
    assert "leaves 1 file(s) data2rec did not write: train-00000.rec.bak" in said[1], said
    assert hashlib.sha256((out / "train-00000.rec.bak").read_bytes()).hexdigest() == keep.pop("bak")
    assert sorted(p.name for p in out.glob("train-*.rec")) == ["train-00000.rec", "train-00001.rec"]
    assert not (out / "train-00002.rec").exists()  # the earlier plan's third shard, removed as its own
    unchanged(keep, world)
    # a stranger under a name the new plan writes: refused before anything is deleted
    (out / "train-00002.idx").write_text("not data2rec's")
    snapshot = digests(out)
    refused(capsys, main, data2rec_argv(world, out, "--shard-records", "4", "--overwrite"), "train-00002.idx")
    unchanged(snapshot, out)


def test_data2rec_refusal_names_the_strangers(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.rec").write_text("someone else's shard")
    before = digests(out)
    refused(
        capsys, guarded(tool("data2rec").main), data2rec_argv(world, out), "not made by data2rec", "train-00000.rec"
    )
    unchanged(before, out)


# ---------------------------------------------------------------- alip filter


def filter_argv(shards, out, scores, *extra) -> list:
    return ["--scores", scores, "--shards", shards, "--out-dir", out, "--keep-fraction", "0.5", "--no-progress",
            *extra]  # fmt: skip


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    ("shards", "where", "relation"),
    [
        ("shards/train.meta.json", "shards", "contains the input --shards"),  # the first case
        ("shards", "shards", "is the input --shards"),
        ("shards", "shards/sub", "lies inside the input --shards"),
        ("shards/train.meta.json", ".", "contains the input"),
        ("shards/train.meta.json", "link/../shards", "contains the input --shards"),
    ],
    ids=["holding-meta", "equal", "inside", "holding-all", "dotdot"],
)
def test_filter_refuses_an_output_on_its_inputs(world, tmp_path, capsys, shards, where, relation, overwrite):
    d = tmp_path / "d"
    (d / "shards").mkdir(parents=True)
    for p in (world / "shards").glob("train*"):  # not data2rec's lock file: the filter must not leave one
        (d / "shards" / p.name).write_bytes(p.read_bytes())
    (d / "scores.csv").write_bytes((world / "scores.csv").read_bytes())
    (d / "link").mkdir()
    before = digests(d)
    from alip.score.filter import cli

    argv = filter_argv(d / shards, d / where, d / "scores.csv", *(["--overwrite"] if overwrite else []))
    refused(capsys, cli, argv, relation)
    unchanged(before, d)
    assert [p.name for p in (d / "shards").iterdir()] and not (d / "shards" / ".alip.lock").exists()


def test_filter_overwrite_leaves_a_strangers_file(world, tmp_path, capsys):
    from alip.score.filter import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.rec.bak").write_text("mine")
    base = filter_argv(world / "shards" / "train.meta.json", out, world / "scores.csv")
    refused(capsys, cli, base, "not made by alip-filter", "train-00000.rec.bak")  # never silently mixed
    before = digests(world)
    assert cli([str(a) for a in [*base, "--overwrite"]]) == 0  # a first run: nothing of the filter's to remove
    other = filter_argv(world / "shards" / "train.meta.json", out, world / "scores.csv", "--overwrite")
    other[other.index("0.5")] = "0.75"  # another rule: --overwrite replaces the filter's own set
    assert cli([str(a) for a in other]) == 0
    assert (out / "train-00000.rec.bak").read_text() == "mine"
    unchanged(before, world)


# ---------------------------------------------------------------- alip score, the caption tool, export, train


@pytest.mark.parametrize(
    ("shards", "option", "target", "relation"),
    [
        ("shards/train.meta.json", "--out", "shards/train.meta.json", "is the input --shards"),
        ("shards", "--out", "shards/new.csv", "lies inside the input --shards"),  # --shards named as the folder
        ("shards", "--summary", "ckpt.pt", "is the input --checkpoint"),
        ("shards/train.meta.json", "--out", "shards/train-00000.idx", "is the input --shards"),
    ],
    ids=["out-is-meta", "out-inside-shards", "summary-is-checkpoint", "out-is-a-shard-file"],
)
def test_score_refuses_to_write_over_its_inputs(world, capsys, shards, option, target, relation):
    from alip.score import cli

    before = digests(world)
    argv = ["--checkpoint", world / "ckpt.pt", "--shards", world / shards, option, world / target]
    refused(capsys, cli, argv, relation)
    unchanged(before, world)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    ("target", "relation"),
    [("manifest.jsonl", "is the input input"), ("img/caps.jsonl", "lies inside the input --image-root")],
    ids=["out-is-manifest", "out-inside-image-root"],
)
def test_caption_tool_refuses_to_write_over_its_inputs(world, capsys, target, relation, overwrite):
    """Before any model is loaded (the --model named here does not exist)."""
    before = digests(world)
    argv = [world / "manifest.jsonl", "--image-root", world / "img", "--out", world / target, "--model", "/no/model"]
    refused(capsys, guarded(tool("caption").main), [*argv, *(["--overwrite"] if overwrite else [])], relation)
    unchanged(before, world)


def test_export_refuses_to_write_over_its_checkpoint(world, capsys):
    before = digests(world)
    refused(capsys, guarded(tool("export_checkpoint").main), [world / "ckpt.pt", world / "ckpt.pt"], "is the input")
    unchanged(before, world)


@pytest.mark.parametrize(
    ("train", "output", "relation"),
    [
        ("shards/train.meta.json", "shards", "contains the input data.train"),
        ("shards", "shards/run", "lies inside the input data.train"),
        ("shards", ".", "contains the input data.train"),
        ("shards", "shards", "is the input data.train"),
    ],
    ids=["holding", "inside", "parent", "equal"],
)
def test_the_trainer_refuses_a_run_folder_on_its_data(world, capsys, train, output, relation):
    from alip.train.__main__ import main

    before = digests(world)
    refused(capsys, main, [TINY, f"data.train={world / train}", f"output_dir={world / output}"], relation)
    unchanged(before, world)
    assert not (world / "shards" / "run").exists() and not (world / "shards" / "config.yaml").exists()


@pytest.mark.parametrize("image_root", [None, "."], ids=["implied", "named"])
def test_data2rec_may_write_beside_its_manifest(world, tmp_path, image_root):
    """The usual layout is not refused: shards in a new folder beside the manifest, whose folder is the
    root of the image paths (implied, or named by --image-root)."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.jsonl").write_bytes((world / "manifest.jsonl").read_bytes())
    for p in (world / "img").iterdir():
        (d / p.name).write_bytes(p.read_bytes())  # image paths relative to the manifest's folder
    before = digests(d)
    argv = [d / "manifest.jsonl", "--caption-col", "caption", "--out-dir", d / "out", "--workers", "1", "--no-progress"]
    argv += ["--image-root", d / image_root] if image_root else []
    assert guarded(tool("data2rec").main)([str(a) for a in argv]) == 0
    unchanged(before, d)
    assert (d / "out" / "train.meta.json").is_file()


def test_data2rec_after_a_run_that_found_nothing_needs_no_overwrite(world, tmp_path, capsys):
    """A run whose rows are all unusable leaves only its skip report (and a plan of 0 shards, naming that
    report as its own): the run after the fix writes into the same folder without --overwrite."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "x", "image": None, "text": "t", "caption": "c"}) + "\n")  # a skip at indexing
    out = tmp_path / "out"
    main = guarded(tool("data2rec").main)
    argv = [bad, "--image-root", world / "img", "--caption-col", "caption", "--key-col", "key", "--out-dir", out]
    refused(capsys, main, [*argv, "--workers", "1", "--no-progress"], "train.skipped.jsonl")
    assert json.loads((out / "train.plan.json").read_text())["num_shards"] == 0
    assert main([str(a) for a in data2rec_argv(world, out)]) == 0
    assert json.loads((out / "train.meta.json").read_text())["shards"]
