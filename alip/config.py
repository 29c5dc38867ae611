"""Typed run configuration: dataclasses, loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/yfcc15m_vitb32_alip.yaml", ["optim.lr=5e-4", "train.precision=bf16"])

Why dataclasses + PyYAML rather than a config framework: the schema is the code (typed fields
with defaults and docstrings), errors name the offending key, and the resolved config is a plain
dict that goes into every checkpoint and loads back without code execution.

Every value is checked against its field's type. An unknown key gets a "did you mean" hint, and
impossible combinations are refused with the reason (`validate`). A config is never mutated at
run time; values derived from the world size live in `RunShape`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, impossible combination."""


@dataclass
class DataConfig:
    train: str = ""  # shards: meta JSON, folder, .rec glob or single .rec (see alip.data.schema.resolve_shards)
    loader: Literal["dali", "torch"] = "dali"
    image_size: int = 224
    random_area: tuple[float, float] = (0.7, 1.0)  # the released recipe's random crop
    random_aspect_ratio: tuple[float, float] = (0.8, 1.25)
    flip_prob: float = 0.5
    shuffle_buffer: int = 4096
    num_threads: int = 4  # DALI threads per rank
    num_workers: int = 4  # torch loader worker processes per rank


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"  # any open_clip architecture
    pretrained: str | None = None  # checkpoint file to start from (alip.load_checkpoint formats)
    grad_checkpointing: bool = True  # the released recipe trains with it on
    compile: bool = False  # torch.compile the towers


@dataclass
class LossConfig:
    use_caption: bool = True  # False: plain CLIP on the raw text
    use_gates: bool = True  # False: both terms, all weights 1 (the paper's "w/o adaptive weights")
    pair_gate: Literal["official", "paper"] = "official"
    momentum: float = 0.99
    power: float = 2.0
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2  # not applied to biases, norms, embeddings and logit_scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping


@dataclass
class ScheduleConfig:
    name: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: float = 0.1  # fraction of the total steps
    # OneCycleLR also cycles AdamW's beta1 between these (inversely to the lr), as the release does.
    cycle_beta1: tuple[float, float] = (0.85, 0.95)
    # The release uses OneCycleLR's defaults: start at lr / 25, end at lr / 25 / 1e4.
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    final_lr_fraction: float = 0.0  # cosine: lr at the end, as a fraction of the peak


@dataclass
class TrainConfig:
    batch_size: int = 512  # global batch: all ranks and accumulation steps together
    accum_steps: int = 1  # micro-batches per optimizer step (features cached: exact for the contrastive loss)
    epochs: float = 32.0
    max_steps: int | None = None  # overrides epochs when set
    precision: Literal["fp32", "bf16", "fp16"] = "fp16"  # autocast dtype; fp16 uses a GradScaler
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (bitwise resume tests on CPU)
    max_consecutive_skips: int = 20  # abort after this many non-finite steps in a row


@dataclass
class CheckpointConfig:
    every_steps: int | None = 1000
    every_minutes: float | None = 30.0
    keep_last: int = 3
    export: bool = True  # also export the final weights as open_clip .pt and .safetensors


@dataclass
class LogConfig:
    every_steps: int = 50
    tensorboard: bool = True
    wandb: bool = False
    wandb_mode: Literal["online", "offline"] = "offline"
    wandb_project: str = "alip"
    histogram_every_steps: int = 1000  # gate weight histograms


@dataclass
class EvalConfig:
    every_steps: int | None = None  # None: no evaluation during training
    retrieval: str | None = None  # a retrieval annotation file (see alip.eval)
    zeroshot: str | None = None  # a classification dataset folder (see alip.eval)
    max_samples: int | None = 1000  # the in-training subset


@dataclass
class Config:
    output_dir: str = "runs/alip"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class RunShape:
    """Values derived from the config and the world size; the config itself stays as written."""

    world_size: int
    per_rank_batch: int  # samples per rank per optimizer step
    micro_batch: int  # samples per rank per forward pass


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides (`section.key=value`, values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), _parse_value(value))
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict, cls: type = Config, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {name}{hint} (known: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, name)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4 as a string: the classic lr trap
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported config type {hint}")  # a schema bug, not a user error


def validate(cfg: Config, world_size: int | None = None) -> RunShape | None:
    """Refuse impossible combinations; with `world_size`, also check the batch splits across ranks."""
    problems = []
    t, o, s, loss = cfg.train, cfg.optim, cfg.schedule, cfg.loss
    positive = {
        "train.batch_size": t.batch_size,
        "train.accum_steps": t.accum_steps,
        "data.image_size": cfg.data.image_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "log.every_steps": cfg.log.every_steps,
    }
    problems += [f"{k} must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    if t.max_steps is None and t.epochs <= 0:
        problems.append(f"train.epochs must be > 0 (or set train.max_steps), got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps must be >= 1, got {t.max_steps}")
    if o.lr <= 0 or o.weight_decay < 0:
        problems.append(f"optim.lr must be > 0 and optim.weight_decay >= 0, got {o.lr} and {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        problems.append(f"optim.betas must be in [0, 1), got {o.betas}")
    if not 0 <= s.warmup < 1:
        problems.append(f"schedule.warmup is a fraction of the run and must be in [0, 1), got {s.warmup}")
    if loss.use_gates and not loss.use_caption:
        problems.append("loss.use_gates=true needs loss.use_caption=true: the gates compare raw text with the caption")
    if not 0 <= loss.momentum < 1:
        problems.append(f"loss.momentum must be in [0, 1), got {loss.momentum}")
    if cfg.eval.every_steps is not None and not (cfg.eval.retrieval or cfg.eval.zeroshot):
        problems.append("eval.every_steps is set but neither eval.retrieval nor eval.zeroshot names a dataset")
    if not cfg.data.train:
        problems.append("data.train must name the training shards (meta JSON, folder, .rec glob or .rec)")
    shape = None
    if world_size is not None:
        per_step = world_size * t.accum_steps
        if t.batch_size % per_step:
            problems.append(
                f"train.batch_size={t.batch_size} does not divide across {world_size} ranks x "
                f"{t.accum_steps} accumulation steps"
            )
        else:
            per_rank = t.batch_size // world_size
            shape = RunShape(world_size, per_rank, per_rank // t.accum_steps)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return shape


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists for tuples): what goes into the run folder and every checkpoint."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
