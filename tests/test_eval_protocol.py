"""The two evaluation protocols (alip.eval.protocol): CLIP_benchmark 1.6.2's figures, ties included, and the
official release's retrieval and zero-shot rules, checked against CLIP_benchmark's own functions and against
direct computations written here from the release's semantics.
"""

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# CLIP_benchmark 1.6.2 (installed --no-deps): its retrieval metric module imports only torch and tqdm, its
# classification module scikit-learn; both import as they are, no stub needed.
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from PIL import Image
from test_eval_formats import CIFAR10_CLASSES, KeyStub, key_image, tokenizer, write_imagefolder
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

import alip
from alip.cli import UserError
from alip.eval.__main__ import cli, main
from alip.eval.datasets import DatasetError
from alip.eval.metrics import classification_metrics, retrieval_metrics
from alip.eval.protocol import (
    imagenet_padded_rows,
    load_protocol_classification,
    release_imagenet_transform,
    release_split_indices,
    resolve_protocol,
)
from alip.eval.retrieval import evaluate_retrieval
from alip.eval.retrieval_formats import load_retrieval
from alip.eval.zeroshot import evaluate_zeroshot, score_logits

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ["apple", "bicycle", "castle", "dolphin", "elephant", "forest", "guitar"]
# no caption starts with "a photo of", so the release's prefix is the only one
PHRASES = ["there is a {} in this picture", "the {}, seen from the left", "close-up of one {} outdoors"]


# ------------------------------------------------------------------------------------------------
# data and models


def write_retrieval_set(root: Path, image_keys: list[int], folder: str = "images") -> dict:
    """Images (red channel = key) under root/folder and, per image, one caption per phrase naming its key.
    Images with the same key are duplicates; so are their captions (identical strings)."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, key in enumerate(image_keys):
        key_image(key).save(root / folder / f"img{i}.png")
        entries.append((f"img{i}.png", [p.format(KEYS[key]) for p in PHRASES]))
    return {"folder": folder, "entries": entries}


def write_karpathy_json(root: Path, spec: dict) -> Path:
    images = [
        {"filepath": spec["folder"], "filename": f, "split": "test", "sentences": [{"raw": c} for c in caps]}
        for f, caps in spec["entries"]
    ]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def write_albef_json(root: Path, spec: dict, name: str = "coco_test.json") -> Path:
    path = root / name
    path.write_text(json.dumps([{"image": f"{spec['folder']}/{f}", "caption": caps} for f, caps in spec["entries"]]))
    return path


def one_hot_stub(words: list[str], shift: int = 0) -> KeyStub:
    """KeyStub with one-hot embeddings: every score is exactly 0 or 1, whatever the matmul's order."""
    stub = KeyStub(words, shift)
    stub.table = torch.eye(stub.table.shape[1])[: len(words)].contiguous()
    return stub


class PrefixStub(KeyStub):
    """A known answer for the caption prefix: a text starting with 'a photo of' gets its key's embedding,
    any other text the NEXT key's (so without the prefix every caption points at the wrong image)."""

    def __init__(self, words: list[str]):
        super().__init__(words)
        self.register_buffer("prefix_ids", alip.get_tokenizer("ALIP-Tiny")(["a photo of"])[0, 1:4].clone())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        correct = super().encode_text(tokens)
        wrong = torch.roll(self.table, -1, dims=0)[(correct @ self.table.T).argmax(dim=1)]
        prefixed = (tokens[:, 1:4] == self.prefix_ids).all(dim=1)
        return torch.where(prefixed[:, None], correct, wrong)


class CBRetrievalSet(Dataset):
    """The same set as CLIP_benchmark's retrieval datasets present it: (image, [captions]) per image."""

    def __init__(self, root: Path, spec: dict):
        self.items = [(root / spec["folder"] / f, caps) for f, caps in spec["entries"]]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caps = self.items[i]
        return ToTensor()(Image.open(path).convert("RGB")), caps


def cb_collate(batch):
    images, captions = zip(*batch, strict=True)
    return torch.stack(images), list(captions)


# ------------------------------------------------------------------------------------------------
# (a) the default protocol is CLIP_benchmark's, ties included


