"""ALIP: Adaptive Language-Image Pre-training with synthetic captions (ICCV 2023).

The public API (DESIGN.md section 3); everything else is internal and may move. Names resolve
lazily (PEP 562), so tools that only read or write RecordIO (`alip.data.*`) start without
importing torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "AlipLoss": "alip.loss",
    "NonFiniteLossInputError": "alip.loss",
    "ConsistencyGates": "alip.gates",
    "GateWeights": "alip.gates",
    "gate_weights": "alip.gates",
    "DistEnv": "alip.distributed",
    "init_distributed": "alip.distributed",
    "read_env": "alip.distributed",
    "BiPathCLIP": "alip.model",
    "CheckpointError": "alip.model",
    "create_model": "alip.model",
    "export_model": "alip.model",
    "get_tokenizer": "alip.model",
    "load_checkpoint": "alip.model",
    "unwrap_model": "alip.model",
}
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
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'alip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
