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
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alip.cli import UserError
from alip.data.loaders.config import LoaderSettings


class ConfigError(UserError, ValueError):
    """A config that cannot run: unknown key, wrong type, value out of range, impossible combination."""


@dataclass
class DataConfig(LoaderSettings):
    """The `data` section: which shards, which loader, and the loader settings (alip.data.loaders.config
    .LoaderSettings says what each of image_size, random_area, ..., last_batch, full_check does)."""

    train: str = ""  # shards: meta JSON, folder, .rec glob or single .rec (see alip.data.format.schema.resolve_shards)
    loader: Literal["dali", "torch"] = "dali"


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"  # any open_clip architecture
    pretrained: str | None = None  # checkpoint file to start from (alip.load_checkpoint formats)
    grad_checkpointing: bool = True  # the released recipe trains with it on
    compile: bool = False  # torch.compile the towers
    # Length-aware text encoding (alip.text_trim): the text tower computes each text only up to its
    # end token. Exact (same features and gradients); "off" computes all 77 positions, as the release.
    text_trim: Literal["off", "batch", "buckets"] = "buckets"
    text_buckets: int = 4  # "buckets": at most this many tower calls per step
    # The learnable logit scale's start, ln t (null: open_clip's ln(1/0.07), CLIP's), and SigLIP's learnable
    # bias (null: none; loss.objective=sigmoid needs one: SigLIP starts at ln 10 and -10, so that the
    # first steps' sigmoids sit near the 1/N prior of a positive pair rather than at 1/2). A model.pretrained
    # checkpoint's values replace both where it has them.
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None


@dataclass
class LossConfig:
    # "softmax": the release's InfoNCE over the global batch; "sigmoid": SigLIP's pairwise loss (no
    # normalisation over the batch; needs model.init_logit_bias). The gates are the same (alip.loss).
    objective: Literal["softmax", "sigmoid"] = "softmax"
    use_caption: bool = True  # False: plain CLIP on the raw text
    use_gates: bool = True  # False: both terms, all weights 1 (the paper's "w/o adaptive weights")
    pair_gate: Literal["official", "paper"] = "official"
    momentum: float = 0.99
    power: float = 2.0
    # The gradient scale (alip.loss). Ours (true, true): every parameter gets the gradient of the loss
    # over the global batch, whatever the world size. The release's flags (false, false): each rank
    # scores the whole N x N batch but only its own features carry gradient, so after DDP's averaging
    # the towers get that gradient / world_size and logit_scale all of it; grad_clip then acts on this.
    local_loss: bool = True
    gather_with_grad: bool = True
    # Records with K > 1 caption slots (the meta JSON's "texts", e.g. raw, blip, llm): how the K captions
    # enter the objective. "all": every caption has its own contrastive term (image-caption_k), the K
    # terms summed with `caption_weights`; costs K caption encodings per sample. "sample": each sample
    # takes ONE caption per step, drawn with `caption_weights` as probabilities (the cost of K = 1); the
    # draw is a function of train.seed, the step and the sample's place in the global batch: a new one
    # every step, the same on resume and for any number of ranks or accumulation steps. Either way each
    # source is gated against its own EMAs (mu_tc, mu_ic) and the raw-text term's LCG weight is the
    # sources' LCG weights averaged with `caption_weights` (alip.gates.source_gate_weights). With K = 1
    # both modes are ALIP, bitwise.
    captions: Literal["all", "sample"] = "all"
    # Relative weight ("all") or draw probability ("sample") of each caption slot, by name, e.g.
    # {blip: 2, llm: 1} (all slots named; 0 leaves a slot out). Normalised to sum 1, so the caption terms
    # together weigh as much as the raw-text term, as ALIP's one caption does. null: uniform.
    caption_weights: dict[str, float] | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2  # applied to the parameters `decay_params` names
    # Which parameters weight decay applies to (alip.train.optim): "no_embeddings" (ours): weight
    # matrices and conv kernels only, no embeddings or logit_scale; "open_clip": open_clip's rule
    # (all but 1-D parameters, norms, biases and logit_scale: token and positional embeddings decayed);
    # "all": every parameter, logit_scale and LayerNorm gains included (the release).
    decay_params: Literal["no_embeddings", "open_clip", "all"] = "no_embeddings"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6  # the release: 1e-8 (AdamW's default)
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
    # Also step the schedule on a skipped step (non-finite loss inputs or gradients, e.g. an fp16
    # overflow the GradScaler skips): the release steps OneCycleLR on every iteration. Ours (false)
    # keeps the lr on the applied steps' schedule.
    step_on_skip: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 512  # global batch: all ranks and accumulation steps together
    accum_steps: int = 1  # micro-batches per optimizer step (features cached: exact for the contrastive loss)
    epochs: float = 32.0
    max_steps: int | None = None  # overrides epochs when set
    precision: Literal["fp32", "bf16", "fp16"] = "fp16"  # autocast dtype; fp16 uses a GradScaler
    # fp16: applied steps in a row after which the GradScaler doubles the loss scale (torch's
    # default 2000; the release: 200).
    scaler_growth_interval: int = 2000
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
        if value is False and "off" in args:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping (name: value), got {value!r}")
        key_hint, value_hint = args
        return {_coerce(k, key_hint, f"{name} key"): _coerce(v, value_hint, f"{name}.{k}") for k, v in value.items()}
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


