"""ALIP: Adaptive Language-Image Pre-training with synthetic captions (ICCV 2023).

The public API (DESIGN.md section 3); everything else is internal and may move.
"""

from alip.distributed import DistEnv, init_distributed, read_env
from alip.gates import ConsistencyGates, GateWeights, gate_weights
from alip.loss import AlipLoss, NonFiniteLossInputError
from alip.model import (
    BiPathCLIP,
    CheckpointError,
    create_model,
    export_model,
    get_tokenizer,
    load_checkpoint,
    unwrap_model,
)

__version__ = "0.1.0"

__all__ = [
    "AlipLoss",
    "BiPathCLIP",
    "CheckpointError",
    "ConsistencyGates",
    "DistEnv",
    "GateWeights",
    "NonFiniteLossInputError",
    "create_model",
    "export_model",
    "gate_weights",
    "get_tokenizer",
    "init_distributed",
    "load_checkpoint",
    "read_env",
    "unwrap_model",
]
