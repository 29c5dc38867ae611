"""World-size invariance of AlipLoss under DDP (2 gloo processes on CPU) and the launcher environment."""

import math
import os

import pytest
import torch
import torch.distributed as dist
from dist_harness import join_rank_env, run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

import alip

WORLD = 2
PER_RANK = 4
STEPS = 3  # the gate EMAs move between steps; each step must still agree
CASES = [  # (local_loss, gather_with_grad)
    (True, True),
    (False, True),
    (False, False),
    (True, False),
]


def _batch(n):
    gen = torch.Generator().manual_seed(123)
    image = torch.randn(n, 3, 64, 64, generator=gen)
    text = torch.randint(1, 49000, (n, 77), generator=gen)
    caption = torch.randint(1, 49000, (n, 77), generator=gen)
    # plausible token rows: start token, a few words, end token, zero padding
    for toks in (text, caption):
        toks[:, 0] = 49406
        toks[:, 9] = 49407
        toks[:, 10:] = 0
    return image, text, caption


def run_case(local_loss, gather_with_grad, rank, world_size):
    """Returns per step: loss (averaged over ranks), gate weights, EMA state and parameter grads."""
    torch.manual_seed(0)
    model, _, _ = alip.create_model("ALIP-Tiny")
    net = alip.BiPathCLIP(model)
    if world_size > 1:
        net = DDP(net)
    loss_fn = alip.AlipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
    image, text, caption = _batch(WORLD * PER_RANK)
    rows = slice(rank * (WORLD * PER_RANK // world_size), (rank + 1) * (WORLD * PER_RANK // world_size))
    steps = []
    for step in range(STEPS):
        model.zero_grad()
        out = net(image[rows] * (1 + 0.1 * step), text[rows], caption[rows])
        res = loss_fn(out["image_features"], out["raw_features"], out["caption_features"], out["logit_scale"])
        res["loss"].backward()
        loss = res["loss"].detach().clone()
        if world_size > 1:  # the global loss is the mean of the ranks' local means (equal row counts)
            dist.all_reduce(loss)
            loss /= world_size
        steps.append(
            {
                "loss": loss,
                "weights": torch.stack([res["weight_sample"], res["weight_raw"], res["weight_caption"]]),
                "ema": {k: v.clone() for k, v in loss_fn.state_dict().items()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        )
    return steps


def nan_on_one_rank(rank, world_size):
    """Rank 1 alone sees a NaN. Both ranks must raise the same error, then carry on in step."""
    torch.manual_seed(0)
    loss_fn = alip.AlipLoss()
    feats = [torch.nn.functional.normalize(torch.randn(PER_RANK, 8), dim=-1) for _ in range(3)]
    bad = [f.clone() for f in feats]
    if rank == 1:
        bad[0][0, 0] = float("nan")
    outcome = []
    try:
        loss_fn(*bad, 10.0)
        outcome.append("no error")
    except alip.NonFiniteLossInputError:
        outcome.append("skipped")
    except Exception as e:  # e.g. a collective timing out because one rank raised early
        outcome.append(f"{type(e).__name__}: {e}")
    outcome.append(float(loss_fn(*feats, 10.0)["loss"]))  # the next step still lines up
    return outcome


def _worker(rank, port, out_dir):
    join_rank_env(rank, WORLD, port)
    env = alip.init_distributed(timeout_s=60)
    assert env.world_size == WORLD and dist.get_backend() == "gloo"
    results = {case: run_case(*case, rank, WORLD) for case in CASES}
    results["nan"] = nan_on_one_rank(rank, WORLD)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    run_ranks(_worker, (out_dir,), nprocs=WORLD)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_ranks_equal_one_process_on_the_whole_batch(two_rank_results, local_loss):
    torch.set_num_threads(1)
    single = run_case(local_loss, True, rank=0, world_size=1)
    for rank_steps in two_rank_results:
        for got, want in zip(rank_steps[(local_loss, True)], single, strict=True):
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["weights"], want["weights"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["ema"], want["ema"], rtol=1e-6, atol=1e-7)
            assert got["grads"].keys() == want["grads"].keys()
            for name, g in want["grads"].items():
                assert g.abs().sum() > 0, name
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_gate_weights_are_identical_on_every_rank(two_rank_results):
    for case in CASES:
        for a, b in zip(two_rank_results[0][case], two_rank_results[1][case], strict=True):
            assert torch.equal(a["weights"], b["weights"]) and a["ema"] == b["ema"]


def test_gather_without_grad_matches_open_clip_semantics(two_rank_results):
    single = run_case(False, True, rank=0, world_size=1)
    for got, want in zip(two_rank_results[0][(False, False)], single, strict=True):
        # every rank computes the whole N x N loss, so logit_scale's gradient is exact; the towers
        # only get the gradient of their own features, which DDP's averaging divides by the world size
        for name, g in want["grads"].items():
            factor = 1 if name == "logit_scale" else WORLD
            torch.testing.assert_close(got["grads"][name] * factor, g, rtol=1e-4, atol=1e-6, msg=name)
    single_local = run_case(True, True, rank=0, world_size=1)
    for got, want in zip(two_rank_results[0][(True, False)], single_local, strict=True):
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)  # same value, cheaper grad


def test_non_finite_features_on_one_rank_skip_the_step_on_all_ranks(two_rank_results):
    assert [r["nan"][0] for r in two_rank_results] == ["skipped", "skipped"]
    assert all(math.isfinite(r["nan"][1]) for r in two_rank_results)  # and the next step ran everywhere


def test_read_env_torchrun_slurm_and_single():
    env = alip.read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.source) == (3, 1, 8, "torchrun")
    env = alip.read_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"})
    assert (env.rank, env.local_rank, env.world_size, env.source) == (5, 1, 16, "slurm")
    assert alip.read_env({}) == alip.DistEnv(0, 0, 1, "single") and not alip.read_env({}).is_distributed


def test_read_env_rejects_nonsense():
    with pytest.raises(ValueError, match="RANK='x'"):
        alip.read_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="inconsistent torchrun"):
        alip.read_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_init_distributed_names_missing_rendezvous_variables(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        alip.init_distributed(alip.DistEnv(rank=0, local_rank=0, world_size=4, source="slurm"))


def test_single_process_gather_is_identity():
    from alip.distributed import all_gather_cat

    a, b = torch.randn(3, 4), torch.randn(3, 2)
    out = all_gather_cat([a, b], with_grad=True)
    assert out[0] is a and out[1] is b
    with pytest.raises(ValueError, match="equal leading shape"):
        all_gather_cat([a, torch.randn(2, 4)])
