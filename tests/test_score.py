"""alip.score (`alip-score`): gate signals per record, the noisy-first ranking, ROC-AUC, CSV and summary.

The constructed data: clean records have a raw text IDENTICAL to their caption, so any model gives
them s_raw_caption = 1 (up to float rounding); the planted noisy records have unrelated raw texts.
A randomly initialised ALIP-Tiny must therefore rank exactly the planted records first.
"""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import PHOTOS, jpeg_bytes, photo, write_test_shards

import alip
from alip.data.format import schema
from alip.data.format.recordio import RecordIOReader
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns
from alip.score import BASE_COLUMNS, cli, main, read_truth, roc_auc, score_shards

NUM_RECORDS = 16
# sample index -> (planted raw text, noise kind)
PLANTED = {
    2: ("IMG_0042.JPG", "filename"),
    7: ("#love #art", "hashtags"),
    11: ("DSC00017.jpg", "filename"),
    13: ("a bowl of soup on a wooden table", "swap"),
}
EMA = {"tc": 0.9, "it": 0.05, "ic": 0.02}


def caption_of(i):
    # commas, quotes, a newline and non-ASCII: the CSV must round-trip them
    return f'photo {i}, of a "thing" — naïve, café;\nsecond line {i}'


def sample_key(i):
    return f"s{i:03d}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards made by data2rec from a manifest (texts sidecar included) and a truth JSONL."""
    d = tmp_path_factory.mktemp("score")
    img = d / "img"
    img.mkdir()
    rows, truth = [], []
    for i in range(NUM_RECORDS):
        small = np.asarray(Image.fromarray(photo(PHOTOS[i % len(PHOTOS)])).resize((80, 80)))
        (img / f"{i}.jpg").write_bytes(jpeg_bytes(small))
        raw, kind = PLANTED.get(i, (caption_of(i), None))
        rows.append({"key": sample_key(i), "image": f"{i}.jpg", "text": raw, "caption": caption_of(i)})
        truth.append({"key": sample_key(i), "noisy": kind is not None, "noise": kind, "colour": "red"})
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    truth_path = d / "truth.jsonl"
    truth_path.write_text("".join(json.dumps(t) + "\n" for t in truth), encoding="utf-8")
    opts = ConvertOptions(
        out_dir=d / "shards",
        columns=Columns(caption="caption", key="key"),
        image_root=img,
        shard_records=5,
        workers=1,
        progress=False,
    )
    report = convert([manifest], opts)
    assert report.num_records == NUM_RECORDS
    return {"dir": d, "meta": report.meta_path, "truth": truth_path, "manifest": {r["key"]: r for r in rows}}


@pytest.fixture(scope="module")
def ckpts(data):
    """One random-init ALIP-Tiny as a training checkpoint, a .safetensors export and a .pt export."""
    torch.manual_seed(0)
    model, _, preprocess = alip.create_model("ALIP-Tiny")
    model.eval()
    d = data["dir"]
    train = d / "step-00000100.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "loss": {f"gates.ema_{k}": torch.tensor(v) for k, v in EMA.items()},
            "config": {"model": {"name": "ALIP-Tiny"}, "loss": {"power": 2.0, "pair_gate": "official"}},
        },
        train,
    )
    no_loss = d / "no_loss.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "ALIP-Tiny"}}}, no_loss)
    return {
        "model": model,
        "preprocess": preprocess,
        "train": train,
        "no_loss": no_loss,
        "safetensors": alip.export_model(model, d / "export.safetensors"),
        "pt": alip.export_model(model, d / "export.pt"),
    }


@pytest.fixture(scope="module")
def scored(data, ckpts, one_thread):
    return score_shards(ckpts["train"], data["meta"], truth=data["truth"], device="cpu", progress=False)


def planted_keys():
    return {sample_key(i) for i in PLANTED}


# ---------------------------------------------------------------- roc_auc