@dataclass(frozen=True)
class Range:
    """The finite values from `low` to `high` (None: unbounded); `*_open` excludes that end."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = self.low is None or v > self.low or (v == self.low and not self.low_open)
        below = self.high is None or v < self.high or (v == self.high and not self.high_open)
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
BELOW_1 = Range(0, 1, high_open=True)  # betas, EMA momentum, warm-up fraction: 1 would freeze or never end

# The valid values of every numeric option (every element, for pairs). None, where a field allows it,
# means "off" and is not checked. tests/test_adversarial_train.py walks the schema against this table.
RANGES: dict[str, Range] = {
    "data.image_size": AT_LEAST_1,
    "data.random_area": Range(0, 1, low_open=True),  # a fraction of the image area
    "data.random_aspect_ratio": POSITIVE,
    "data.flip_prob": PROBABILITY,
    "data.crop_attempts": AT_LEAST_1,
    "data.shuffle_buffer": AT_LEAST_1,
    "data.num_threads": AT_LEAST_1,
    "data.num_workers": NON_NEGATIVE,  # 0: decode in the training process
    "model.text_buckets": AT_LEAST_1,
    "model.init_logit_scale": Range(0, math.log(100)),  # ln t: the trainer clamps it to [0, ln 100], as open_clip
    "model.init_logit_bias": Range(-math.inf, math.inf),  # any finite value
    "loss.momentum": BELOW_1,
    "loss.power": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": BELOW_1,
    "optim.eps": POSITIVE,
    "optim.grad_clip": POSITIVE,  # a negative norm would flip the gradient: training by ascent
    "schedule.warmup": BELOW_1,
    "schedule.cycle_beta1": BELOW_1,
    "schedule.div_factor": POSITIVE,
    "schedule.final_div_factor": POSITIVE,
    "schedule.final_lr_fraction": PROBABILITY,
    "train.batch_size": AT_LEAST_1,
    "train.accum_steps": AT_LEAST_1,
    "train.epochs": POSITIVE,
    "train.max_steps": AT_LEAST_1,
    "train.scaler_growth_interval": AT_LEAST_1,
    "train.seed": NON_NEGATIVE,  # the loaders derive their generators from it; numpy wants >= 0
    "train.max_consecutive_skips": AT_LEAST_1,
    "checkpoint.every_steps": AT_LEAST_1,
    "checkpoint.every_minutes": POSITIVE,
    "checkpoint.keep_last": AT_LEAST_1,
    "log.every_steps": AT_LEAST_1,
    "log.histogram_every_steps": AT_LEAST_1,
    "eval.every_steps": AT_LEAST_1,
    "eval.max_samples": AT_LEAST_1,
}
# (low, high) pairs: a range the augmentation or the momentum cycle samples within.
ORDERED_PAIRS = ("data.random_area", "data.random_aspect_ratio", "schedule.cycle_beta1")


def leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every option of a config, sections flattened."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _range_problems(cfg: Config) -> list[str]:
    problems = []
    values = dict(leaves(cfg))
    for key, valid in RANGES.items():
        value = values[key]
        if value is not None and not all(v in valid for v in (value if isinstance(value, tuple) else (value,))):
            each = " (each)" if isinstance(value, tuple) else ""
            problems.append(f"{key} must be {valid}{each}, got {list(value) if each else value}")
    for key in ORDERED_PAIRS:
        low, high = values[key]
        if low > high:
            problems.append(f"{key} must be (low, high) with low <= high, got {[low, high]}")
    return problems


def validate(cfg: Config, world_size: int | None = None) -> RunShape | None:
    """Refuse out-of-range values and impossible combinations; with `world_size`, also check the batch
    splits across ranks. All problems are reported at once, on one line."""
    t, loss = cfg.train, cfg.loss
    problems = _range_problems(cfg)
    bias = cfg.model.init_logit_bias
    if loss.objective == "sigmoid" and bias is None:
        problems.append(
            "loss.objective=sigmoid needs model.init_logit_bias (SigLIP: -10, with model.init_logit_scale=2.3026)"
        )
    if loss.objective == "softmax" and bias is not None:
        problems.append("model.init_logit_bias is for loss.objective=sigmoid: a softmax over the batch cancels a bias")
    if loss.use_gates and not loss.use_caption:
        problems.append("loss.use_gates=true needs loss.use_caption=true: the gates compare raw text with the caption")
    weights = loss.caption_weights
    if weights is not None and not (
        all(w >= 0 and math.isfinite(w) for w in weights.values()) and sum(weights.values()) > 0
    ):
        problems.append(f"loss.caption_weights must be non-negative numbers with a positive sum, got {weights}")
    if cfg.eval.every_steps is not None and not (cfg.eval.retrieval or cfg.eval.zeroshot):
        problems.append("eval.every_steps is set but neither eval.retrieval nor eval.zeroshot names a dataset")
    if not cfg.data.train:
        problems.append("data.train must name the training shards (meta JSON, folder, .rec glob or .rec)")
    if not cfg.output_dir:
        problems.append("output_dir must name the run folder")
    shape = None
    if world_size is not None and not problems:  # sizes are >= 1 from here on
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
        raise ConfigError("invalid config: " + "; ".join(problems))
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
