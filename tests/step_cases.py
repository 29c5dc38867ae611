"""Two steps of the trainer's step code (alip.train.step.forward_backward) on one rank's rows of a fixed
global batch, K = 3 caption sources: what the world-size and accumulation tests compare, shared by the
softmax (test_multi_caption_loss.py) and the sigmoid objective (test_loss_sigmoid.py)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import alip
from alip.train.captions import with_drawn_captions
from alip.train.step import forward_backward

SOURCES = ("blip", "llm", "ofa")
WEIGHTS = (1.0, 2.0, 1.0)  # normalised: 0.25, 0.5, 0.25
GLOBAL = 8


def tokens(gen: torch.Generator, *shape: int) -> torch.Tensor:
    toks = torch.randint(1, 49000, (*shape, 77), generator=gen)
    toks[..., 0], toks[..., 9], toks[..., 10:] = 49406, 49407, 0
    return toks


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(GLOBAL, 3, 64, 64, generator=gen), tokens(gen, GLOBAL), tokens(gen, GLOBAL, 3)


def run_steps(mode: str, rank: int, world: int, accum: int, objective: str = "softmax", local_loss: bool = True):
    """Two steps on this rank's rows: rank-mean loss, weights, EMAs, gradients (the sigmoid's bias's too)."""
    torch.manual_seed(0)
    init = {"init_logit_scale": 2.302585, "init_logit_bias": -10.0} if objective == "sigmoid" else {}
    model, _, _ = alip.create_model("ALIP-Tiny", **init)
    net = DDP(alip.BiPathCLIP(model)) if world > 1 else alip.BiPathCLIP(model)
    loss_fn = alip.AlipLoss(
        caption_sources=SOURCES,
        captions=mode,
        caption_weights=WEIGHTS,
        momentum=0.5,
        local_loss=local_loss,
        objective=objective,
    )
    image, text, caption = inputs()
    per = GLOBAL // world
    rows = slice(rank * per, (rank + 1) * per)
    steps = []
    for step in range(2):
        model.zero_grad()
        batch = {"image": image[rows] * (1 + 0.1 * step), "text": text[rows], "caption": caption[rows]}
        if mode == "sample":  # as the trainer: this rank's places of the global batch
            batch = with_drawn_captions(batch, 0, step, rank * per, loss_fn.caption_weights)
        res = forward_backward(net, loss_fn, batch, accum, contextlib.nullcontext, lambda x: x)
        loss = res["loss"].detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        steps.append(
            {
                "loss": loss,
                "weights": torch.stack([res[k] for k in ("weight_sample", "weight_raw", "weight_caption")]),
                "ema": {k: v.clone() for k, v in loss_fn.state_dict().items()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        )
    return steps


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g["loss"], w["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["weights"], w["weights"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["ema"], w["ema"], rtol=1e-6, atol=1e-7)
        for name, grad in w["grads"].items():
            torch.testing.assert_close(g["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
