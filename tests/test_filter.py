"""alip.filter (`alip-filter`): keep the pairs the gates trust, as a shard set every tool reads.

The data is test_score's construction: clean records have a raw text IDENTICAL to their caption (so
any model gives them s_raw_caption = 1 and, with mu_tc = 0.9, weight_sample = 1), the planted noisy
ones have unrelated raw texts. So `--keep-fraction 0.75` must keep exactly the 12 clean records.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import PHOTOS, jpeg_bytes, photo

import alip
from alip.data.format.recordio import RecordIOReader
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns
from alip.data.loaders.config import LoaderConfig
from alip.data.loaders.dali import DaliLoader
from alip.data.loaders.preflight import prepare_shards
from alip.data.loaders.torch_loader import TorchLoader
from alip.files import sha256_file
from alip.score import filter_shards, score_shards
from alip.score.filter import cli as filter_cli
from alip.score.filter import main as filter_main
from alip.score.rule import REASONS, FilterInputError, Rule, decide, gmm_clean

NUM_RECORDS = 16
PLANTED = {2: "IMG_0042.JPG", 7: "#love #art", 11: "DSC00017.jpg", 13: "a bowl of soup on a wooden table"}
CLEAN = {f"s{i:03d}" for i in range(NUM_RECORDS) if i not in PLANTED}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, one_thread):
    """data2rec shards (4 of 5 records each), a random ALIP-Tiny training checkpoint, its scores CSV."""
    d = tmp_path_factory.mktemp("filter")
    (d / "img").mkdir()
    rows = []
    for i in range(NUM_RECORDS):
        small = np.asarray(Image.fromarray(photo(PHOTOS[i % len(PHOTOS)])).resize((72, 72)))
        (d / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(small))
        caption = f"photo number {i} of a thing"
        rows.append({"key": f"s{i:03d}", "image": f"{i}.jpg", "text": PLANTED.get(i, caption), "caption": caption})
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    opts = ConvertOptions(
        out_dir=d / "shards",
        columns=Columns(caption="caption", key="key"),
        image_root=d / "img",
        shard_records=5,
        workers=1,
        progress=False,
    )
    meta = convert([manifest], opts).meta_path
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    ckpt = d / "step-00000100.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "loss": {f"gates.ema_{k}": torch.tensor(v) for k, v in {"tc": 0.9, "it": 0.05, "ic": 0.02}.items()},
            "config": {"model": {"name": "ALIP-Tiny"}, "loss": {"power": 2.0, "pair_gate": "official"}},
        },
        ckpt,
    )
    result = score_shards(ckpt, meta, device="cpu", progress=False)
    scores, _ = result.write(d / "scores.csv")
    return {"dir": d, "meta": meta, "ckpt": ckpt, "scores": scores}


def run(scored, out, **kw) -> object:
    kw.setdefault("rule", Rule(keep_fraction=0.75))
    return filter_shards(scored["scores"], scored["meta"], out, progress=False, **kw)


def records_by_key(meta: Path) -> dict[int, bytes]:
    out = {}
    for shard in json.loads(meta.read_text())["shards"]:
        with RecordIOReader(meta.parent / shard["rec"], meta.parent / shard["idx"]) as reader:
            out.update(dict(iter(reader)))
    return out


def sample_keys(meta: Path) -> set[str]:
    keys = set()
    for shard in json.loads(meta.read_text())["shards"]:
        for line in (meta.parent / shard["texts"]).read_text(encoding="utf-8").splitlines():
            keys.add(json.loads(line)["sample_key"])
    return keys


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".alip.lock"}


# ---------------------------------------------------------------- the rule


def test_decide_fraction_min_weight_and_ties():
    signal = np.array([0.9, 0.1, 0.5, 0.5, 0.5, 1.0])
    # best 3: 1.0, 0.9, then the first 0.5 in order (a stable sort keeps shard order among ties)
    assert decide(signal, Rule(keep_fraction=0.5)).tolist() == [
        "",
        "outside_keep_fraction",
        "",
        *["outside_keep_fraction"] * 2,
        "",
    ]
    got = decide(signal, Rule(min_weight=0.5))
    assert got.tolist() == ["", "below_min_weight", "", "", "", ""]
    # both: the threshold first, then at most round(F * N) of all N records
    got = decide(signal, Rule(keep_fraction=0.34, min_weight=0.95))
    assert got.tolist() == ["below_min_weight", "below_min_weight", *["below_min_weight"] * 3, ""]
    assert set(REASONS) >= {"below_min_weight", "outside_keep_fraction", "gmm_noisy_component"}


def test_auto_rule_separates_two_groups_without_labels():
    rng = np.random.default_rng(0)
    clean, noisy = rng.normal(0.8, 0.05, 700), rng.normal(0.2, 0.08, 300)
    keep = gmm_clean(np.concatenate([clean, noisy]))
    assert keep[:700].mean() > 0.99 and keep[700:].mean() < 0.01
    assert (decide(np.concatenate([clean, noisy]), Rule(auto=True)) == "").sum() == keep.sum()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"keep_fraction": 0.0}, "--keep-fraction must be in"),
        ({"keep_fraction": 1.5}, "--keep-fraction must be in"),
        ({}, "give a rule"),
        ({"by": ("weight_sample", "nonsense"), "keep_fraction": 0.5}, "--by must name signals"),
        ({"min_weight": float("nan")}, "finite"),
    ],
)
def test_bad_rules_are_refused(kw, message):
    with pytest.raises(FilterInputError, match=message):
        Rule(**kw)


# ---------------------------------------------------------------- the output


def test_kept_set_is_exactly_the_clean_records_copied_byte_for_byte(scored, tmp_path):
    report = run(scored, tmp_path / "out")
    assert (report.records_in, report.kept, report.dropped) == (16, 12, {"outside_keep_fraction": 4})
    meta = report.meta
    assert sample_keys(meta) == CLEAN
    source, kept = records_by_key(scored["meta"]), records_by_key(meta)
    assert kept and all(kept[k] == source[k] for k in kept)  # header, label and JPEG unchanged
    assert len(kept) == 12
    # the texts sidecar lines are the source's lines
    src_lines = {
        json.loads(x)["key"]: x for p in scored["meta"].parent.glob("*.texts.jsonl") for x in p.read_text().splitlines()
    }
    for p in meta.parent.glob("*.texts.jsonl"):
        for line in p.read_text().splitlines():
            assert src_lines[json.loads(line)["key"]] == line
    info = json.loads(meta.read_text())
    f = info["source"]["filter"]
    assert f["rule"]["keep_fraction"] == 0.75 and f["rule"]["by"] == ["weight_sample"]
    assert f["scores_sha256"] == sha256_file(scored["scores"])
    assert f["checkpoint_sha256"] == sha256_file(scored["ckpt"])  # found through the scores' summary JSON
    assert (f["records_in"], f["kept"], f["dropped_by_reason"]) == (16, 12, {"outside_keep_fraction": 4})
    assert [s["records"] for s in f["source_shards"]] == [5, 5, 5, 1]
    assert info["num_records"] == 12 and info["tokenizer"] == json.loads(scored["meta"].read_text())["tokenizer"]
    with open(report.dropped_report, newline="", encoding="utf-8") as fh:
        dropped = list(csv.DictReader(fh))
    assert {r["sample_key"] for r in dropped} == {f"s{i:03d}" for i in PLANTED}
    assert all(r["reason"] == "outside_keep_fraction" and float(r["weight_sample"]) < 1 for r in dropped)


def test_filtered_set_preflights_and_loads_in_both_loaders(scored, tmp_path):
    meta = run(scored, tmp_path / "out").meta
    checks = prepare_shards(str(meta), deep=True)  # checksums, labels, images
    assert sum(c.num_records for c in checks) == 12
    cfg = LoaderConfig(batch_size=4, image_size=32, num_threads=1, num_workers=0, shuffle_buffer=8)
    source = {
        json.loads(x)["key"]: json.loads(x)
        for p in scored["meta"].parent.glob("*.texts.jsonl")
        for x in p.read_text().splitlines()
    }
    tokenizer = alip.get_tokenizer("ALIP-Tiny")
    expected = sorted(tokenizer([source[k]["raw_text"] for k in records_by_key(meta)]).tolist())
    for loader_cls in (TorchLoader, DaliLoader):
        loader = (
            loader_cls(meta, cfg, train=False, device="cpu")
            if loader_cls is TorchLoader
            else loader_cls(meta, cfg, train=False)
        )
        texts = [row for batch in loader for row in batch["text"].tolist()]
        assert sorted(texts) == expected, loader_cls.__name__


def test_rerun_and_a_second_folder_give_identical_bytes(scored, tmp_path):
    run(scored, tmp_path / "a")
    first = folder_bytes(tmp_path / "a")
    again = run(scored, tmp_path / "a")
    assert again.shards_reused == 4 and again.shards_written == 0
    assert folder_bytes(tmp_path / "a") == first
    run(scored, tmp_path / "b")
    assert folder_bytes(tmp_path / "b") == first


def test_killed_mid_run_then_rerun_gives_the_same_result(scored, tmp_path):
    run(scored, tmp_path / "ref")
    # a real abrupt exit (no cleanup, no finally) while the third shard is being renamed into place
    code = f"""
