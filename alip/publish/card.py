"""The model card (README.md) of an exported folder: only what the run folder records.

What goes in, and from where:
- architecture: read off the model (towers, widths, layers, patch, context, parameters);
- objective and gates, and the training config: the checkpoint's own config (a training checkpoint carries
  it), else the run folder's config.yaml; absent both, the card says the training is not recorded;
- data: `data.train`'s meta JSON (record count, caption sources), where it is still found;
- results: every `alip.eval` results JSON under the run folder that was measured on these weights (the same
  checkpoint file by sha256, or a file whose weights are these), each with its protocol; and the in-training
  evaluations (`eval.jsonl`) at the step these weights are from. Results measured on other weights are
  counted, never shown as this model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from alip.files import sha256_file
from alip.model import CheckpointError, extract_state_dict, read_checkpoint

logger = logging.getLogger(__name__)

_RESULT_KEYS = {"task", "model", "settings", "datasets"}  # what alip.eval.results.build_record writes


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the weights themselves (names, dtypes, shapes, bytes), whatever file holds them."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # as bytes: any dtype, bf16 included
    return h.hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        return weights_digest(extract_state_dict(read_checkpoint(path), str(path))[0])
    except (OSError, CheckpointError):
        return None


@dataclass
class RunRecord:
    """What a run folder says of one set of weights."""

    run_dir: Path | None = None
    config: dict[str, Any] | None = None
    step: int | None = None
    data: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    in_training: dict[str, float] = field(default_factory=dict)
    other_weights: int = 0  # results JSONs under the run folder measured on other weights


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to: `final.*` sits in it, `step-*.pt` in its checkpoints/."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file() and (folder / "losses.jsonl").is_file():
            return folder
    return None


def _data_record(train: Any) -> dict[str, Any]:
    from alip.data.format.schema import resolve_dataset

    record: dict[str, Any] = {"path": train}
    try:
        resolved = resolve_dataset(train)
    except (OSError, ValueError) as e:
        record["missing"] = f"not readable at export time ({type(e).__name__})"
        return record
    counts = [info.records for info, _ in resolved]
    record["shards"] = len(resolved)
    record["records"] = sum(counts) if None not in counts else None
    slots = {slots.names for _, slots in resolved if slots is not None}
    record["texts"] = list(slots.pop()) if len(slots) == 1 else None
    return record


def _results_for(run_dir: Path, checkpoint: Path, digest: str) -> tuple[list[dict[str, Any]], int]:
    own_sha = sha256_file(checkpoint)
    digests: dict[str, str | None] = {}
    matched, other = [], 0
    for path in sorted(run_dir.rglob("*.json")):
        if path.parent.name == "checkpoints":  # checkpoint manifests
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict) or not _RESULT_KEYS <= record.keys():
            continue
        model = record.get("model") or {}
        same = model.get("checkpoint_sha256") == own_sha
        source = model.get("checkpoint")
        if not same and source and Path(source).is_file():
            if source not in digests:
                digests[source] = _file_digest(Path(source))
            same = digests[source] == digest
        if same:
            matched.append({"file": str(path.relative_to(run_dir)), **record})
        else:
            other += 1
    return matched, other


def _step_of(run_dir: Path, digest: str) -> int | None:
    """The step of the run's newest checkpoint whose weights are these (a `final.*` export's step)."""
    from alip.train.checkpoint import checkpoint_dir, step_of

    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("step-*.pt"), reverse=True) if folder.is_dir() else []
    for path in candidates:
        if _file_digest(path) == digest:
            return step_of(path)
    return None


def collect_run(checkpoint: Path, model: nn.Module, run_dir: Path | None = None, content: Any = None) -> RunRecord:
    """Everything the card may say of `model`, loaded from `checkpoint` (see the module docstring); `content`:
    the checkpoint as `read_checkpoint` gave it, where the caller has read it already."""
    from alip.model import unwrap_model

    digest = weights_digest(unwrap_model(model).state_dict())
    content = read_checkpoint(checkpoint) if content is None else content
    record = RunRecord(run_dir=run_dir or find_run_dir(checkpoint))
    if isinstance(content, Mapping) and isinstance(content.get("config"), Mapping):
        record.config = dict(content["config"])
        record.step = (content.get("train_state") or {}).get("step")
    if record.run_dir is not None:
        if record.config is None:
            record.config = yaml.safe_load((record.run_dir / "config.yaml").read_text(encoding="utf-8"))
        record.results, record.other_weights = _results_for(record.run_dir, checkpoint, digest)
        if record.step is None:
            record.step = _step_of(record.run_dir, digest)
        evals = record.run_dir / "eval.jsonl"
        if record.step is not None and evals.is_file():
            for line in evals.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                if row.get("step") == record.step:
                    record.in_training = {k: v for k, v in row.items() if k != "step"}
    if record.config is not None and (record.config.get("data") or {}).get("train"):
        record.data = _data_record(record.config["data"]["train"])
    return record


def _architecture(model: nn.Module, model_name: str) -> list[str]:
    params = sum(p.numel() for p in model.parameters())
    lines = [f"- open_clip architecture `{model_name}`, {params / 1e6:.1f}M parameters"]
    visual = model.visual
    if hasattr(visual, "conv1") and hasattr(visual, "transformer"):
        lines.append(
            f"- image tower: ViT, width {visual.conv1.out_channels}, {len(visual.transformer.resblocks)} layers, "
            f"patch {visual.patch_size[0]}, image size {visual.image_size[0]}"
        )
    else:
        lines.append(f"- image tower: {type(visual).__name__}, image size {getattr(visual, 'image_size', '?')}")
    if hasattr(model, "transformer") and hasattr(model, "positional_embedding"):
        lines.append(
            f"- text tower: transformer, width {model.token_embedding.embedding_dim}, "
            f"{len(model.transformer.resblocks)} layers, context {model.positional_embedding.shape[0]} tokens"
        )
    width = model.text_projection.shape[-1] if hasattr(model, "text_projection") else "?"
    lines.append(f"- embedding width {width}; logit scale {float(model.logit_scale.detach().exp()):.4g}")
    if getattr(model, "logit_bias", None) is not None:
        lines.append(f"- logit bias {float(model.logit_bias.detach()):.4g} (sigmoid objective)")
    return lines


def _objective(config: Mapping[str, Any]) -> list[str]:
    loss = config.get("loss") or {}
    if not loss.get("use_caption", True):
        return ["- CLIP's contrastive loss on the raw text only (`loss.use_caption: false`)"]
    lines = ["- ALIP's bi-path contrastive loss: image-raw text and image-synthetic caption, one shared text tower"]
    if loss.get("use_gates", True):
        lines.append(
            f"- gates on (pair gate `{loss.get('pair_gate', 'official')}`, EMA momentum {loss.get('momentum')}, "
            f"power {loss.get('power')}): each sample and pair weighted by the consistency of its texts and image"
        )
    else:
        lines.append("- gates off: both terms with all weights 1 (`loss.use_gates: false`)")
    if loss.get("captions"):
        lines.append(f"- caption sources used as `loss.captions: {loss['captions']}`")
    return lines


def _data(data: Mapping[str, Any]) -> list[str]:
    lines = [f"- `data.train`: `{data['path']}`"]
    if "missing" in data:
        return [*lines, f"- its shards were {data['missing']}: no count is given"]
    if data.get("records") is not None:
        lines.append(f"- {data['records']:,} records in {data['shards']} shard(s) (the meta JSON's counts)")
    if data.get("texts"):
        lines.append(f"- texts per record: {', '.join(data['texts'])} (raw text, then the caption sources)")
    return lines


def _number(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _results(record: RunRecord) -> list[str]:
    lines: list[str] = []
    for result in record.results:
        settings = result.get("settings") or {}
        protocol = settings.get("protocol", "linear probe" if result["task"] == "linear-probe" else "?")
        lines.append(f"**{result['task']}**, protocol `{protocol}` (`{result['file']}`, {result.get('created', '')}):")
        lines.append("")
        metrics = sorted({k for d in result["datasets"] for k in (d.get("metrics") or {})})
        lines.append("| dataset | " + " | ".join(metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        for d in result["datasets"]:
            cells = [_number((d.get("metrics") or {}).get(m, "")) for m in metrics]
            lines.append(f"| {d.get('name', '?')} | " + " | ".join(cells) + " |")
        lines.append("")
    if record.in_training:
        subset = ((record.config or {}).get("eval") or {}).get("max_samples")
        lines.append(
            f"**In-training evaluation** at step {record.step} (`eval.jsonl`, the first {subset} samples of each "
            "set, default protocol):"
        )
        lines.append("")
        lines += [f"- `{k}`: {_number(v)}" for k, v in sorted(record.in_training.items())]
        lines.append("")
    if not lines:
        where = "in the run folder" if record.run_dir is not None else "(no run folder was found beside the checkpoint)"
        lines = [f"No evaluation of these weights was found {where}.", ""]
    if record.other_weights:
        lines.append(f"({record.other_weights} results file(s) in the run folder were measured on other weights.)")
    return lines


def model_card(model: nn.Module, model_name: str, record: RunRecord, library: str) -> str:
    """README.md for a folder of `library` ("transformers" or "open_clip")."""
    from alip.model import unwrap_model

    model = unwrap_model(model)
    front = ["---", f"library_name: {library}", "pipeline_tag: zero-shot-image-classification"]
    front += ["tags:", "- clip", "- alip", "- vision-language", "---", ""]
    lines = [*front, f"# {model_name}, exported by the ALIP framework", ""]
    if library == "transformers":
        lines += ["```python", "from transformers import CLIPModel, CLIPProcessor"]
        lines += [
            'model = CLIPModel.from_pretrained("THIS_FOLDER")',
            'processor = CLIPProcessor.from_pretrained("THIS_FOLDER")',
        ]
    else:
        lines += ["```python", "import open_clip"]
        lines += ['model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_FOLDER")']
        lines += ['tokenizer = open_clip.get_tokenizer("local-dir:THIS_FOLDER")']
    lines += ["```", "", "## Architecture", "", *_architecture(model, model_name), ""]
    lines += ["## Objective", ""]
    lines += _objective(record.config) if record.config else ["The checkpoint records no training config.", ""]
    if record.config:
        lines.append("")
    lines += ["## Data", ""]
    lines += _data(record.data) if record.data else ["Not recorded with this checkpoint."]
    lines += ["", "## Results", "", *_results(record), ""]
    if record.config:
        step = f" (these weights: step {record.step})" if record.step is not None else ""
        lines += [f"## Training config{step}", "", "```yaml", yaml.safe_dump(record.config, sort_keys=False).rstrip()]
        lines += ["```", ""]
    return "\n".join(lines)
