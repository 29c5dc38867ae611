"""Run a training in this process: distributed set-up, run folder, resume, then `Trainer.fit`.

`train(cfg, resume)` is what `python -m alip.train` and torchrun workers call; tests call it too.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from alip.config import Config, save_config, validate
from alip.distributed import DistEnv, get_rank, init_distributed, read_env
from alip.train.checkpoint import load_state, resolve_resume
from alip.train.trainer import Trainer

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


def resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint and broadcasts it, so every rank loads the same file."""
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "latest"  # a torchrun restart after a crash continues where the run stopped
    choice = [resolve_resume(resume, checkpoint_dir) if get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def train(cfg: Config, resume: str | None = None) -> Trainer:
    """Run (or continue) the training `cfg` describes in this process; returns the trainer."""
    init_after_elastic_restart(read_env())
    env = init_distributed()  # returns the environment if the group already exists
    shape = validate(cfg, env.world_size)
    run_dir = Path(cfg.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, shape, run_dir, device_for(env.local_rank))
    path = resume_path(resume, trainer.checkpointer.directory)
    if path is not None:
        trainer.load_state_dict(load_state(path))
        logger.info("resumed from %s at step %d", path, trainer.state.step)
    elif resume is not None:
        logger.info("--resume %s: no checkpoint yet, starting from scratch", resume)
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
    trainer.fit()
    return trainer
