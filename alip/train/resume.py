"""What a resume may change: the checkpoint's config against the config given with `--resume`.

A changed value is either applied, and named in a warning (old -> new), or refused with every such
field named (CheckpointError, before anything is written). It is never silently replaced by the
checkpoint's value, so config.yaml and every later checkpoint record what actually runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from alip.config import Config, to_dict
from alip.distributed import get_rank
from alip.model import CheckpointError

logger = logging.getLogger("alip.train")

# Applied on resume: fields that act from the next step on and leave the checkpoint's weights, gate
# EMAs and data position meaningful. A trailing "." takes a whole section.
APPLIED = (
    "output_dir",  # resuming another folder's checkpoint into a new one forks that run
    # The optimizer's groups take these from the config. Not optim.decay_params: it changes which
    # parameters each group holds, and the checkpoint's Adam moments are stored by position in the groups.
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.grad_clip",
    "schedule.",  # rebuilt from the config and placed at the checkpoint's step (step_on_skip: from then on)
    "train.epochs",  # the run's length: the schedule is rebuilt for the new total
    "train.max_steps",
    "train.accum_steps",  # exact accumulation: the same gradient over other micro-batches
    "train.precision",  # numerics of the coming steps; fp16 gets a fresh loss scaler if it had none
    "train.scaler_growth_interval",  # set on the checkpoint's loss scaler (Trainer.load_state_dict)
    "train.deterministic",
    "train.max_consecutive_skips",
    "model.grad_checkpointing",  # memory and speed only
    "model.compile",
    "model.text_trim",  # exact: the same features, fewer padded tokens computed
    "model.text_buckets",
    "data.num_threads",  # the torch loader seeds augmentation per sample, not per worker
    "data.num_workers",
    "data.full_check",  # what is checked at start, not what is read
    "data.deep_check",
    "checkpoint.",  # cadence and outputs
    "log.",
    "eval.",
)
# Refused, everything else, and an option added later until it is listed here: the model
# (model.pretrained only sets starting weights, which the checkpoint replaces), the optimizer's
# parameter groups (optim.decay_params), the objective (loss.*: its terms, gates and EMA semantics,
# and the gradient scale of local_loss/gather_with_grad), and the data and its order (data.train, loader,
# image size, augmentation, shuffle buffer, train.batch_size, seed): the checkpoint's weights,
# EMAs and loader position only mean something with the values they had.


def applies_on_resume(key: str) -> bool:
    return any(key == field or (field.endswith(".") and key.startswith(field)) for field in APPLIED)


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`section.key` -> value. Only the sections are flattened: a mapping option (loss.caption_weights)
    is one value."""
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            yield from _flat(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


# Options added with a default that differs from what the code did before them: a checkpoint
# written without the option ran with this value (DALI's 10 crop attempts, padded last batches).
# Not loss.captions and loss.caption_weights: a checkpoint from before them trained on one caption,
# which their defaults ("all", uniform) reproduce bitwise. Like all of loss.*, they are refused on resume.
BEFORE_INTRODUCED: dict[str, Any] = {"data.crop_attempts": 10, "data.last_batch": "pad"}


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """`key old -> new` for every option whose value differs from the checkpoint's.

    An option added since the checkpoint was written counts as what the code did before it: its
    default, or its entry in BEFORE_INTRODUCED."""
    old = {**dict(_flat(to_dict(Config()))), **BEFORE_INTRODUCED, **dict(_flat(saved))}
    new = dict(_flat(to_dict(cfg)))
    missing = "(absent)"  # an option the code no longer has
    return [
        f"{key} {json.dumps(old.get(key, missing))} -> {json.dumps(new.get(key, missing))}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


# Applied with --reshard only: the data may change (more shards, another folder); the model and schedule
# continue and the data order restarts (Trainer.load_state_dict).
RESHARD_APPLIED = ("data.train",)
RESHARD_HINT = (
    "--reshard continues it: model, optimizer, schedule, gate EMAs and counters exactly, the data position "
    "as well as it can (README, Resume)"
)


def check_resume(state: dict[str, Any], cfg: Config, world_size: int, reshard: bool = False) -> None:
    """Refuse a checkpoint this run cannot continue; warn about each change it applies.

    With `reshard`, a checkpoint of another world size and a changed data.train are accepted too."""
    old_world = state["world_size"]
    batch_hint = _global_batch_hint(state["config"], cfg, old_world, world_size)
    if old_world != world_size and not reshard:
        raise CheckpointError(
            f"checkpoint was written by {old_world} ranks, this run has {world_size}: exact resume needs the same "
            f"world size (the data order and loader states are per rank); {RESHARD_HINT}"
            + (f". {batch_hint}" if batch_hint else "")
        )
    changes = config_changes(state["config"], cfg)

    def allowed(change: str) -> bool:
        key = change.split(" ")[0]
        return applies_on_resume(key) or (reshard and key in RESHARD_APPLIED)

    refused = [c for c in changes if not allowed(c)]
    if refused and batch_hint and [c.split(" ")[0] for c in refused] == ["train.batch_size"]:
        # Most likely a launcher that derives the global batch from the GPU count: not a reason for a new run.
        raise CheckpointError(f"cannot resume with {refused[0]} on {world_size} ranks (was {old_world}): {batch_hint}")
    if refused:
        data = any(c.split(" ")[0] in RESHARD_APPLIED for c in refused)
        raise CheckpointError(
            f"cannot resume with these changes to the checkpoint's config: {', '.join(refused)}. They would "
            "make the checkpoint's weights, gate state or data position mean something else; start a new "
            "run instead (model.pretrained=CHECKPOINT keeps the weights)"
            + ("; for data.train, " + RESHARD_HINT if data else "")
            + (f"; for train.batch_size, {batch_hint}" if batch_hint else "")
        )
    if get_rank() != 0:
        return
    if changes:
        logger.warning("resuming with a changed config, applied from the next step on: %s", ", ".join(changes))
    if old_world != world_size:
        _warn_batch_split(state["config"], cfg, old_world, world_size)


def _global_batch_hint(saved: dict[str, Any], cfg: Config, old_world: int, world_size: int) -> str | None:
    """Where the world size and train.batch_size both changed: the batch the checkpoint needs. A launcher that
    derives the global batch from the GPU count (scripts/train_yfcc15m_B32_ALIP.sh) passes another one."""
    old_batch = saved.get("train", {}).get("batch_size", Config().train.batch_size)
    if old_world == world_size or old_batch == cfg.train.batch_size:
        return None
    return (
        f"--reshard keeps the checkpoint's global batch: pass train.batch_size={old_batch} "
        f"(launcher: GLOBAL_BATCH={old_batch})"
    )


def _warn_batch_split(saved: dict[str, Any], cfg: Config, old_world: int, world_size: int) -> None:
    """The global batch stays; each rank's share changes. Say so, and how to keep the micro-batch."""
    batch = cfg.train.batch_size
    old_micro = batch // old_world // saved.get("train", {}).get("accum_steps", 1)
    per_rank = batch // world_size
    micro = per_rank // cfg.train.accum_steps
    logger.warning(
        "--reshard: %d ranks -> %d; the global batch stays %d, each rank takes %d per step (micro-batch %d, was %d)",
        old_world,
        world_size,
        batch,
        per_rank,
        micro,
        old_micro,
    )
    if micro > old_micro and per_rank % old_micro == 0:
        logger.warning(
            "each rank's micro-batch grows from %d to %d: if memory runs short, train.accum_steps=%d keeps it at %d "
            "(exact accumulation: the same gradient)",
            old_micro,
            micro,
            per_rank // old_micro,
            old_micro,
        )