def test_roc_auc_hand_cases():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    # one positive tied with one of two negatives: (1 + 0.5) / 2
    assert roc_auc([1.0, 1.0, 0.0], [True, False, False]) == 0.75
    assert roc_auc(torch.tensor([0.0, 1.0]), np.array([False, True])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match="length"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_on_tie_heavy_data(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.random(n) < 0.3
    scores = rng.integers(0, 5, n) + labels * rng.integers(0, 2, n)  # 6 distinct values: ties everywhere
    scores = scores.astype(np.float64) / 3.0
    assert roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


# ---------------------------------------------------------------- scoring


def test_planted_noisy_pairs_rank_first_with_auc_one(scored):
    rows, s = scored.rows, scored.summary
    k = len(PLANTED)
    assert [r["rank"] for r in rows] == list(range(1, NUM_RECORDS + 1))
    assert {r["sample_key"] for r in rows[:k]} == planted_keys()
    assert all(r["noisy"] for r in rows[:k]) and not any(r["noisy"] for r in rows[k:])
    assert [r["s_raw_caption"] for r in rows] == sorted(r["s_raw_caption"] for r in rows)
    for r in rows[k:]:  # identical raw text and caption: identical text features
        assert r["s_raw_caption"] == pytest.approx(1.0, abs=1e-5)
    assert max(r["s_raw_caption"] for r in rows[:k]) < 0.99
    assert s["records"] == NUM_RECORDS and s["shards"] == 4 and s["records_with_text"] == NUM_RECORDS
    assert s["noisy"] == k and s["clean"] == NUM_RECORDS - k
    assert s["auc_weight_sample"] == 1.0 and s["auc_s_raw_caption"] == 1.0
    assert s["precision_at_noisy"] == 1.0
    assert s["auc_weight_min"] is not None
    assert s["by_noise"].keys() == {"filename", "hashtags", "swap"}
    assert s["by_noise"]["filename"]["count"] == 2 and s["by_noise"]["filename"]["auc_weight_sample"] == 1.0
    assert s["truth_keys_not_in_shards"] == 0 and s["records_without_truth"] == 0
    assert s["warnings"] == []


def test_rows_carry_the_original_strings_and_truth(scored, data):
    for r in scored.rows:
        src = data["manifest"][r["sample_key"]]
        assert r["raw_text"] == src["text"] and r["caption"] == src["caption"]
        i = int(r["sample_key"][1:])
        assert r["noisy"] == (i in PLANTED)
        assert r["noise"] == (PLANTED[i][1] if i in PLANTED else None)
    assert len({r["record_key"] for r in scored.rows}) == NUM_RECORDS


def test_training_checkpoint_ema_power_and_pair_gate_are_used(scored):
    s = scored.summary
    assert s["ema_source"] == "checkpoint" and s["checkpoint_kind"] == "alip-train"
    assert s["model"] == "ALIP-Tiny" and s["power"] == 2.0 and s["pair_gate"] == "official"
    assert s["ema"] == pytest.approx(EMA)
    assert s["ema"] != pytest.approx(s["dataset_mean"])
    for r in scored.rows:  # DESIGN.md section 4, recomputed by hand
        ratio = math.exp(r["s_raw_caption"] - EMA["tc"]) ** 2
        assert r["weight_sample"] == pytest.approx(min(ratio, 1.0), rel=1e-6)
        w_t = 1.0 if ratio >= 1.0 else math.exp(r["s_image_raw"] - EMA["it"]) ** 2
        w_c = 1.0 if ratio >= 1.0 else math.exp(r["s_image_caption"] - EMA["ic"]) ** 2
        assert r["weight_raw"] == pytest.approx(w_t, rel=1e-6)
        assert r["weight_caption"] == pytest.approx(w_c, rel=1e-6)
    assert s["flagged"] == len(PLANTED)  # clean s_tc ~ 1 > ema_tc: weight 1; planted ones are lowered


def test_similarities_come_from_the_checkpoint_weights(scored, data, ckpts):
    """Recompute two records' similarities directly with the saved model."""
    by_key = {r["record_key"]: r for r in scored.rows}
    shard = schema.resolve_shards(data["meta"])[0]
    model, preprocess = ckpts["model"], ckpts["preprocess"]
    with RecordIOReader(shard.rec, shard.idx) as reader, torch.no_grad():
        for _, record in list(reader)[:2]:
            key, raw, cap, jpeg = schema.parse_record(record)
            image = preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
            v = model.encode_image(image, normalize=True)[0]
            t = model.encode_text(torch.from_numpy(raw)[None], normalize=True)[0]
            c = model.encode_text(torch.from_numpy(cap)[None], normalize=True)[0]
            row = by_key[key]
            assert row["s_raw_caption"] == pytest.approx(float(t @ c), abs=1e-5)
            assert row["s_image_raw"] == pytest.approx(float(v @ t), abs=1e-5)
            assert row["s_image_caption"] == pytest.approx(float(v @ c), abs=1e-5)


@pytest.mark.parametrize("export", ["safetensors", "pt"])
def test_weights_file_uses_dataset_means(export, data, ckpts, scored, one_thread):
    result = score_shards(ckpts[export], data["meta"], model="ALIP-Tiny", truth=data["truth"], progress=False)
    s = result.summary
    assert s["ema_source"] == "dataset_mean" and s["checkpoint_kind"] == "weights"
    assert any("dataset means" in w for w in s["warnings"])
    for j, name in zip(("tc", "it", "ic"), ("s_raw_caption", "s_image_raw", "s_image_caption"), strict=True):
        assert s["ema"][j] == pytest.approx(np.mean([r[name] for r in result.rows]), abs=1e-9)
    assert {r["sample_key"] for r in result.rows[: len(PLANTED)]} == planted_keys()
    assert s["auc_weight_sample"] == 1.0
    same = {r["record_key"]: r for r in scored.rows}
    for r in result.rows:  # same weights as the training checkpoint: same similarities
        assert r["s_image_caption"] == pytest.approx(same[r["record_key"]]["s_image_caption"], abs=1e-6)


def test_pair_gate_and_power_overrides(data, ckpts, one_thread):
    result = score_shards(ckpts["train"], data["meta"], pair_gate="paper", power=1.0, progress=False)
    assert result.summary["pair_gate"] == "paper" and result.summary["power"] == 1.0
    assert "noisy" not in result.summary and "noisy" not in result.columns
    for r in result.rows:
        assert r["weight_sample"] == pytest.approx(min(math.exp(r["s_raw_caption"] - EMA["tc"]), 1.0), rel=1e-6)
        assert r["weight_raw"] == pytest.approx(min(math.exp(r["s_image_raw"] - EMA["it"]), 1.0), rel=1e-6)


def test_training_checkpoint_without_loss_state_falls_back(data, ckpts, one_thread):
    result = score_shards(ckpts["no_loss"], data["meta"], progress=False)
    s = result.summary
    assert s["ema_source"] == "dataset_mean" and s["checkpoint_kind"] == "alip-train"
    assert s["ema"] == pytest.approx(s["dataset_mean"])
    assert any("no 'loss' state" in w for w in s["warnings"])
    assert s["power"] == 2.0 and s["pair_gate"] == "official"  # defaults: the config has no loss section


# ---------------------------------------------------------------- outputs


def test_csv_round_trips_and_summary_is_written(scored, tmp_path):
    csv_path, summary_path = scored.write(tmp_path / "out" / "scores.csv")
    assert summary_path == tmp_path / "out" / "scores.summary.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.csv", "scores.summary.json"]
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [*BASE_COLUMNS, "noisy", "noise"]
        back = list(reader)
    assert len(back) == NUM_RECORDS
    for row, orig in zip(back, scored.rows, strict=True):
        assert row["raw_text"] == orig["raw_text"] and row["caption"] == orig["caption"]
        assert "\n" in row["caption"] and '"thing"' in row["caption"]
        assert int(row["rank"]) == orig["rank"] and row["sample_key"] == orig["sample_key"]
        assert float(row["s_raw_caption"]) == orig["s_raw_caption"]  # repr round-trips exactly
        assert row["noisy"] == str(orig["noisy"])
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    for key in (
        "records",
        "checkpoint",
        "model",
        "ema",
        "ema_source",
        "power",
        "pair_gate",
        "noisy",
        "auc_weight_sample",
        "auc_s_raw_caption",
        "auc_weight_min",
        "by_noise",
        "precision_at_noisy",
        "truth_keys_not_in_shards",
        "records_without_truth",
        "csv",
    ):
        assert key in summary, key
    assert summary["csv"] == str(csv_path)

    explicit = tmp_path / "elsewhere" / "s.json"
    assert scored.write(tmp_path / "b.csv", explicit)[1] == explicit and explicit.is_file()


def test_partial_truth_csv_is_counted(data, ckpts, tmp_path, one_thread):
    truth = tmp_path / "truth.csv"
    half = range(0, NUM_RECORDS, 2)
    with open(truth, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "noisy", "noise"])
        for i in half:
            w.writerow([sample_key(i), "1" if i in PLANTED else "false", PLANTED.get(i, (None, ""))[1]])
        for extra in ("x1", "x2", "x3"):
            w.writerow([extra, "0", ""])
    result = score_shards(ckpts["train"], data["meta"], truth=truth, progress=False)
    s = result.summary
    assert s["truth_entries"] == len(half) + 3
    assert s["truth_matched_records"] == len(half)
    assert s["truth_keys_not_in_shards"] == 3
    assert s["records_without_truth"] == NUM_RECORDS - len(half)
    assert s["noisy"] == sum(i in PLANTED for i in half) == 1
    assert s["auc_weight_sample"] == 1.0 and s["precision_at_noisy"] == 1.0
    assert any("3 truth keys are not in the shards" in w for w in s["warnings"])
    assert sum(r["noisy"] is None for r in result.rows) == NUM_RECORDS - len(half)


