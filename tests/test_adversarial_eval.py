"""Adversarial sweep, evaluation inputs (issue 17, item 5): class names that do not fit the dataset
and empty name or template files fail before any feature is extracted; retrieval images without
captions are counted, warned about and recorded, never dropped silently."""

import json
import logging

import pytest
from test_eval_formats import (
    CIFAR10_CLASSES,
    RETRIEVAL_KEYS,
    write_coco_annotations,
    write_imagefolder,
    write_karpathy,
    write_wds_classification,
)
from torchvision.transforms import ToTensor

import alip.eval.__main__ as eval_cli
from alip.eval.datasets import DatasetError, load_classification
from alip.eval.retrieval_formats import load_retrieval

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "ALIP-Tiny", "--workers", "0", "--batch-size", "8", "--log-level", "WARNING"]


@pytest.fixture
def no_extraction(monkeypatch):
    """Fail the test if any image or text feature is computed: the errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("features were extracted before the error")

    for name in ("evaluate_zeroshot", "evaluate_retrieval", "extract_features"):
        monkeypatch.setattr(eval_cli, name, refuse)


def zeroshot(tmp_path, *extra):
    return eval_cli.cli(["zeroshot", *TINY, "--data", str(tmp_path), "--output", str(tmp_path / "r.json"), *extra])


def test_more_class_names_than_class_folders_is_an_error(tmp_path, capsys, no_extraction):
    root = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:4], per_class=[1, 1, 1])  # 4 names, 3 folders
    with pytest.raises(DatasetError, match=r"4 class names \(classnames.txt\) for 3 classes in .*toy"):
        load_classification("toy", root, "test", ToTensor())
    assert zeroshot(root, "--dataset", "toy") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 class names") and err.count("\n") == 1 and "Traceback" not in err


def test_fewer_class_names_fail_before_feature_extraction(tmp_path, capsys, no_extraction):
    root = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:3], per_class=[1, 1, 1])
    names = tmp_path / "two.txt"
    names.write_text("cat\ndog\n")
    assert zeroshot(root, "--dataset", "toy", "--classnames", str(names)) == 2
    assert f"error: 2 class names ({names}) for 3 classes" in capsys.readouterr().err
    # a webdataset has labels, not a class list: the largest label must have a name
    wds = write_wds_classification(tmp_path / "wds", CIFAR10_CLASSES[:3], labels=[0, 4, 1])
    with pytest.raises(DatasetError, match=r"3 class names \(classnames.txt\), but .*wds has labels up to 4"):
        load_classification("wds", wds, "test", ToTensor())


def test_empty_templates_or_class_names_files_are_errors_not_defaults(tmp_path, capsys, no_extraction):
    root = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:2], per_class=[1, 1])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert zeroshot(root, "--dataset", "toy", "--templates", str(empty)) == 2
    assert f"error: {empty} is empty: it must list the templates, one per line" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="must list the class names"):
        load_classification("toy", root, "test", ToTensor(), classnames_file=empty)
    (root / "templates.txt").write_text("")  # the dataset's own template file, empty
    with pytest.raises(DatasetError, match=r"templates.txt is empty"):
        load_classification("toy", root, "test", ToTensor())


def test_every_dataset_is_checked_before_the_first_is_evaluated(tmp_path, capsys, no_extraction):
    write_imagefolder(tmp_path / "good", CIFAR10_CLASSES[:2], per_class=[1, 1])
    write_imagefolder(tmp_path / "bad", CIFAR10_CLASSES[:3], per_class=[1, 1])
    assert zeroshot(tmp_path, "--dataset", "good", "bad") == 2  # no_extraction: "good" was not evaluated first
    assert "3 class names (classnames.txt) for 2 classes" in capsys.readouterr().err


@pytest.mark.parametrize("writer", [write_karpathy, write_coco_annotations])
def test_retrieval_images_without_captions_are_counted_and_recorded(tmp_path, writer, caplog, capsys):
    path = writer(tmp_path)
    data = json.loads(path.read_text())
    if "annotations" in data:  # COCO: image 102 loses its annotations
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    else:  # Karpathy: image 2 keeps its entry, without sentences
        data["images"][2]["sentences"] = []
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="alip.eval.datasets"):
        loaded = load_retrieval(path, tmp_path)
    n = len(RETRIEVAL_KEYS)
    assert len(loaded.images) == n - 1 and len(loaded.captions) == 5 * (n - 1)
    assert loaded.notices == {"images_without_captions": 1}
    assert "1 images have no caption and are left out" in caplog.text
    out = tmp_path / "r.json"
    record = eval_cli.main(
        ["retrieval", *TINY, "--annotations", str(path), "--images", str(tmp_path), "--output", str(out)]
    )
    (saved,) = json.loads(out.read_text())["datasets"]
    assert saved["notices"] == {"images_without_captions": 1} and saved["num_images"] == n - 1
    assert record["datasets"][0]["notices"] == saved["notices"]
    assert f"notice: {loaded.name}: 1 images without captions left out" in capsys.readouterr().out


def test_blank_captions_are_counted(tmp_path):
    path = write_karpathy(tmp_path)
    data = json.loads(path.read_text())
    data["images"][0]["sentences"][1]["raw"] = "   "
    path.write_text(json.dumps(data))
    loaded = load_retrieval(path, tmp_path)
    assert loaded.notices == {"blank_captions": 1} and len(loaded.captions) == 5 * len(RETRIEVAL_KEYS) - 1
