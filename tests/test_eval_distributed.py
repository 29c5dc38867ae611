"""2 gloo processes give exactly the metrics of 1 process, on datasets whose sizes do not divide by 2."""

import os

import pytest
import torch
import torch.distributed as dist
from dist_harness import join_rank_env, run_ranks
from test_eval_formats import CIFAR10_CLASSES, write_imagefolder, write_karpathy

import alip
from alip.eval.datasets import load_classification
from alip.eval.features import TensorRows, extract_features
from alip.eval.retrieval import evaluate_retrieval, retrieval_features
from alip.eval.retrieval_formats import load_retrieval
from alip.eval.zeroshot import evaluate_zeroshot

WORLD = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def run_all(data_dir):
    """Metrics and features of a random ALIP-Tiny on 7 images / 7 images x 5 captions, plus an identity check."""
    torch.manual_seed(0)
    model, _, preprocess = alip.create_model("ALIP-Tiny")
    tok = alip.get_tokenizer("ALIP-Tiny")
    cls = load_classification("toy", os.path.join(data_dir, "folder"), "test", preprocess)
    ret = load_retrieval(os.path.join(data_dir, "dataset_coco.json"), data_dir)
    kw = dict(batch_size=3, num_workers=0)
    rows = torch.arange(11 * 3, dtype=torch.float32).view(11, 3)  # 11 samples: shards of 6 and 5
    identity, labels = extract_features(
        [(r, i % 4) for i, r in enumerate(rows)], lambda x: x, with_labels=True, batch_size=4, num_workers=0
    )
    return {
        "zeroshot": evaluate_zeroshot(model, tok, cls, **kw),
        "retrieval": evaluate_retrieval(model, tok, ret, preprocess, **kw),
        "features": retrieval_features(model, tok, ret, preprocess, **kw),
        "identity": (identity, labels, extract_features(TensorRows(rows), lambda x: 2 * x, num_workers=0)[0]),
    }


def _worker(rank, port, data_dir, out_dir):
    join_rank_env(rank, WORLD, port)
    alip.init_distributed(timeout_s=60)
    torch.save(run_all(data_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldist")
    write_imagefolder(root / "folder", CIFAR10_CLASSES[:3], per_class=[3, 1, 3])  # 7 images
    write_karpathy(root, n=7)  # 7 images, 35 captions
    return str(root)


def test_two_ranks_equal_one_rank(data_dir, tmp_path):
    run_ranks(_worker, (data_dir, str(tmp_path)), nprocs=WORLD)
    single = run_all(data_dir)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for got in ranks:  # every rank holds the full result
        assert got["zeroshot"] == single["zeroshot"]  # exactly, every metric and count
        assert got["retrieval"] == single["retrieval"]
        for a, b in zip(got["features"], single["features"], strict=True):
            assert a.shape == b.shape  # 7 image rows, 35 caption rows: no padding, nothing twice
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # other batch shapes: float-level only
        identity, labels, doubled = got["identity"]
        rows = torch.arange(33, dtype=torch.float32).view(11, 3)
        assert torch.equal(identity, rows) and torch.equal(doubled, 2 * rows)  # dataset order, exact
        assert labels.tolist() == [i % 4 for i in range(11)]
    assert single["zeroshot"]["num_samples"] == 7 and single["retrieval"]["num_texts"] == 35
