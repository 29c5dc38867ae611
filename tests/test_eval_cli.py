"""`python -m alip.eval` end to end on a random ALIP-Tiny, and the trainer-facing Evaluator."""

import json
import subprocess
import sys

import pytest
import torch
from test_eval_formats import CIFAR10_CLASSES, KeyStub, write_cifar10, write_imagefolder, write_karpathy

import alip
from alip.eval import Evaluator
from alip.eval.__main__ import main
from alip.files import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    return str(alip.export_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def test_help_explains_the_layouts():
    out = subprocess.run([sys.executable, "-m", "alip.eval", "zeroshot", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "cifar-10-batches-py" in out.stdout and "dataset_coco.json" in out.stdout


def test_zeroshot_cli_writes_results(tmp_path, checkpoint, capsys, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    write_cifar10(tmp_path / "cifar10")
    write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:3], per_class=[2, 1, 2])
    out = tmp_path / "zs.json"
    common = ["--model", "ALIP-Tiny", "--checkpoint", checkpoint, "--workers", "0", "--batch-size", "16"]
    record = main(["zeroshot", *common, "--data", str(tmp_path), "--dataset", "cifar10", "toy", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["model"]["checkpoint_sha256"] == sha256_file(checkpoint)
    assert saved["settings"]["precision"] == "fp32" and saved["versions"]["torch"] == torch.__version__.split("+")[0]
    cifar, toy = saved["datasets"]
    assert (cifar["name"], cifar["split"], cifar["num_samples"], cifar["num_classes"]) == ("cifar10", "test", 30, 10)
    assert len(cifar["templates_sha256"]) == 64 and cifar["templates_sha256"] != toy["templates_sha256"]
    assert set(cifar["metrics"]) >= {"top1", "top5", "mean_per_class_recall", "paper_metric", "paper_value"}
    assert toy["num_samples"] == 5
    table = capsys.readouterr().out
    assert "cifar10" in table and "mean_per_class_recall" in table


def test_retrieval_and_linear_probe_cli(tmp_path, checkpoint, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    common = ["--model", "ALIP-Tiny", "--checkpoint", checkpoint, "--workers", "0"]
    ann = write_karpathy(tmp_path, n=6)
    rec = main(
        [
            "retrieval",
            *common,
            "--annotations",
            str(ann),
            "--images",
            str(tmp_path),
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    (coco,) = rec["datasets"]
    assert (coco["name"], coco["num_images"], coco["num_texts"]) == ("coco", 6, 30)
    assert set(coco["metrics"]) >= {"i2t_R@1", "i2t_R@10", "t2i_R@5", "mean_recall"}

    write_cifar10(tmp_path / "c10")
    probe = [
        "linear-probe",
        *common,
        "--data",
        str(tmp_path / "c10"),
        "--dataset",
        "cifar10",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--c-grid",
        "0.1",
        "10",
        "--refine-steps",
        "1",
        "--feature",
        "pre-projection",
    ]
    first = main([*probe, "--output", str(tmp_path / "p1.json")])
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2  # train and test
    second = main([*probe, "--output", str(tmp_path / "p2.json")])  # from the cache
    (a,), (b,) = first["datasets"], second["datasets"]
    assert a["num_train"] == 50 and a["num_samples"] == 30 and a["feature"] == "pre-projection"
    assert a["metrics"]["top1"] == b["metrics"]["top1"] and a["metrics"]["best_C"] == b["metrics"]["best_C"]
    assert [s["C"] for s in a["metrics"]["sweep"]][0] == 0.1


def test_evaluator_interface(tmp_path):
    write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:4], per_class=[3, 3, 3, 3])
    ann = write_karpathy(tmp_path)
    from torchvision.transforms import ToTensor

    words = ["apple", "bicycle", "castle", "dolphin", "elephant", "forest", "guitar", "harbor", "island"]
    ev = Evaluator.from_paths(
        every_steps=100,
        tokenizer=alip.get_tokenizer("ALIP-Tiny"),
        transform=ToTensor(),
        retrieval=str(ann),
        retrieval_images=str(tmp_path),
        zeroshot=str(tmp_path / "toy"),
        max_samples=5,
        num_workers=0,
    )
    assert [ev.should_run(s) for s in (0, 99, 100, 150, 200)] == [False, False, True, False, True]
    stub = KeyStub(words + CIFAR10_CLASSES[:4])  # keys 0..8 are the images, class keys come after
    stub.train()
    metrics = ev.run(stub)
    assert stub.training  # restored
    assert metrics["eval/coco/i2t_R@1"] == 100.0 and metrics["eval/coco/t2i_R@1"] == 100.0
    assert set(metrics) >= {"eval/coco/mean_recall", "eval/toy/top1", "eval/toy/mean_per_class_recall"}
    assert len(ev.retrieval[0].images) == 5 and len(ev.classification[0].dataset) == 5  # the fast subset
