"""AdamW with the weight-decay rule of the config, and the learning-rate schedules of the config.

`optim.decay_params` names which parameters weight decay applies to:
- "no_embeddings" (our default): weight matrices and conv kernels only. Not biases, norm gains,
  logit_scale, nor the embeddings (token table, positional embeddings, class token), as timm's ViT
  (`no_weight_decay`: pos_embed, cls_token) and minGPT do. Decaying a temperature or a LayerNorm gain
  towards zero has no regularising meaning, and a decoupled decay shrinks every row of the token table
  at every step while only the rows of the tokens in the batch get gradient: rare tokens fade.
- "open_clip": open_clip's training rule (open_clip_train/main.py: no decay where `p.ndim < 2` or the
  name holds "bn", "ln", "bias" or "logit_scale"). The token table and the positional embeddings
  (2-D) ARE decayed there; the class token (1-D) is not.
- "all": every parameter, logit_scale and LayerNorm gains included: the release (deepglint/ALIP
  train.py gives AdamW all of the model's parameters in one group).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from alip.config import OptimConfig, ScheduleConfig

_EMBEDDING_NAMES = ("embedding", "logit_scale", "logit_bias")
_OPEN_CLIP_NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")


def decays(name: str, param: torch.Tensor, rule: str = "no_embeddings") -> bool:
    """Whether weight decay applies to parameter `name` under `rule` (see the module docstring)."""
    if rule == "all":
        return True
    if rule == "open_clip":
        return param.ndim >= 2 and not any(key in name for key in _OPEN_CLIP_NO_DECAY_NAMES)
    if rule == "no_embeddings":
        return param.ndim >= 2 and not any(key in name for key in _EMBEDDING_NAMES)
    raise ValueError(f"unknown decay rule {rule!r}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param, cfg.decay_params) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # "all": one group, as the release
    fused = all(p.is_cuda for p in decay + no_decay)  # the fused kernel is CUDA-only
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LRScheduler:
    """Stepped once per optimizer step (not per micro-batch)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(cfg.warmup * total_steps)
    if cfg.name == "onecycle":
        # As released: torch's OneCycleLR, which also cycles beta1 between cycle_beta1
        # (high while the lr is low, and back). Its warm-up ends at step pct_start * total - 1; where
        # that is exactly step 0 (e.g. 10% of 10 steps) torch divides by zero: a hair more makes it
        # the one-step warm-up that was meant (step 0 at lr / div_factor, the peak at step 1).
        pct_start = cfg.warmup
        if pct_start * total_steps == 1:
            pct_start = (1 + 1e-6) / total_steps
        return OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy="cos",
            cycle_momentum=True,
            base_momentum=cfg.cycle_beta1[0],
            max_momentum=cfg.cycle_beta1[1],
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
        )
    if cfg.name == "cosine":
        floor = cfg.final_lr_fraction

        def cosine(step: int) -> float:  # linear warm-up from 0, then cosine down to `floor`
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return LambdaLR(optimizer, cosine)
    if cfg.name == "constant":
        return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def resume_optimizer(
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
) -> None:
    """Continue from a checkpoint: its Adam moments and step count, but this config's hyperparameters.

    torch's `load_state_dict` would also bring back the checkpoint's param-group values (lr, betas,
    eps, weight decay, OneCycleLR's initial/max/min lr) and silently undo a changed lr. So the groups
    keep the values the optimizer and scheduler were just built with, and the schedule, a closed-form
    function of the step for every schedule here, is placed at the checkpoint's step: the same lr as an
    uninterrupted run of this config (bitwise, when nothing changed).
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    scheduler.last_epoch = scheduler_state["last_epoch"] - 1
    with warnings.catch_warnings():
        # torch's "step() before optimizer.step()" warning: this places the schedule, it skips no value
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