def cb_recalls(scores_txt_img: torch.Tensor, positive: torch.Tensor, ks=(1, 5, 10), batch_size=7) -> dict:
    """CLIP_benchmark's `evaluate` from the score matrix on: batchify(recall_at_k) > 0, averaged, in percent."""
    out = {}
    for k in ks:
        i2t = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores_txt_img.T, positive.T, batch_size, "cpu", k=k)
        t2i = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores_txt_img, positive, batch_size, "cpu", k=k)
        out[f"i2t_R@{k}"] = 100 * (i2t > 0).float().mean().item()
        out[f"t2i_R@{k}"] = 100 * (t2i > 0).float().mean().item()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_retrieval_equals_clip_benchmark_recall_at_k_with_duplicate_captions(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img, per_image = 40, 5
    text_to_image = torch.arange(n_img).repeat_interleave(per_image)
    txt = torch.randint(0, 3, (n_img * per_image, 6), generator=gen).float()  # coarse: many equal scores
    dup = torch.randperm(len(txt), generator=gen)[:60]
    txt[dup[30:]] = txt[dup[:30]]  # 30 captions repeated verbatim under other images
    img = txt[torch.arange(n_img) * per_image] + 0.5 * torch.randint(0, 2, (n_img, 6), generator=gen).float()
    sim = img @ txt.T  # [N_img, N_txt], small integers: exact ties
    positive = torch.zeros(len(txt), n_img, dtype=torch.bool)
    positive[torch.arange(len(txt)), text_to_image] = True

    ours = retrieval_metrics(sim, text_to_image, ks=(1, 5, 10))  # default: topk
    ref = cb_recalls(sim.T.contiguous(), positive)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key
    # The pessimistic rule is still there by name: never above, and ties make it lower on this data.
    pessimistic = retrieval_metrics(sim, text_to_image, ties="pessimistic")
    assert all(pessimistic[k] <= ours[k] for k in ref) and pessimistic["mean_recall"] < ours["mean_recall"]


def test_default_retrieval_equals_clip_benchmark_evaluate_end_to_end(tmp_path):
    """Ten of the twelve images come in pairs: the same picture with the same captions (as in real
    annotation sets). CLIP_benchmark's own `evaluate` and ours give the same figures, ties included."""
    spec = write_retrieval_set(tmp_path, [0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 1, 3])
    model = one_hot_stub(KEYS)
    loader = DataLoader(CBRetrievalSet(tmp_path, spec), batch_size=3, collate_fn=cb_collate)
    ref = cb_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    data = load_retrieval(write_karpathy_json(tmp_path, spec), tmp_path)
    ours = evaluate_retrieval(model, tokenizer, data, ToTensor(), batch_size=4, num_workers=0)
    for k in (1, 5, 10):
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * ref[f"text_retrieval_recall@{k}"], abs=1e-4)
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * ref[f"image_retrieval_recall@{k}"], abs=1e-4)
    pessimistic = evaluate_retrieval(model, tokenizer, data, ToTensor(), num_workers=0, ties="pessimistic")
    assert pessimistic["i2t_R@1"] == pytest.approx(100 * 2 / 12)  # the 10 duplicated images all miss
    assert ours["i2t_R@1"] > pessimistic["i2t_R@1"]  # topk hits some of them


def cb_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    """CLIP_benchmark 1.6.2's `zeroshot_classification.accuracy`: one `topk(max K)` call, the first K columns.
    Its own function ends in `float(ndarray of shape (1,))`, which numpy >= 2.4 refuses, so it is restated."""
    pred = logits.topk(max(ks), 1, True, True)[1].t()  # [K, N]
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in ks]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_default_classification_equals_clip_benchmark_accuracy_with_ties():
    from sklearn.metrics import balanced_accuracy_score

    gen = torch.Generator().manual_seed(0)
    for n_classes in (3, 10, 100):
        logits = torch.randint(0, 3, (300, n_classes), generator=gen).float()  # ties everywhere
        target = torch.randint(0, n_classes, (300,), generator=gen)
        ours = classification_metrics(logits, target)
        ks = (1, 5) if n_classes >= 5 else (1,)  # CLIP_benchmark's choice below 5 classes
        for k, value in zip(ks, cb_accuracy(logits, target, ks), strict=True):
            assert ours[f"top{k}"] == pytest.approx(100 * value, abs=1e-9)
        mpc = balanced_accuracy_score(target, logits.argmax(axis=1))  # CLIP_benchmark's mean-per-class recall
        assert ours["mean_per_class_recall"] == pytest.approx(100 * mpc, abs=1e-9)
        pessimistic = classification_metrics(logits, target, ties="pessimistic")
        assert pessimistic["top1"] < ours["top1"] or n_classes == 100  # the rule matters (100: both ~0)


