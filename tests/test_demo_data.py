"""The demo's generated dataset: deterministic for a seed, the declared noise, clean test sets."""

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from alip.demo import data as demo
from alip.demo.data import BACKGROUNDS, COLOURS, NOISE_KINDS, SHAPES, SIZES, DemoSpec, Scene, write_dataset

SMALL = DemoSpec(seed=3, num_train=250, num_zeroshot_per_class=1, noise_rate=0.4)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> demo.DemoData:
    return write_dataset(tmp_path_factory.mktemp("demo") / "data", SMALL, progress=False)


def test_same_seed_gives_identical_files_and_another_seed_differs(small, tmp_path):
    again = write_dataset(tmp_path / "again", SMALL, progress=False)
    assert tree_digest(small.root) == tree_digest(again.root)
    other = write_dataset(tmp_path / "other", DemoSpec(**{**SMALL.__dict__, "seed": 4}), progress=False)
    a, b = tree_digest(small.root), tree_digest(other.root)
    assert a.keys() == b.keys()
    assert a["train/manifest.jsonl"] != b["train/manifest.jsonl"]
    assert a["train/images/000000.jpg"] != b["train/images/000000.jpg"]


def test_declared_noise_rate_and_kinds(small):
    truth = read_jsonl(small.truth)
    assert len(truth) == SMALL.num_train
    noisy = [t for t in truth if t["noisy"]]
    assert len(noisy) == round(SMALL.noise_rate * SMALL.num_train) == 100
    kinds = Counter(t["noise"] for t in noisy)
    assert set(kinds) == set(NOISE_KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
    assert all(t["noise"] is None for t in truth if not t["noisy"])
    info = json.loads(small.info.read_text())
    assert info["noisy"] == 100 and info["noise_kinds"] == dict(sorted(kinds.items()))


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_noise_rate_is_exact_for_any_rate(rate):
    samples = demo.make_train_samples(DemoSpec(seed=1, num_train=40, noise_rate=rate))
    assert sum(s.noise is not None for s in samples) == round(rate * 40)


def test_texts_carry_what_they_claim(small):
    manifest = {r["key"]: r for r in read_jsonl(small.manifest)}
    captions = {r["key"]: r["caption"] for r in read_jsonl(small.captions) if "key" in r}
    truth = {t["key"]: t for t in read_jsonl(small.truth)}
    # the training path never sees the flags: the manifest has the three columns data2rec reads
    assert all(set(r) == {"key", "image", "text"} for r in manifest.values())
    for key, t in truth.items():
        scene = Scene(t["colour"], t["shape"], t["size"], t["background"])
        raw, cap = manifest[key]["text"], captions[key]
        # the synthetic caption: always right, generic (colour and shape, never size or background)
        assert f"{scene.colour} {scene.shape}" in cap
        assert not any(w in cap.split() for w in (*SIZES, *BACKGROUNDS))
        if t["noise"] is None or t["noise"] == "swap" or t["noise"] == "attribute":
            said = demo.mentioned_scene(raw)
            wrong = sum(getattr(said, f) != getattr(scene, f) for f in ("colour", "shape", "size", "background"))
            if t["noise"] is None:
                assert wrong == 0, raw
            elif t["noise"] == "attribute":
                assert wrong == 1, raw
            else:
                assert wrong >= 1, raw  # another sample's text, about another scene
        elif t["noise"] == "empty":
            assert raw == "" and demo.mentioned_scene(raw) is None
        elif t["noise"] == "hashtags":
            assert raw and all(w.startswith("#") for w in raw.split()) and demo.mentioned_scene(raw) is None
        else:
            assert t["noise"] == "filename" and " " not in raw and "." in raw or raw.startswith("DCIM_")


def test_images_and_test_sets(small):
    img = Image.open(small.root / "train" / "images" / "000000.jpg")
    assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
    names = (small.zeroshot / "classnames.txt").read_text().splitlines()
    assert len(names) == len(COLOURS) * len(SHAPES) == len(set(names))
    folders = sorted(p for p in small.zeroshot.iterdir() if p.is_dir())
    assert [f.name.split("_", 1)[1].replace("_", " ") for f in folders] == names  # sorted order == class order
    assert all("{c}" in t for t in (small.zeroshot / "templates.txt").read_text().splitlines())
    ret = json.loads(small.retrieval.read_text())
    texts = [e["sentences"][0]["raw"] for e in ret["images"]]
    assert len(texts) == len(set(texts)) == len(SIZES) * len(COLOURS) * len(SHAPES) * len(BACKGROUNDS)
    assert all((small.retrieval.parent / e["filepath"] / e["filename"]).is_file() for e in ret["images"])


def test_the_evaluators_read_the_test_sets(small):
    from alip.eval.datasets import load_classification
    from alip.eval.retrieval_formats import load_retrieval

    cls = load_classification("shapes", small.zeroshot, "test", None)
    assert len(cls) == 48 and cls.templates == list(demo.ZEROSHOT_TEMPLATES)
    assert cls.source["templates"] == "templates.txt"
    ret = load_retrieval(str(small.retrieval), str(small.retrieval.parent))
    assert len(ret.images) == 288


def test_reuse_and_refusal(small):
    assert write_dataset(small.root, SMALL, progress=False) == small  # same spec: reused as is
    with pytest.raises(FileExistsError, match="other settings"):
        write_dataset(small.root, DemoSpec(seed=9, num_train=250), progress=False)


def test_spec_validation():
    with pytest.raises(ValueError, match="noise_rate"):
        DemoSpec(noise_rate=1.5)
    with pytest.raises(ValueError, match="num_train"):
        DemoSpec(num_train=1)


def test_noise_kinds_individually():
    rng = random.Random(0)
    scene = Scene("red", "circle", "small", "white")
    other = Scene("blue", "star", "large", "black")
    assert "blue star" in demo.noisy_raw_text("swap", scene, other, rng)
    with pytest.raises(ValueError, match="differs"):
        demo.noisy_raw_text("swap", scene, scene, rng)
    changed = demo.wrong_attribute(scene, rng)
    assert sum(getattr(changed, f) != getattr(scene, f) for f in ("colour", "shape", "size", "background")) == 1
    with pytest.raises(ValueError, match="unknown noise kind"):
        demo.noisy_raw_text("typo", scene, other, rng)
