"""`make demo`, shortened: generate -> data2rec -> 3 trainings (DALI, real trainer) -> eval -> score -> report."""

import csv
import json

import pytest
from PIL import Image

from alip.demo.__main__ import LABELS, QUICK, RUNS, cli, main

DEFAULT = {name: LABELS[name] for name in RUNS}  # what `make demo` trains (the sigmoid runs are opt-in)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    record = main(["--quick", "--out", str(out), "--no-progress", "--workers", "1"])
    return out, record


@pytest.mark.slow
def test_quick_demo_writes_every_artefact(quick_demo):
    out, record = quick_demo
    report = out / "report"
    for name in ("training_curves.png", "gate_weights.png", "results.png"):
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.width > 300
    md = (report / "report.md").read_text()
    assert all(label in md for label in DEFAULT.values())
    summary = json.loads((report / "summary.json").read_text())
    assert summary["metrics"] == record["metrics"]
    assert set(summary["metrics"]) == set(DEFAULT.values())
    for metrics in summary["metrics"].values():
        assert set(metrics) == {"zero-shot top1", "retrieval i2t R@1", "retrieval t2i R@1"}
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert 0.0 <= summary["gates"]["auc_weight_sample"] <= 1.0
    assert summary["machine"]["cpus"] >= 1 and summary["seconds"]["total"] > 0

    with open(report / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == QUICK["num_train"]  # every training pair scored, joined with its hidden flag
    assert {r["noisy"] for r in rows} == {"True", "False"}

    for name in DEFAULT:
        run = out / "runs" / name
        assert (run / "final.pt").is_file() and (run / "final.safetensors").is_file()
        steps = [json.loads(line)["step"] for line in (run / "losses.jsonl").read_text().splitlines()]
        assert steps == list(range(1, QUICK["steps"] + 1))
        evals = [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()]
        assert evals == list(range(QUICK["eval_every"], QUICK["steps"] + 1, QUICK["eval_every"]))
        for task in ("zeroshot", "retrieval"):
            result = json.loads((run / f"eval_{task}.json").read_text())
            assert result["model"]["checkpoint"].endswith("final.pt")
        assert "DALI train loader" in (run / "train.log").read_text()  # the real pipeline fed the trainer
    config = (out / "runs" / "clip" / "config.yaml").read_text()
    assert "use_caption: false" in config  # the baseline trains on raw text only


def test_rerun_reuses_finished_stages(quick_demo):
    out, record = quick_demo
    files = [out / "runs" / n / f for n in DEFAULT for f in ("losses.jsonl", "train.log", "final.pt")]
    before = [p.read_bytes() for p in files]
    again = main(["--quick", "--out", str(out), "--no-progress", "--workers", "1"])
    assert again["metrics"] == record["metrics"]  # same weights, same evaluation
    assert [p.read_bytes() for p in files] == before  # nothing retrained


def test_missing_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip.yaml"):
        main(["--quick", "--out", str(tmp_path / "x"), "--configs", str(tmp_path), "--no-progress"])


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    assert cli(["--noise-rate", "1.5", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "error: noise_rate must be in [0, 1]" in capsys.readouterr().err