# ------------------------------------------------------------------------------------------------
# (b) the release's retrieval: 'a photo of ' before every caption, ranks of a descending argsort


def release_recalls(sim: torch.Tensor, text_to_image: list[int], ks=(1, 5, 10)) -> dict:
    """The release's `compute_retrieval`, as a per-query loop: a descending argsort per row, the position of
    the correct item; for an image, the best of its captions. The sort is stable, as torch's CUDA radix sort
    the release ran on (torch's CPU argsort without stable=True is not, above 16 items)."""

    def order(row: torch.Tensor) -> torch.Tensor:
        return torch.argsort(row, descending=True, stable=True)

    n_img, n_txt = sim.shape
    t2i = [torch.where(order(sim[:, t]) == text_to_image[t])[0][0].item() for t in range(n_txt)]
    i2t = []
    for i in range(n_img):
        ranked = order(sim[i])
        i2t.append(min(torch.where(ranked == t)[0][0].item() for t in range(n_txt) if text_to_image[t] == i))
    out = {f"i2t_R@{k}": 100.0 * sum(r < k for r in i2t) / n_img for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * sum(r < k for r in t2i) / n_txt for k in ks})
    return out


def test_release_prefix_known_answer(tmp_path):
    spec = write_retrieval_set(tmp_path, list(range(6)))
    data = load_retrieval(write_karpathy_json(tmp_path, spec), tmp_path)
    # the six keys of the images only: a caption without the prefix points at the NEXT image's key, so every
    # image has one clearly wrong best caption (a seventh key would leave the first image with near-zero
    # scores only, where rounding decides the order)
    model = PrefixStub(KEYS[:6])
    release = resolve_protocol("release")
    assert release.caption_prefix == "a photo of " and release.ties == "release"
    kw = dict(batch_size=4, num_workers=0)
    ours = evaluate_retrieval(model, tokenizer, data, ToTensor(), caption_prefix=release.caption_prefix, **kw)
    assert ours["i2t_R@1"] == 100.0 and ours["t2i_R@1"] == 100.0
    default = evaluate_retrieval(model, tokenizer, data, ToTensor(), **kw)
    assert default["i2t_R@1"] == 0.0 and default["t2i_R@1"] == 0.0  # no prefix: every caption misses


def test_release_retrieval_equals_direct_computation(tmp_path):
    """A tiny random model (fixed seed) on a set with duplicate images and captions: the release protocol
    equals the release's computation written out here, on features of the prefixed captions."""
    torch.manual_seed(0)
    model, _, preprocess = alip.create_model("ALIP-Tiny")
    model.eval()
    spec = write_retrieval_set(tmp_path, [0, 1, 1, 2, 3, 4, 4, 5, 6])
    data = load_retrieval(write_karpathy_json(tmp_path, spec), tmp_path)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in data.images])
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(["a photo of " + c for c in data.captions])), dim=-1)
    direct = release_recalls(img @ txt.T, data.text_to_image)
    release = resolve_protocol("release")
    ours = evaluate_retrieval(
        model,
        tokenizer,
        data,
        preprocess,
        batch_size=64,  # one batch, as the direct computation: bit-identical features
        num_workers=0,
        caption_prefix=release.caption_prefix,
        ties=release.ties,
    )
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("n", [7, 40, 200, 5000])
def test_release_rule_is_the_stable_argsort_on_ties(n):
    gen = torch.Generator().manual_seed(n)
    sim = torch.randint(0, 3, (6, n), generator=gen).float()
    text_to_image = torch.randint(0, 6, (n,), generator=gen)
    text_to_image[:6] = torch.arange(6)  # every image has a caption
    ours = retrieval_metrics(sim, text_to_image, ties="release")
    ref = release_recalls(sim, text_to_image.tolist())
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------------------------
# (c) ALBEF annotation JSON


