"""Run a test function on several gloo ranks in spawned processes (CPU)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_rank_env(rank: int, world_size: int, port: int) -> None:
    """Inside a worker: the environment torchrun would set, and one intra-op thread per rank."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two ranks on two cores: more threads only contend


def run_ranks(worker: Callable, args: tuple, nprocs: int = 2, timeout: float = 240) -> None:
    """Start `worker(rank, port, *args)` on `nprocs` spawned processes and wait; fail the test on a hang.

    A worker's exception is re-raised here. A rank stuck in a collective (the usual distributed
    bug) is killed after `timeout` seconds instead of hanging the suite.
    """
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs}-rank run did not finish in {timeout:.0f} s (a rank waiting in a collective?)")