import os, sys
from alip.score import filter as f
calls = []
real = os.replace
def dying(a, b):
    calls.append(b)
    if str(b).endswith("train-00002.rec"):
        os._exit(9)
    real(a, b)
f.os.replace = dying
f.filter_shards({str(scored["scores"])!r}, {str(scored["meta"])!r}, {str(tmp_path / "out")!r},
                f.Rule(keep_fraction=0.75), progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "out" / "train.meta.json").exists()
    report = run(scored, tmp_path / "out")
    assert report.shards_reused == 2 and report.shards_written == 2
    leftovers = {p.name for p in (tmp_path / "out").glob("*.tmp")}
    got = folder_bytes(tmp_path / "out")
    assert {k: v for k, v in got.items() if k not in leftovers} == folder_bytes(tmp_path / "ref")


# ---------------------------------------------------------------- refusals


def test_a_rule_that_keeps_nothing_writes_nothing(scored, tmp_path):
    with pytest.raises(FilterInputError, match="keeps none of the 16 records"):
        run(scored, tmp_path / "out", rule=Rule(min_weight=2.0))
    assert not any(p.name.startswith("train") for p in (tmp_path / "out").iterdir())


def test_scores_that_do_not_match_the_shards_are_refused(scored, tmp_path):
    lines = scored["scores"].read_text(encoding="utf-8").splitlines(keepends=True)
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:-1]), encoding="utf-8")  # one record unscored
    with pytest.raises(FilterInputError, match="1 of 16 records have no score"):
        filter_shards(short, scored["meta"], tmp_path / "out", Rule(keep_fraction=0.5), progress=False)
    with open(scored["scores"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["sample_key"] = "someone-else"  # same record keys, another dataset's samples
    other = tmp_path / "other.csv"
    with open(other, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(FilterInputError, match="'someone-else' in the scores"):
        filter_shards(other, scored["meta"], tmp_path / "out", Rule(keep_fraction=0.5), progress=False)
    not_scores = tmp_path / "x.csv"
    not_scores.write_text("a,b\n1,2\n")
    with pytest.raises(FilterInputError, match="not an alip-score CSV"):
        filter_shards(not_scores, scored["meta"], tmp_path / "out", Rule(keep_fraction=0.5), progress=False)


def test_another_rule_in_the_same_folder_needs_overwrite(scored, tmp_path):
    run(scored, tmp_path / "out")
    with pytest.raises(FilterInputError, match="--overwrite"):
        run(scored, tmp_path / "out", rule=Rule(keep_fraction=0.5))
    report = run(scored, tmp_path / "out", rule=Rule(keep_fraction=0.5), overwrite=True)
    assert report.kept == 8 and len(records_by_key(report.meta)) == 8


# ---------------------------------------------------------------- command line


def test_cli_scores_from_a_checkpoint_then_filters_and_reuses_the_scores(scored, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(scored["ckpt"]), "--shards", str(scored["meta"]), "--out-dir", str(out)]
    argv += ["--keep-fraction", "0.75", "--workers", "0", "--device", "cpu", "--no-progress"]
    report = filter_main(argv)
    assert report.kept == 12 and sample_keys(report.meta) == CLEAN
    assert "kept 12 of 16 records (75.0%)" in capsys.readouterr().out
    stamp = (out / "train.scores.csv").stat().st_mtime_ns
    filter_main(argv)
    assert (out / "train.scores.csv").stat().st_mtime_ns == stamp  # same checkpoint: not scored again


def test_cli_errors_are_one_line(scored, tmp_path, capsys):
    argv = ["--scores", str(scored["scores"]), "--shards", str(scored["meta"]), "--out-dir", str(tmp_path / "o")]
    assert filter_cli([*argv, "--keep-fraction", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --keep-fraction must be a number in (0, 1] or 'auto', got 'lots'"
    # and as a user runs it, in its own process
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "alip.filter", *argv, "--min-weight", "5"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the rule") and "keeps none" in proc.stderr