def test_albef_and_karpathy_json_give_the_same_metrics(tmp_path):
    spec = write_retrieval_set(tmp_path, [0, 1, 1, 2, 3, 4])
    karpathy = load_retrieval(write_karpathy_json(tmp_path, spec), tmp_path)
    albef = load_retrieval(write_albef_json(tmp_path, spec), tmp_path)  # auto-detected
    assert (albef.images, albef.captions, albef.text_to_image) == (
        karpathy.images,
        karpathy.captions,
        karpathy.text_to_image,
    )
    torch.manual_seed(0)
    model, _, preprocess = alip.create_model("ALIP-Tiny")
    for protocol in ("clip_benchmark", "release"):
        p = resolve_protocol(protocol)
        kw = dict(batch_size=8, num_workers=0, caption_prefix=p.caption_prefix, ties=p.ties)
        a = evaluate_retrieval(model, tokenizer, albef, preprocess, **kw)
        k = evaluate_retrieval(model, tokenizer, karpathy, preprocess, **kw)
        assert a == k


def test_albef_release_image_paths_and_caption_strings(tmp_path):
    """The release keeps only the file name of ALBEF's 'flickr30k-images/x.jpg' under its data root, so
    --images may be the folder holding the files; a single caption string is one caption."""
    spec = write_retrieval_set(tmp_path, [0, 1, 2], folder="flickr30k-images")
    path = tmp_path / "flickr30k_test.json"
    path.write_text(json.dumps([{"image": f"flickr30k-images/{f}", "caption": caps[0]} for f, caps in spec["entries"]]))
    data = load_retrieval(path, tmp_path / "flickr30k-images")
    assert data.images == [str(tmp_path / "flickr30k-images" / f"img{i}.png") for i in range(3)]
    assert len(data.captions) == 3 and data.name == "flickr30k_test"
    same = load_retrieval(path, tmp_path)  # ALBEF's own rule: <images>/<image>
    assert same.images == data.images


@pytest.mark.parametrize(
    "payload", [[{"file": "a.jpg"}], [], {"annotations": []}, {"images": [{"file_name": "a.jpg"}]}, "text"]
)
def test_unrecognised_json_is_a_clear_error(tmp_path, payload):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match="not a retrieval annotation JSON this reader knows.*ALBEF"):
        load_retrieval(path, tmp_path)


def test_unrecognised_json_is_one_error_line_in_the_cli(tmp_path, capsys):
    assert issubclass(DatasetError, UserError)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"file": "a.jpg", "text": "a cat"}]))
    status = cli(["retrieval", "--model", "ALIP-Tiny", "--annotations", str(path), "--images", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error:") and "ALBEF" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# (d) the release's zero-shot rules: int64-truncated logits, padded rows, splits, ImageNet transform


class MixStub(KeyStub):
    """Two classes. Class 0 images sit on class 0's embedding; class 1 images score 100 x cos = 50.2 with
    class 0 and 50.7 with class 1 (the rest of the unit vector is on a third, unused key): right with
    float logits, a tie after int64 truncation (50, 50)."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        key = torch.round(x[:, 0, 0, 0] * 255).long()
        a, b = 0.502, 0.507
        mix = a * self.table[0] + b * self.table[1] + (1 - a * a - b * b) ** 0.5 * self.table[2]
        return torch.where((key == 1)[:, None], mix, self.table[0])


def test_int64_truncation_changes_the_answer_where_it_should(tmp_path):
    from alip.eval.datasets import load_classification

    root = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:2], per_class=[4, 4])
    data = load_classification("toy", root, "test", ToTensor())
    model = MixStub(CIFAR10_CLASSES[:2] + ["castle"])
    kw = dict(batch_size=8, num_workers=0)
    exact = evaluate_zeroshot(model, tokenizer, data, **kw)
    assert exact["top1"] == 100.0 and exact["logits"] == "float"
    release = evaluate_zeroshot(model, tokenizer, data, ties="release", logits="int64-truncated", **kw)
    assert release["top1"] == 50.0 and release["logits"] == "int64-truncated"  # class 1 loses the tie to class 0
    assert release["mean_per_class_recall"] == 50.0
    float_release = evaluate_zeroshot(model, tokenizer, data, ties="release", **kw)
    assert float_release["top1"] == 100.0  # the tie rule alone changes nothing: the truncation does


def release_zeroshot(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """The release's `accuracy` and `metric_mean_per_class_accuracy` (topk(1) on the gathered CPU logits)."""
    pred = logits.topk(1, 1, True, True)[1][:, 0]
    correct = (pred == target).double()
    per_class = [correct[target == c].mean().item() for c in range(logits.shape[1])]
    return 100 * correct.mean().item(), 100 * sum(per_class) / len(per_class)


def test_release_classification_is_its_topk1_on_integer_ties():
    """int64 logits tie often; the release's top-1 is whatever its topk(1) picks: the first maximum from
    64 classes up, torch's own choice below. Ours calls it the same way, for every class count of the table."""
    gen = torch.Generator().manual_seed(0)
    for n_classes in (2, 10, 37, 47, 100, 101, 102, 196, 397, 1000):
        logits = torch.randint(20, 24, (2 * n_classes + 300, n_classes), generator=gen)  # int64, heavy ties
        target = torch.cat([torch.arange(n_classes), torch.randint(0, n_classes, (n_classes + 300,), generator=gen)])
        ours = classification_metrics(logits, target, ties="release", allow_integer=True)
        top1, mean_per_class = release_zeroshot(logits, target)
        assert ours["top1"] == pytest.approx(top1, abs=1e-9), n_classes
        assert ours["mean_per_class_recall"] == pytest.approx(mean_per_class, abs=1e-9), n_classes
        if n_classes >= 64:
            assert torch.equal(logits.topk(1, 1, True, True).indices[:, 0], logits.argmax(dim=1))


def test_padded_rows_counted_as_the_release_does():
    assert imagenet_padded_rows(50000, 8, 128) == 176  # 8 x (49 x 128 - 6250)
    assert imagenet_padded_rows(10, 3, 4) == 2  # shards 3, 3, 4 -> one padded row on each of the first two
    assert imagenet_padded_rows(256, 2, 128) == 0
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 1])  # 2 of 4 right
    plain = score_logits(scores, labels, ties="release", logits="float")
    padded = score_logits(scores, labels, ties="release", logits="float", padded_rows=4)
    assert plain["top1"] == 50.0 and padded["top1"] == 75.0 and padded["padded_rows"] == 4  # zero rows of class 0 hit
    assert score_logits(scores, labels, ties="pessimistic", logits="float", padded_rows=4)["top1"] == 25.0


