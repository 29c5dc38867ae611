"""The demo's report folder (alip.demo.report): plots, markdown, AUCs and input errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from alip.demo.report import _auc, _moving_average, format_table, read_scores, write_report  # noqa: E402
from alip.score import BASE_COLUMNS, TRUTH_COLUMNS  # noqa: E402

RUN_NAMES = ("clip", "alip_nogates", "alip")
SUMMARY = {
    "clip": {"zeroshot top1": 41.2, "retrieval i2t R@1": 10.1, "retrieval t2i R@1": 9.0},
    "alip_nogates": {"zeroshot top1": 47.5, "retrieval i2t R@1": 12.3, "retrieval t2i R@1": 11.8},
    "alip": {"zeroshot top1": 52.6, "retrieval i2t R@1": 14.4},  # t2i missing: that bar is skipped
}
N_STEPS = 50
N_CLEAN, N_NOISY = 24, 16
KINDS = ("swap", "attribute", "hashtags", "filename", "empty")
SCORE_HEADER = [*BASE_COLUMNS, *TRUTH_COLUMNS]  # what alip score writes with --truth


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _make_runs(root):
    """clip: plain with eval; alip_nogates: a NaN step, with eval; alip: no eval.jsonl."""
    runs = {}
    for i, name in enumerate(RUN_NAMES):
        folder = root / name
        folder.mkdir()
        rows = []
        for step in range(1, N_STEPS + 1):
            loss = 4.0 * math.exp(-step / 20) + 0.1 * math.sin(step) + 0.5 * i
            row = {"step": step, "applied": True, "loss": loss, "loss_raw": loss}
            if name != "clip":
                row["loss_caption"] = loss / 2
            if name == "alip_nogates" and step == 17:
                row.update(applied=False, loss=float("nan"), loss_raw=float("nan"), loss_caption=float("nan"))
            rows.append(row)
        _write_jsonl(folder / "losses.jsonl", rows)
        if name != "alip":
            evals = [
                {
                    "step": step,
                    "eval/shapes/top1": 0.2 + 0.01 * step + 0.05 * i,
                    "eval/shapes_retrieval/i2t_R@1": 0.05 + 0.004 * step,
                    "eval/shapes_retrieval/t2i_R@1": 0.04 + 0.004 * step,
                    "eval/shapes_retrieval/i2t_R@5": 0.2 + 0.004 * step,
                }
                for step in range(10, N_STEPS + 1, 10)
            ]
            _write_jsonl(folder / "eval.jsonl", evals)
        runs[name] = folder
    return runs


def _make_scores(path, header=SCORE_HEADER):
    """40 pairs: 24 clean (weight ~1, s_raw_caption 0.8) and 16 noisy (weight <= 0.5).

    The weights separate clean from noisy perfectly (AUC 1.0). Of the noisy pairs 12 have
    s_raw_caption 0.2 and 4 tie with the clean ones at 0.8: AUC = (12*24 + 4*24/2) / (24*16) = 0.875.
    """
    true_words, false_words = ("True", "1", "true"), ("False", "0", "false")
    rows = []
    for i in range(N_CLEAN + N_NOISY):
        noisy = i >= N_CLEAN
        j = i - N_CLEAN
        rows.append(
            {
                "rank": i,
                "record_key": f"{i:06d}",
                "sample_key": f"s{i}",
                "weight_sample": 0.1 + 0.025 * j if noisy else 0.9 + 0.01 * i,
                "weight_raw": 0.5,
                "weight_caption": 0.9,
                "s_raw_caption": (0.8 if j % 4 == 3 else 0.2) if noisy else 0.8,
                "s_image_raw": 0.3,
                "s_image_caption": 0.4,
                "raw_text": 'my large red star, "white" backdrop' if i == 0 else f"text {i}",
                "caption": "a red star",
                "noisy": (true_words if noisy else false_words)[i % 3],
                "noise": KINDS[j % len(KINDS)] if noisy else "",
            }
        )
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def inputs(tmp_path):
    runs_root = tmp_path / "runs"
    runs_root.mkdir()
    return _make_runs(runs_root), _make_scores(tmp_path / "scores.csv")


def test_write_report_files(tmp_path, inputs):
    runs, scores = inputs
    files = write_report(tmp_path / "report", runs, SUMMARY, scores=scores)
    assert set(files) == {"training_curves", "gate_weights", "results", "report"}
    names = {
        "training_curves": "training_curves.png",
        "gate_weights": "gate_weights.png",
        "results": "results.png",
        "report": "report.md",
    }
    for key, name in names.items():
        assert files[key] == tmp_path / "report" / name
        assert files[key].is_file() and files[key].stat().st_size > 0
    for key in ("training_curves", "gate_weights", "results"):
        path = files[key]
        assert path.stat().st_size < 300_000, f"{path.name} is {path.stat().st_size} bytes"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 400 <= w <= 2500 and 250 <= h <= 1000, (path.name, im.size)
    with Image.open(files["training_curves"]) as im:
        # loss panel + 3 eval panels (the 4th eval metric, i2t_R@5, gets no panel): a wide figure
        assert im.size[0] > 3 * im.size[1]

    md = files["report"].read_text()
    for name in RUN_NAMES:
        assert f"| {name} |" in md
    for values in SUMMARY.values():
        for v in values.values():
            assert f"{v:.1f}" in md
    assert "| alip | 52.6 | 14.4 | - |" in md
    assert "(weight_sample) AUC: 1.000" in md
    assert "(s_raw_caption) AUC: 0.875" in md
    for link in ("training_curves.png", "gate_weights.png", "results.png"):
        assert f"]({link})" in md
    # per noise kind: swap has noisy indices j = 0, 5, 10, 15 -> j % 4 == 3 for 15 only: 3 at 0.2, 1 tie
    # AUC = (3*24 + 1*24/2) / (24*4) = 0.875; attribute j = 1, 6, 11: 11 ties -> (2*24 + 12) / 72 = 0.833
    assert "| swap | 4 | 0.287 | 1.000 | 0.875 |" in md
    assert "| attribute | 3 | 0.250 | 1.000 | 0.833 |" in md
    assert "not comparable across objectives" in md


def test_write_report_is_deterministic(tmp_path, inputs):
    runs, scores = inputs
    a = write_report(tmp_path / "a", runs, SUMMARY, scores=scores)
    b = write_report(tmp_path / "b", runs, SUMMARY, scores=scores)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key


def test_without_scores_no_gate_plot(tmp_path, inputs):
    runs, _ = inputs
    files = write_report(tmp_path / "out", runs, SUMMARY, scores=None, title="no scores")
    assert "gate_weights" not in files
    assert not (tmp_path / "out" / "gate_weights.png").exists()
    md = files["report"].read_text()
    assert md.startswith("# no scores")
    assert "gate_weights.png" not in md and "AUC" not in md


def test_runs_without_any_eval(tmp_path, inputs):
    runs, _ = inputs
    for folder in runs.values():
        (folder / "eval.jsonl").unlink(missing_ok=True)
    (runs["clip"] / "eval.jsonl").write_text("")  # empty file: same as missing
    files = write_report(tmp_path / "out", runs, SUMMARY)
    with Image.open(files["training_curves"]) as im:
        assert im.size[0] < 2 * im.size[1]  # the loss panel only


def test_missing_losses_names_path(tmp_path, inputs):
    runs, scores = inputs
    (runs["alip"] / "losses.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(runs["alip"] / "losses.jsonl")):
        write_report(tmp_path / "out", runs, SUMMARY, scores=scores)
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is written


def test_bad_inputs(tmp_path, inputs):
    runs, _ = inputs
    with pytest.raises(ValueError, match="summary is empty"):
        write_report(tmp_path / "out", runs, {})
    with pytest.raises(ValueError, match="summary is empty"):
        format_table({})
    with pytest.raises(ValueError, match="runs is empty"):
        write_report(tmp_path / "out", {}, SUMMARY)
    bad_header = [c for c in SCORE_HEADER if c not in ("s_raw_caption", "noise")]
    bad = _make_scores(tmp_path / "bad.csv", header=bad_header)
    with pytest.raises(ValueError, match="s_raw_caption, noise"):
        write_report(tmp_path / "out", runs, SUMMARY, scores=bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_scores(tmp_path / "nope.csv")
    (runs["clip"] / "losses.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match="losses.jsonl:2"):
        write_report(tmp_path / "out", runs, SUMMARY)


def test_read_scores_parses_flags_and_kinds(inputs):
    _, scores = inputs
    s = read_scores(scores)
    assert len(s) == N_CLEAN + N_NOISY
    assert int(s.noisy.sum()) == N_NOISY
    assert s.kinds[:N_CLEAN] == ["clean"] * N_CLEAN
    assert s.kind_order() == list(KINDS)
    assert s.auc_weight == 1.0
    assert s.auc_s_raw_caption == pytest.approx(0.875)


def test_format_table():
    table = format_table(SUMMARY)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "zeroshot", "top1", "retrieval", "i2t", "R@1", "retrieval", "t2i", "R@1"]
    assert [ln.split()[0] for ln in lines[2:]] == list(RUN_NAMES)
    assert lines[2].split()[1:] == ["41.2", "10.1", "9.0"]
    assert lines[4].split()[1:] == ["52.6", "14.4", "-"]
    # right-aligned columns: every row ends at the same width
    assert len({len(ln) for ln in lines}) == 1
    assert format_table({"r": {"m": 1.26}}).splitlines()[2].split() == ["r", "1.3"]


def test_moving_average():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(_moving_average(x, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(_moving_average(x, 1), x)
    np.testing.assert_allclose(_moving_average(x, 100), [1.0, 1.5, 2.0, 2.5, 3.0])


def test_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if labels.all() or not labels.any():
            labels[0] = not labels[0]
        scores = rng.integers(0, 4, size=n).astype(float) + labels * rng.integers(0, 2)  # many ties
        assert _auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12), trial
    assert _auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert _auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert _auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(_auc([1, 1], [0.1, 0.2]))
