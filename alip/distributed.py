"""Distributed environment: torchrun / SLURM detection, process-group init, feature gathering.

Kept free of training logic so the loss, the trainer and the evaluators share one notion of
"rank" and "world size".
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `source` says which launcher described it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment: torchrun's RANK/LOCAL_RANK/WORLD_SIZE first, then SLURM's.

    torchrun wins when both are present, because `srun torchrun ...` sets both and the
    torchrun values describe the actual worker processes.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        source = "torchrun"
        rank = _int_var(environ, "RANK")
        world_size = _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        source = "slurm"
        rank = _int_var(environ, "SLURM_PROCID")
        world_size = _int_var(environ, "SLURM_NTASKS")
        local_rank = _int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    else:
        return DistEnv()
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent {source} environment: rank={rank}, local_rank={local_rank}, world_size={world_size}"
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, source=source)


def init_distributed(env: DistEnv | None = None, backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed for `env` (default: read from the environment).

    NCCL when CUDA is present, gloo on CPU. A single process does not create a process group:
    everything downstream treats "not initialised" as world size 1.
    """
    env = read_env() if env is None else env
    if torch.cuda.is_available():
        # Bind before any CUDA allocation so every rank owns its own GPU.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not env.is_distributed or dist.is_initialized():
        return env
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"{env.source} launch with world size {env.world_size} needs {' and '.join(missing)} in the "
            "environment (torchrun sets them; under SLURM export them in the job script, see "
            "scripts/ for an example)"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    # Telling NCCL its device up front avoids guessing it at the first barrier (and the warning).
    device_id = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device_id,
    )
    logger.info("initialised %s process group: rank %d / %d (%s)", backend, env.rank, env.world_size, env.source)
    return env


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_cat(tensors: Sequence[torch.Tensor], with_grad: bool = False) -> list[torch.Tensor]:
    """Gather several [B, D_k] tensors from every rank in ONE collective; returns [W*B, D_k] each.

    The tensors are packed side by side into one [B, sum D_k] buffer, so the cost is one all_gather
    regardless of how many feature sets are gathered. Row order is rank-major (global index =
    rank * B + i). `with_grad=True` uses the autograd-aware all_gather, whose backward sums the
    gradients of every rank into the local slice: that is what makes local-loss training match a
    single process on the whole batch.
    """
    if not tensors:
        raise ValueError("all_gather_cat needs at least one tensor")
    lead, dtype = tensors[0].shape[:-1], tensors[0].dtype
    for t in tensors:
        if t.shape[:-1] != lead or t.dtype != dtype:
            raise ValueError(
                "all_gather_cat needs tensors with equal leading shape and dtype, got "
                + ", ".join(f"{tuple(t.shape)}/{t.dtype}" for t in tensors)
            )
    world_size = get_world_size()
    if world_size == 1:
        return list(tensors)
    widths = [t.shape[-1] for t in tensors]
    packed = torch.cat(list(tensors), dim=-1).contiguous()  # [B, sum D]
    if with_grad:
        parts = dist_fn.all_gather(packed)
    else:
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed)
    gathered = torch.cat(parts, dim=0)  # [W*B, sum D]
    return list(gathered.split(widths, dim=-1))