def test_release_splits_and_imagenet_transform(tmp_path):
    test = release_split_indices(8677, (3000, 5677), 3072, 1, "caltech101")
    train = release_split_indices(8677, (3000, 5677), 3072, 0, "caltech101")
    assert len(test) == 5677 and sorted(train + test) == list(range(8677))
    assert test == release_split_indices(8677, (3000, 5677), 3072, 1, "caltech101")  # seeded
    with pytest.raises(DatasetError, match="exactly 8677 images"):
        release_split_indices(100, (3000, 5677), 3072, 1, "caltech101")
    folder = tmp_path / "caltech101" / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces", "accordion"):
        (folder / c).mkdir(parents=True)
        key_image(0).save(folder / c / "image_0001.jpg")
    release = resolve_protocol("release")
    with pytest.raises(DatasetError, match="101 classes, found 2"):
        load_protocol_classification(release, "caltech101", tmp_path / "caltech101", "test", ToTensor())
    sun = tmp_path / "sun397" / "SUN397"
    (sun / "a" / "abbey").mkdir(parents=True)
    (sun / "ClassName.txt").write_text("/a/abbey\n")
    key_image(0).save(sun / "a" / "abbey" / "sun_a.jpg")
    with pytest.raises(DatasetError, match="exactly 108754 images"):
        load_protocol_classification(release, "sun397", tmp_path / "sun397", "test", ToTensor())
    with pytest.raises(DatasetError, match="only the test split"):
        load_protocol_classification(release, "sun397", tmp_path / "sun397", "train", ToTensor())
    model_eval = Compose([Resize(224), CenterCrop(224), ToTensor(), Normalize((0.5,) * 3, (0.25,) * 3)])
    transform = release_imagenet_transform(model_eval)
    img = Image.new("RGB", (500, 300), (10, 200, 30))
    img.putpixel((250, 150), (255, 0, 0))
    expected = Normalize((0.5,) * 3, (0.25,) * 3)(ToTensor()(CenterCrop(224)(img.resize((426, 256), Image.BILINEAR))))
    assert torch.allclose(transform(img), expected, atol=1e-6)  # shorter side 256, centre 224


