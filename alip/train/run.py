"""Run a training in this process: distributed set-up, run folder and its lock, resume, then `Trainer.fit`.

`train(cfg, resume, reshard)` is what `python -m alip.train` and torchrun workers call; tests call it too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from alip.cli import USER_ERRORS
from alip.config import Config, ConfigError, RunShape, save_config, validate
from alip.data.format import schema
from alip.distributed import DistEnv, get_rank, init_distributed, read_env
from alip.files import FolderLock, refuse_overlap
from alip.model import quiet_random_init
from alip.train.checkpoint import checkpoint_dir, claim_directory, load_training_state, resolve_resume, set_aside
from alip.train.resume import check_resume
from alip.train.trainer import Trainer

T = TypeVar("T")

logger = logging.getLogger("alip.train")


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_after_elastic_restart(env: DistEnv, timeout_s: float = 1800.0) -> None:
    """Process group for a worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0).

    Restarted workers reuse the agent's TCPStore, which still holds the previous round's gloo/NCCL
    addresses under the same keys, so a new rank can read a dead peer's address and fail to connect
    (pytorch/pytorch#167288; seen here with gloo). A key prefix per restart keeps the rounds apart.
    Does nothing on a first start, or where torchrun does not share its store.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restart == 0 or not shared or not env.is_distributed or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore(f"alip/restart_{restart}", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )


def on_rank0(decide: Callable[[], T]) -> T:
    """`decide()` on rank 0; its result, or its user error, on every rank. A refusal raised on rank 0
    alone would leave the other ranks waiting in the next collective."""
    outcome: list[Any] = [None, None]
    if get_rank() == 0:
        try:
            outcome[0] = decide()
        except USER_ERRORS as e:
            outcome[1] = e
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def claim_run_dir(run_dir: Path, lock: FolderLock, cfg: Config) -> None:
    """Rank 0: the run folder is a folder apart from the run's inputs, and this run holds its lock (a
    second trainer is refused)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a folder")
    refuse_overlap(("output_dir", run_dir), run_inputs(cfg))
    lock.acquire()


def run_inputs(cfg: Config) -> list[tuple[str, str]]:
    """What a run reads, by config key: its shards and every file of theirs, the checkpoint it starts
    from, the eval data. (A checkpoint it resumes from is its own, in the run folder.)"""
    paths = [("data.train", f) for f in schema.dataset_files(cfg.data.train)] if cfg.data.train else []
    named = {
        "model.pretrained": cfg.model.pretrained,
        "eval.retrieval": cfg.eval.retrieval,
        "eval.zeroshot": cfg.eval.zeroshot,
    }
    return paths + [(key, value) for key, value in named.items() if value]


def start_checkpoint(resume: str | None, directory: Path) -> tuple[Path | None, list[Path]]:
    """Rank 0: the checkpoint to start from (None: from scratch), once the folder may be written, and
    the unusable newer checkpoints to set aside once the resume is accepted (`claim_directory`).

    A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) continues from the latest."""
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "latest"
    start = resolve_resume(resume, directory)
    if start is None and resume is not None:
        logger.info("--resume %s: no checkpoint yet, starting from scratch", resume)
    return start, claim_directory(directory, start)


def batch_split_hint(cfg: Config, world_size: int) -> str | None:
    """How the global batch could split, where `train.batch_size` does not divide across the ranks and
    `train.accum_steps` (None where it does). A resume keeps the checkpoint's global batch, so after
    a change of allocation the number of ranks or the accumulation has to give."""
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    if batch < 1 or accum < 1 or world_size < 1 or batch % (world_size * accum) == 0:
        return None
    if batch % world_size == 0:
        per_rank = batch // world_size
        fits = [k for k in range(1, per_rank + 1) if per_rank % k == 0]
        return (
            f"On {world_size} ranks each rank takes {per_rank} samples per step: train.accum_steps must divide it "
            f"({', '.join(map(str, fits))})"
        )
    sizes = [w for w in range(1, batch + 1) if batch % w == 0]
    near = [
        max((w for w in sizes if w < world_size), default=None),
        min((w for w in sizes if w > world_size), default=None),
    ]
    options = [f"{w} ranks (train.accum_steps dividing {batch // w})" for w in near if w is not None]
    return (
        f"The global batch {batch} (train.batch_size, which a resume keeps) splits evenly over "
        f"{', '.join(map(str, sizes))} ranks only, and train.accum_steps splits each rank's share further: "
        f"run on {' or '.join(options)}"
    )


def train(cfg: Config, resume: str | None = None, reshard: bool = False) -> Trainer:
    """Run (or continue) the training `cfg` describes in this process; returns the trainer.

    `reshard`: the checkpoint may come from another number of ranks or other shards (README, Resume)."""
    init_after_elastic_restart(read_env())
    env = init_distributed()  # returns the environment if the group already exists
    try:
        shape = validate(cfg, env.world_size)
    except ConfigError as e:
        hint = batch_split_hint(cfg, env.world_size)
        if hint is None:
            raise
        raise ConfigError(f"{e}. {hint}") from None
    run_dir = Path(cfg.output_dir)
    lock = FolderLock(run_dir, "alip.train")
    try:
        on_rank0(lambda: claim_run_dir(run_dir, lock, cfg))
        trainer = prepare(cfg, shape, run_dir, resume, device_for(env.local_rank), reshard)
        trainer.fit()
    finally:
        lock.release()  # held by rank 0 only; the others have nothing to release
    return trainer


def prepare(
    cfg: Config, shape: RunShape, run_dir: Path, resume: str | None, device: torch.device, reshard: bool = False
) -> Trainer:
    """The trainer, at step 0 or at the checkpoint's step. Everything that can refuse (the checkpoint,
    the config's changes) does so before the first write: a refused resume leaves config.yaml as it was."""
    start, unusable = on_rank0(lambda: start_checkpoint(resume, checkpoint_dir(run_dir)))
    state = load_training_state(start) if start is not None else None
    if state is not None:
        check_resume(state, cfg, shape.world_size, reshard)
    if get_rank() == 0:
        set_aside(unusable)  # only now: a refused resume leaves the folder as it was
    # open_clip's "initialized randomly" would mislead where the checkpoint's weights are loaded right after
    with quiet_random_init() if state is not None else contextlib.nullcontext():
        trainer = Trainer(cfg, shape, run_dir, device)
    if state is not None:
        trainer.load_state_dict(state, reshard)
        logger.info("resumed from %s at step %d", start, trainer.state.step)
    if get_rank() == 0:
        save_config(cfg, run_dir / "config.yaml")  # what runs, also where a resume changed it
    # Per-step lines past the checkpoint (a killed run's, or all of a previous run's) would be stale.
    trainer.logger.truncate_after(trainer.state.step)
    logger.info(
        "training %s: %d steps, global batch %d (%d ranks x %d, micro-batch %d)",
        cfg.model.name,
        trainer.total_steps,
        cfg.train.batch_size,
        shape.world_size,
        shape.per_rank_batch,
        shape.micro_batch,
    )
    return trainer
