"""The demo's optional detailed caption source and benchmarks/demo_multi_caption.py, quick."""

import hashlib
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from alip.data.format import schema
from alip.data.ingest.sources import read_caption_sidecar
from alip.demo import data as demo
from alip.demo.__main__ import DemoOptionError, build_parser, demo_spec
from alip.demo.data import ATTRIBUTES, DemoSpec, mentioned_scene, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = DemoSpec(seed=5, num_train=40, num_zeroshot_per_class=1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def digest(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_hallucination_share_and_what_the_detailed_caption_says():
    spec = DemoSpec(seed=2, num_train=2000, detailed_captions=True, hallucination_rate=0.3)
    samples = demo.make_train_samples(spec)
    detailed = demo.make_detailed_captions(spec, samples)
    wrong = [d.wrong for d in detailed if d.wrong is not None]
    assert len(wrong) == round(0.3 * 2000) == 600  # drawn exactly, not by coin flips
    # the wrong attribute is uniform over the four: each share within 4 binomial sigmas of 150
    counts = Counter(wrong)
    assert set(counts) == set(ATTRIBUTES)
    assert all(abs(c - 150) < 4 * math.sqrt(600 * 0.25 * 0.75) for c in counts.values()), counts
    for s, d in zip(samples, detailed, strict=True):
        said = mentioned_scene(d.caption)  # size, colour, shape and background are all named
        assert said is not None, d.caption
        differ = [a for a in ATTRIBUTES if getattr(said, a) != getattr(s.scene, a)]
        assert differ == ([d.wrong] if d.wrong else []), (s.scene, d)
    assert not any(a in s.caption for s in samples for a in demo.SIZES + tuple(demo.BACKGROUNDS))  # generic: never


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_hallucination_rate_bounds(rate):
    spec = DemoSpec(seed=1, num_train=30, detailed_captions=True, hallucination_rate=rate)
    detailed = demo.make_detailed_captions(spec, demo.make_train_samples(spec))
    assert sum(d.wrong is not None for d in detailed) == round(rate * 30)


def test_detailed_data_leaves_the_default_data_byte_identical(tmp_path):
    plain = write_dataset(tmp_path / "plain", SMALL, progress=False)
    spec = DemoSpec(**{**SMALL.__dict__, "detailed_captions": True})
    rich = write_dataset(tmp_path / "rich", spec, progress=False)
    a, b = digest(plain.root), digest(rich.root)
    assert set(b) - set(a) == {"train/captions_detailed.jsonl"}
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"dataset.json", "train_truth.jsonl"}  # images, manifest, generic captions, test sets: same
    # the truth file only gains the two detailed keys; dataset.json only the option and its counts
    truth = read_jsonl(rich.truth)
    stripped = [{k: v for k, v in t.items() if not k.startswith("detailed_")} for t in truth]
    assert stripped == read_jsonl(plain.truth)
    assert sum(t["detailed_hallucinated"] for t in truth) == round(0.3 * 40)
    assert all((t["detailed_wrong"] is not None) == t["detailed_hallucinated"] for t in truth)
    info, plain_info = json.loads(rich.info.read_text()), json.loads(plain.info.read_text())
    assert "detailed_captions" not in plain_info["spec"]  # the default's dataset.json as before the option
    assert info["spec"] == {**plain_info["spec"], "detailed_captions": True, "hallucination_rate": 0.3}
    assert info["detailed_hallucinated"] == 12 == sum(info["detailed_wrong"].values())
    # the second sidecar is in the generic one's format: data2rec's reader takes it
    by_key, _ = read_caption_sidecar(rich.detailed_captions)
    assert sorted(by_key) == [t["key"] for t in truth]
    assert read_jsonl(rich.detailed_captions)[0]["meta"]["format"] == "alip-caption-sidecar"
    with pytest.raises(FileExistsError, match="other settings"):  # one folder, one spec
        write_dataset(tmp_path / "plain", spec, progress=False)


def test_options_are_checked():
    with pytest.raises(ValueError, match="hallucination_rate"):
        DemoSpec(detailed_captions=True, hallucination_rate=1.5)
    with pytest.raises(DemoOptionError, match="needs --detailed-captions"):
        demo_spec(build_parser().parse_args(["--hallucination-rate", "0.2"]), {})
    spec = demo_spec(build_parser().parse_args(["--detailed-captions", "--hallucination-rate", "0.2"]), {})
    assert spec.detailed_captions and spec.hallucination_rate == 0.2
    assert not demo_spec(build_parser().parse_args([]), {}).detailed_captions


def _benchmark():
    spec = importlib.util.spec_from_file_location("demo_multi_caption", ROOT / "benchmarks/demo_multi_caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_seed_reports_metrics_and_the_hallucination_auc(tmp_path):
    bench = _benchmark()
    record = bench.run_seed(0, tmp_path / "seed0", ["generic", "all"], quick=True)
    meta = schema.read_meta(tmp_path / "seed0" / "shards" / "train.meta.json")
    assert meta.texts == ["raw", "generic", "detailed"]  # K = 2 shards, slots named
    assert set(record["metrics"]) == {"generic", "all"}
    assert set(record["metrics"]["all"]) == {"zero-shot top1", "retrieval i2t R@1", "retrieval t2i R@1"}
    h = record["hallucination"]
    for key in ("auc_s_ic", "auc_dcg_weight", "auc_dcg_weight_applied", "auc_lcg_weight"):
        assert 0.0 <= h[key] <= 1.0, key
    assert h["auc_dcg_weight"] == pytest.approx(h["auc_s_ic"])  # the DCG weight is monotone in s_ic
    assert h["pairs"] == 256 and h["hallucinated"] == round(0.3 * 256)
    assert set(h["by_attribute"]) == set(ATTRIBUTES) and h["mu_ic_detailed"] < 1.0  # the EMA moved
    config = (tmp_path / "seed0" / "runs" / "generic" / "config.yaml").read_text()
    assert "detailed: 0.0" in config
    agg = bench.aggregate([record, {**record, "seed": 1}])
    assert agg["paired"]["all - generic"]["zero-shot top1"][1] == 0.0
    assert "| all - generic, same seed" in bench.markdown(agg).replace("*", "")