# ------------------------------------------------------------------------------------------------
# (e) the protocol and its options are in the results JSON


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    return str(alip.export_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def test_results_json_records_the_protocol(tmp_path, checkpoint):
    spec = write_retrieval_set(tmp_path, [0, 1, 2, 3])
    common = ["--model", "ALIP-Tiny", "--checkpoint", checkpoint, "--workers", "0"]
    ann = ["--annotations", str(write_albef_json(tmp_path, spec)), "--images", str(tmp_path)]
    default = main(["retrieval", *common, *ann, "--output", str(tmp_path / "d.json")])
    assert default["settings"]["protocol"] == "clip_benchmark" and default["settings"]["ties"] == "clip_benchmark"
    assert default["settings"]["caption_prefix"] == ""
    main(["retrieval", *common, *ann, "--protocol", "release", "--output", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert (saved["protocol"], saved["ties"], saved["caption_prefix"]) == ("release", "release", "a photo of ")

    write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:3], per_class=[2, 1, 2])
    zs = ["zeroshot", *common, "--data", str(tmp_path / "toy"), "--dataset", "toy"]
    release = main([*zs, "--protocol", "release", "--output", str(tmp_path / "z.json")])
    settings, (toy,) = release["settings"], release["datasets"]
    assert (settings["protocol"], settings["logits"], settings["imagenet_padding"]) == (
        "release",
        "int64-truncated",
        "8x128",
    )
    assert toy["metrics"]["logits"] == "int64-truncated" and "padded_rows" not in toy["metrics"]  # ImageNet only
    override = main(
        [
            *zs,
            "--protocol",
            "release",
            "--logits",
            "float",
            "--ties",
            "pessimistic",
            "--output",
            str(tmp_path / "o.json"),
        ]
    )
    assert (override["settings"]["logits"], override["settings"]["ties"]) == ("float", "pessimistic")


def test_release_imagenet_through_the_cli(tmp_path, checkpoint, monkeypatch):
    """`zeroshot --dataset imagenet1k --protocol release`: the loader gets the release's transform (resize
    to 256/224 of the crop, centre crop) and evaluate_zeroshot counts the padded rows of an 8 x 128 run."""
    import alip.eval.__main__ as eval_main
    import alip.eval.protocol as protocol

    toy = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:3], per_class=[2, 1, 2])
    real_load, real_evaluate = protocol.load_classification, eval_main.evaluate_zeroshot
    loaded, evaluated = [], []

    def load_classification(name, root, split, transform, *args):
        loaded.append((name, transform))
        return replace(real_load("toy", toy, split, transform), name=name)  # a toy ImageNet

    def recording_evaluate(model, tokenizer, data, **kwargs):
        evaluated.append((data, kwargs))
        return real_evaluate(model, tokenizer, data, **kwargs)

    monkeypatch.setattr(protocol, "load_classification", load_classification)
    monkeypatch.setattr(eval_main, "evaluate_zeroshot", recording_evaluate)
    common = ["--model", "ALIP-Tiny", "--checkpoint", checkpoint, "--workers", "0", "--data", str(tmp_path)]
    output = ["--output", str(tmp_path / "z.json")]
    record = main(["zeroshot", *common, "--dataset", "imagenet1k", "--protocol", "release", *output])
    ((name, transform),) = loaded
    ((data, kwargs),) = evaluated
    crop = transform.transforms[1].size[0]  # the model's eval crop
    assert name == "imagenet1k" and isinstance(transform.transforms[0], Resize)
    assert transform.transforms[0].size == int(256 / 224 * crop) and isinstance(transform.transforms[1], CenterCrop)
    assert data.name == "imagenet1k" and data.source["transform"].startswith("release: resize 256")
    assert kwargs["padded_rows"] == imagenet_padded_rows(5, 8, 128) > 0
    assert record["datasets"][0]["metrics"]["padded_rows"] == kwargs["padded_rows"]


@pytest.mark.parametrize(
    "script,env",
    [("run_retrieval.sh", {"COCO": "/data/coco", "FLICKR": "/data/flickr30k"}), ("run_zeroshot.sh", {"DATA": "/d"})],
)
def test_scripts_take_the_protocol(script, env):
    """PYTHON=echo prints each command the script would run."""
    path = Path(__file__).resolve().parents[1] / "scripts" / script
    base = {"PATH": os.environ["PATH"], "CHECKPOINT": "c.pt", "PYTHON": "echo", "NPROC": "1", **env}
    for protocol in ("release", None):
        extra = {"PROTOCOL": protocol} if protocol else {}
        out = subprocess.run(["bash", str(path)], env={**base, **extra}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines and all(f"--protocol {protocol or 'clip_benchmark'} " in line for line in lines)
