"""Train ALIP: `python -m alip.train CONFIG [--resume latest|PATH [--reshard]] [section.key=value ...]`.

One process on a CPU or GPU, or under torchrun (N processes per node, several nodes):

    torchrun --nproc-per-node 8 -m alip.train configs/yfcc15m_vitb32_alip.yaml data.train=/data/yfcc15m_rec
    python -m alip.train configs/tiny_cpu.yaml data.train=shards/ --resume latest

Under torchrun with --max-restarts, a restarted worker group resumes from the last complete
checkpoint by itself (TORCHELASTIC_RESTART_COUNT > 0 implies `--resume latest`).

--reshard continues a checkpoint written by another number of ranks, or for other shards: the
model, optimizer, schedule, gate EMAs and counters exactly; the data position as the README's
"Resume" says.

A mistake of the user's (config, data, checkpoint, run folder) prints one `error: ...` line and
exits with status 2; --debug or ALIP_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist

from alip.cli import add_debug_flag, guarded
from alip.config import ConfigError, load_config
from alip.train.run import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m alip.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 train.precision=bf16")
    p.add_argument("--resume", help="'latest' (newest complete checkpoint of the run, if any) or a checkpoint path")
    p.add_argument(
        "--reshard",
        action="store_true",
        help="continue a checkpoint of another number of ranks or of other shards (model and schedule exactly, "
        "the data order as well as it can)",
    )
    add_debug_flag(p)
    return p.parse_intermixed_args(argv)  # overrides and --resume in any order


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reshard and not args.resume:
        raise ConfigError("--reshard changes how a checkpoint is continued: use it with --resume latest|PATH")
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        train(load_config(args.config, args.overrides), args.resume, reshard=args.reshard)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
