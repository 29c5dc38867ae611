"""Rank-0 training logs: console lines, a per-step losses JSONL, TensorBoard and optional wandb.

The loop asks `logger.should_log(step)`; the per-step JSONL (`losses.jsonl` in the run folder) is
written every step because it is cheap and is what resume checks and golden files compare.
In-training evaluations also go to `eval.jsonl` (one line per evaluation), so curves of the eval
metrics can be plotted without TensorBoard.
TensorBoard and wandb are imported where used: a run without them installed still trains.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from alip.config import LogConfig

logger = logging.getLogger("alip.train")


class TrainLogger:
    """Writes only on the main rank; every rank may call it (the others do nothing)."""

    def __init__(self, cfg: LogConfig, run_dir: Path, is_main: bool, run_config: dict[str, Any]) -> None:
        self.cfg = cfg
        self.is_main = is_main
        objective = run_config.get("loss", {})
        self._caption = bool(objective.get("use_caption", True))  # False: plain CLIP, one term
        self._gated = self._caption and bool(objective.get("use_gates", True))
        self.losses_path = run_dir / "losses.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                logger.warning("log.tensorboard is on but tensorboard is not installed; skipping it")
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            # The run id is the run folder's name, so a resumed run continues the same wandb run.
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                id=run_dir.resolve().name,
                resume="allow",
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                config=run_config,
            )

    def should_log(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def truncate_after(self, step: int) -> None:
        """On resume: drop per-step lines a killed run wrote after its last checkpoint."""
        if not self.is_main:
            return
        for path in (self.losses_path, self.eval_path):
            if path.exists():
                lines = path.read_text(encoding="utf-8").splitlines()
                kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def record_step(self, step: int, losses: dict[str, float], applied: bool) -> None:
        if not self.is_main:
            return
        # repr-exact floats: the resume test compares these bitwise.
        line = json.dumps({"step": step, "applied": applied, **losses})
        with open(self.losses_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Console line + TensorBoard + wandb. Keys are namespaced (`train/loss_raw`)."""
        if not self.is_main:
            return
        m = metrics
        # Only what the objective computes: a CLIP run has no caption term and no gates (its weights
        # are all 1), ALIP without gates has both terms and no gates.
        losses, loss_args = "loss %.4f", [m.get("train/loss", math.nan)]
        if self._caption:
            losses += " (raw %.4f, caption %.4f)"
            loss_args += [m.get("train/loss_raw", math.nan), m.get("train/loss_caption", math.nan)]
        gates, gate_args = "", []
        if self._gated:
            gates = " | gates s %.3f t %.3f c %.3f%s"
            gate_args = [m.get(f"train/gate/weight_{w}_mean", math.nan) for w in ("sample", "raw", "caption")]
            gate_args.append(_source_gates(m))
        logger.info(
            "step %d/%d | %.1f samples/s/rank, %.1f total | data %.3fs | eta %s | "
            + losses
            + gates
            + " | scale %.2f"
            + (" bias %.2f" if "train/logit_bias" in m else "%s")
            + " | grad %.3f | loss scale %.0f | skipped %d",
            m["train/step"],
            m["train/total_steps"],
            m["train/samples_per_s_per_rank"],
            m["train/samples_per_s"],
            m["train/data_wait_s"],
            _eta(m["train/eta_s"]),
            *loss_args,
            *gate_args,
            m["train/logit_scale"],
            m.get("train/logit_bias", ""),  # sigmoid objective only
            m["train/grad_norm"],
            m["train/loss_scale"],
            m["train/skipped_steps"],
        )
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation results (already namespaced `eval/<dataset>/<metric>`)."""
        if not self.is_main:
            return
        logger.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        with open(self.eval_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def histograms(self, step: int, gates: dict[str, torch.Tensor]) -> None:
        """Gate weight histograms (TensorBoard and wandb)."""
        if not self.is_main or step % self.cfg.histogram_every_steps or not gates:
            return
        for name, values in gates.items():
            if not values.numel():  # loss.captions=sample: a source no sample drew this step
                continue
            if self._tb is not None:
                self._tb.add_histogram(f"train/gate/{name}", values.float().cpu(), step)
            if self._wandb is not None:
                import wandb

                self._wandb.log({f"train/gate/{name}": wandb.Histogram(values.float().cpu().numpy())}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _source_gates(m: dict[str, float]) -> str:
    """Each caption source's gate means, K > 1: " (blip s 0.912 c 0.850, llm s ...)"; "" for one caption."""
    prefix, suffix = "train/gate/", "/weight_caption_mean"
    ends = len(prefix) + len(suffix)  # "train/gate/weight_caption_mean" (all sources) ends the same way
    names = [k[len(prefix) : -len(suffix)] for k in m if k.startswith(prefix) and k.endswith(suffix) and len(k) > ends]
    if not names:
        return ""
    parts = [f"{n} s {m[f'{prefix}{n}/weight_sample_mean']:.3f} c {m[f'{prefix}{n}{suffix}']:.3f}" for n in names]
    return f" ({', '.join(parts)})"