def test_truth_matching_nothing_is_a_clear_error(data, ckpts, tmp_path, one_thread):
    truth = tmp_path / "truth.jsonl"
    truth.write_text('{"key": "nope", "noisy": true}\n{"key": "other", "noisy": false}\n')
    with pytest.raises(ValueError, match="no record of the shards matches"):
        score_shards(ckpts["train"], data["meta"], truth=truth, progress=False)


def test_read_truth_formats_and_errors(tmp_path):
    j = tmp_path / "t.jsonl"
    j.write_text('{"key": 1, "noisy": true, "noise": "swap", "x": 3}\n\n{"key": "b", "noisy": false, "noise": "y"}\n')
    assert read_truth(j) == {"1": (True, "swap"), "b": (False, None)}
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"key": "a", "noisy": true}\n{"key": "a", "noisy": false}\n')
    with pytest.raises(ValueError, match="twice"):
        read_truth(dup)
    bad = tmp_path / "bad.csv"
    bad.write_text("key,label\na,1\n")
    with pytest.raises(ValueError, match="key,noisy"):
        read_truth(bad)
    worse = tmp_path / "worse.jsonl"
    worse.write_text('{"key": "a", "noisy": "maybe"}\n')
    with pytest.raises(ValueError, match="boolean"):
        read_truth(worse)


def test_shards_without_texts_sidecar_still_score(tmp_path, ckpts, one_thread):
    shards = write_test_shards(tmp_path / "shards", num_records=7, per_shard=4)
    result = score_shards(ckpts["train"], shards.meta, progress=False)
    assert result.summary["records"] == 7 and result.summary["records_with_text"] == 0
    assert sorted(r["record_key"] for r in result.rows) == shards.keys
    assert all(r["sample_key"] == "" and r["raw_text"] == "" for r in result.rows)
    sidecar_warnings = [w for w in result.summary["warnings"] if "texts sidecar" in w]
    assert len(sidecar_warnings) == 1 and "2 of 2 shards" in sidecar_warnings[0]
    truth = tmp_path / "t.jsonl"
    truth.write_text('{"key": "0", "noisy": true}\n')
    with pytest.raises(ValueError, match="no texts sidecar"):
        score_shards(ckpts["train"], shards.meta, truth=truth, progress=False)


# ---------------------------------------------------------------- errors and CLI


def test_missing_inputs_name_the_path(data, ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        score_shards(tmp_path / "nope.pt", data["meta"], progress=False)
    with pytest.raises(FileNotFoundError, match="no_shards_here"):
        score_shards(ckpts["train"], tmp_path / "no_shards_here", progress=False)
    with pytest.raises(FileNotFoundError, match="missing_truth.jsonl"):
        score_shards(ckpts["train"], data["meta"], truth=tmp_path / "missing_truth.jsonl", progress=False)


def test_weights_file_without_model_is_a_clear_error(data, ckpts, capsys):
    with pytest.raises(ValueError, match="pass --model"):
        score_shards(ckpts["safetensors"], data["meta"], progress=False)
    assert cli(["--checkpoint", str(ckpts["pt"]), "--shards", str(data["meta"]), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_writes_csv_and_summary(data, ckpts, tmp_path, capsys, one_thread):
    out = tmp_path / "cli" / "ranked.csv"
    argv = ["--checkpoint", str(ckpts["train"]), "--shards", str(data["meta"]), "--truth", str(data["truth"])]
    argv += ["--out", str(out), "--no-progress", "--device", "cpu", "--workers", "2", "--batch-size", "3"]
    summary = main(argv)
    assert summary["auc_weight_sample"] == 1.0 and summary["records"] == NUM_RECORDS
    assert json.loads((tmp_path / "cli" / "ranked.summary.json").read_text()) == summary
    with open(out, newline="", encoding="utf-8") as f:
        top = [row["sample_key"] for row in csv.DictReader(f)][: len(PLANTED)]
    assert set(top) == planted_keys()
    printed = capsys.readouterr().out
    assert "AUC w_sample" in printed and "[checkpoint]" in printed and str(out) in printed


def test_cli_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "alip-score --checkpoint" in text and "most likely noisy" in text
