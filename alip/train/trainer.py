"""The ALIP trainer: a step-based loop over DDP, whose components decide when to act.

    trainer = Trainer(cfg, shape, run_dir, device)
    trainer.fit()

Each step: next batch -> `train_step` (exact accumulation, see alip.train.step; skip on non-finite
on every rank) -> `logger.should_log(step)` -> `evaluator.should_run(step)` ->
`checkpointer.should_save(step)` (rank 0's time verdict, broadcast) -> SIGTERM check. Everything a
resume needs is in `state_dict()`: model, optimizer, scaler, scheduler, gate EMAs, counters, and
the RNG and loader state of every rank. `load_state_dict(state, reshard=True)` also continues a
checkpoint of another world size or of other shards: everything but the data position exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import alip
from alip.config import Config, ConfigError, RunShape, to_dict
from alip.data.format.schema import TextSlots
from alip.data.loaders.base import RecordLoader
from alip.data.loaders.config import LoaderConfig
from alip.distributed import get_rank, get_world_size
from alip.flops import device_peak_tflops, step_flops, supports_count
from alip.model import CheckpointError
from alip.train.captions import slot_weights, with_drawn_captions
from alip.train.checkpoint import Checkpointer, checkpoint_dir, rng_state, set_rng_state
from alip.train.logger import TrainLogger
from alip.train.optim import build_optimizer, build_scheduler, resume_optimizer
from alip.train.step import StepOutcome, all_ranks_finite, forward_backward, gate_stats, rank_mean

logger = logging.getLogger("alip.train")

LOGIT_SCALE_MAX = math.log(100)  # clamp to ln(100) = 4.6052, as in CLIP


class TooManySkippedStepsError(RuntimeError):
    """Training diverged: `train.max_consecutive_skips` non-finite steps in a row."""


@dataclass
class TrainState:
    """Counters of the loop (all in the checkpoint)."""

    step: int = 0  # batches consumed (optimizer steps applied or skipped)
    samples_seen: int = 0  # over all ranks
    skipped_steps: int = 0
    consecutive_skips: int = 0


def build_loader(cfg: Config, shape: RunShape, device: torch.device) -> RecordLoader:
    """This rank's training loader (DALI or the torch fallback), batches of `shape.per_rank_batch`."""
    config = LoaderConfig.from_settings(cfg.data, batch_size=shape.per_rank_batch, seed=cfg.train.seed)
    if cfg.data.loader == "dali":
        from alip.data.loaders.dali import DaliLoader  # DALI only where it is asked for

        return DaliLoader(cfg.data.train, config, train=True, device=device)
    from alip.data.loaders.torch_loader import TorchLoader

    return TorchLoader(cfg.data.train, config, train=True, device=device)


def build_loss(cfg: Config, slots: TextSlots) -> alip.AlipLoss:
    """The objective over the data's caption slots (K sources: loss.captions, loss.caption_weights)."""
    lc = cfg.loss
    return alip.AlipLoss(
        use_caption=lc.use_caption,
        use_gates=lc.use_gates,
        pair_gate=lc.pair_gate,
        momentum=lc.momentum,
        power=lc.power,
        local_loss=lc.local_loss,
        gather_with_grad=lc.gather_with_grad,
        caption_sources=slots.captions,
        captions=lc.captions,
        caption_weights=slot_weights(lc, slots, cfg.data.train),
        objective=lc.objective,
    )


def scaler_state(saved: dict[str, Any], growth_interval: int) -> dict[str, Any]:
    """A checkpoint's GradScaler state under this config's growth interval: its load_state_dict would
    bring back the checkpoint's. torch grows the scale when the count of good steps reaches the
    interval exactly, so a count at or past a shortened interval is capped to grow at the next one."""
    tracker = min(saved["_growth_tracker"], growth_interval - 1)
    return {**saved, "growth_interval": growth_interval, "_growth_tracker": tracker}


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


class Trainer:
    """Owns the model, loss, optimizer, loader and the components that decide when to act."""

    def __init__(self, cfg: Config, shape: RunShape, run_dir: str | Path, device: torch.device) -> None:
        self.cfg, self.shape, self.device = cfg, shape, device
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = get_rank(), get_world_size()
        self._configure_determinism()
        self.clip, self.net = self._build_model()
        self._count_flops = supports_count(self.clip)  # MFU in the log (train/tflops_per_s_per_rank, train/mfu)
        self._peak_tflops = device_peak_tflops(device)
        self.loader = build_loader(cfg, shape, device)
        try:
            self.loss_fn = build_loss(cfg, self.loader.slots).to(device)
        except ConfigError:
            self.loader.close()
            raise
        self.total_steps = total_steps(cfg, len(self.loader))
        self.optimizer = build_optimizer(self.clip, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=cfg.train.precision == "fp16", growth_interval=cfg.train.scaler_growth_interval
        )
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(checkpoint_dir(self.run_dir), ck.every_steps, ck.every_minutes, ck.keep_last)
        self.logger = TrainLogger(cfg.log, self.run_dir, self.rank == 0, to_dict(cfg))
        self.evaluator = self._build_evaluator()
        self.state = TrainState()
        self._stop_requested = False
        self._last_saved_step = -1

    # ----- construction -------------------------------------------------------------------------

    def _configure_determinism(self) -> None:
        torch.manual_seed(self.cfg.train.seed)  # the same initial weights on every rank
        if self.cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def _build_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        m = self.cfg.model
        try:
            # open_clip's own init arguments (None: its defaults, no bias), so checkpoints and exports hold them
            inits = {"init_logit_scale": m.init_logit_scale, "init_logit_bias": m.init_logit_bias}
            inits = {k: v for k, v in inits.items() if v is not None}
            clip, _, _ = alip.create_model(m.name, pretrained=m.pretrained, **inits)
        except ValueError as e:  # create_model's "unknown model": a config value, not a bug
            raise ConfigError(f"model.name: {e}") from None
        clip.set_grad_checkpointing(m.grad_checkpointing)  # open_clip checkpoints non-reentrantly: DDP-safe
        clip.to(self.device)
        self.bipath = alip.BiPathCLIP(clip, text_trim=m.text_trim, text_buckets=m.text_buckets)
        net: torch.nn.Module = self.bipath
        if m.compile:
            # In place: state-dict keys stay those of open_clip. BiPathCLIP.compile compiles the whole
            # forward when untrimmed, else the towers (the length planning stays outside dynamo).
            self.bipath.compile()
        if self.world_size > 1:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return clip, net

    def _build_evaluator(self) -> Any:
        e = self.cfg.eval
        if e.every_steps is None:
            return None
        from alip.eval.evaluator import Evaluator

        _, _, transform = alip.create_model(self.cfg.model.name)  # the eval transform of this architecture
        return Evaluator.from_paths(
            every_steps=e.every_steps,
            tokenizer=alip.get_tokenizer(self.cfg.model.name),
            transform=transform,
            retrieval=e.retrieval,
            zeroshot=e.zeroshot,
            max_samples=e.max_samples,
            device=self.device,
            num_workers=self.cfg.data.num_workers,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.cfg.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    # ----- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Collective (every rank must call it): gathers each rank's loader and RNG state."""
        local = {"loader": self.loader.state_dict(), "rng": rng_state()}
        ranks = [local]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, local)
        return {
            "model": self.clip.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "train_state": dataclasses.asdict(self.state),
            "world_size": self.world_size,
            "ranks": ranks,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any], reshard: bool = False) -> None:
        """Continue exactly where `state` stopped; each rank restores its own loader and RNG.

        `state` is one that alip.train.resume.check_resume accepted for this config and world size.
        Hyperparameters come from this trainer's config (see resume_optimizer), the rest from `state`.
        With `reshard`, `state` may come from another world size or other shards (see `_reshard_data`).
        The run's total needs no change on another world size: an epoch is N // global batch steps
        ("drop") or ceil(N / global batch) ("pad" and "fill", as ceil(ceil(N / W) / B) equals it), and the global
        batch is the checkpoint's. On other shards, `train.epochs` counts epochs of the new data.
        """
        loaders = [r["loader"] for r in state["ranks"]]
        exact = state["world_size"] == self.world_size and self.loader.same_data(loaders[self.rank])
        if not exact and not reshard:  # another world size was refused by check_resume: the shards changed
            raise CheckpointError(
                "the checkpoint's data position does not fit data.train: its shards differ from the checkpoint's "
                "(file names or record counts); --reshard continues the model and schedule and restarts the data order"
            )
        step = state["train_state"]["step"]
        if step > self.total_steps:
            raise CheckpointError(
                f"the checkpoint is at step {step}, past this run's {self.total_steps} steps: raise train.max_steps "
                "(or train.epochs) to continue it"
            )
        self.clip.load_state_dict(state["model"])
        resume_optimizer(self.optimizer, self.scheduler, state["optimizer"], state["scheduler"])
        if state["scaler"]:  # empty where the checkpoint's run had no fp16 loss scaler: keep the fresh one
            self.scaler.load_state_dict(scaler_state(state["scaler"], self.cfg.train.scaler_growth_interval))
        self._load_gates(state["loss"])
        self.state = TrainState(**state["train_state"])
        if exact:
            mine = state["ranks"][self.rank]
            try:
                self.loader.load_state_dict(mine["loader"])
            except ValueError as e:  # the shards under data.train changed since the checkpoint
                raise CheckpointError(f"the checkpoint's data position does not fit data.train: {e}") from None
            set_rng_state(mine["rng"])
        else:
            self._reshard_data(loaders, state["world_size"])
            # Every rank seeds torch, NumPy and Python alike and draws the same numbers (the per-rank
            # randomness is the loaders'), so rank 0's generators are every rank's.
            set_rng_state(state["ranks"][0]["rng"])
        self._last_saved_step = self.state.step

    def _load_gates(self, saved: dict[str, Any]) -> None:
        """The gate EMAs; they are per caption source, so only data with the checkpoint's sources continues them
        (--reshard onto data with other caption slots is refused here)."""
        ours = self.loss_fn.state_dict()
        if saved.keys() != ours.keys():
            k = self.loss_fn.num_sources
            raise CheckpointError(
                f"the checkpoint's gate EMAs ({', '.join(sorted(saved))}) are not those of this run's {k} caption "
                f"source(s) {list(self.loss_fn.caption_sources)}: the gates keep EMAs per caption source; start a "
                "new run (model.pretrained=CHECKPOINT keeps the weights)"
            )
        self.loss_fn.load_state_dict(saved)

    def _reshard_data(self, loaders: list[dict[str, Any]], old_world_size: int) -> None:
        """Place the loader after a checkpoint of another world size, or of other shards (--reshard)."""
        if self.loader.same_data(loaders[0]):
            said = self.loader.continue_epoch(loaders)
            what = f"written by {old_world_size} ranks, continued on {self.world_size}"
        else:
            self.loader.restart_epoch(int(loaders[0]["epoch"]))
            said = f"epoch {self.loader.epoch} starts afresh over the {self.loader.num_records} records of data.train"
            what = "written for other shards than data.train's"
        if self.rank == 0:
            logger.warning(
                "--reshard: checkpoint %s. Model, optimizer, schedule, gate EMAs and counters continue exactly "
                "(step %d, %d samples seen, %d steps in all); the data order does not: %s",
                what,
                self.state.step,
                self.state.samples_seen,
                self.total_steps,
                said,
            )

    def save(self) -> None:
        state = self.state_dict()
        if self.rank == 0:
            self.checkpointer.save(state, self.state.step)
        self._last_saved_step = self.state.step
        if self.world_size > 1:
            dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk

    # ----- one step -------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepOutcome:
        """Forward/backward over the whole batch, then one optimizer step, or a skip on every rank."""
        batch = self._pick_captions(batch)
        res = forward_backward(
            self.net, self.loss_fn, batch, self.cfg.train.accum_steps, self._autocast, self.scaler.scale
        )
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.clip.parameters(), clip if clip is not None else math.inf)
        applied = all_ranks_finite(res is not None and bool(torch.isfinite(grad_norm)), self.device)
        if applied:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            with torch.no_grad():
                self.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        elif self.scaler.is_enabled():
            self.scaler.update()  # an fp16 overflow lowers the loss scale
        if applied or self.cfg.schedule.step_on_skip:  # once per step, never per micro-batch
            with warnings.catch_warnings():  # torch warns where a skipped first step comes before any optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_skip(applied)
        if res is None:
            losses = {
                k: math.nan for k in dict.fromkeys(("loss", "loss_raw", "loss_caption", *self.loss_fn.loss_names))
            }
            gates = {}
        else:
            losses = rank_mean({k: res[k] for k in self.loss_fn.loss_names}, self.device)
            gates = {k: res[k].detach() for k in self.loss_fn.weight_names}  # per source too: "blip/weight_caption"
        return StepOutcome(applied, losses, gates, float(grad_norm), gate_stats(self.loss_fn, res))

    def _pick_captions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """loss.captions=sample with K > 1 sources: each sample's drawn caption [B, 77] and its source [B]
        (alip.train.captions: drawn from the seed, the step and the global place; resume needs only the step)."""
        if not (self.loss_fn.use_caption and self.loss_fn.draws_captions):
            return batch
        start = self.rank * self.shape.per_rank_batch  # this rank's first place in the global batch
        return with_drawn_captions(batch, self.cfg.train.seed, self.state.step, start, self.loss_fn.caption_weights)

    def _count_skip(self, applied: bool) -> None:
        s = self.state
        if applied:
            s.consecutive_skips = 0
            return
        s.skipped_steps += 1
        s.consecutive_skips += 1
        logger.warning("step %d: non-finite loss inputs or gradients on some rank; step skipped", s.step + 1)
        if s.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise TooManySkippedStepsError(
                f"{s.consecutive_skips} consecutive steps had non-finite loss inputs or gradients (up to step "
                f"{s.step + 1}); training has diverged. Resume an earlier checkpoint with a lower optim.lr (into "
                "another output_dir), or raise train.max_consecutive_skips."
            )

    # ----- the loop ---------------------------------------------------------------------------------

    def fit(self) -> bool:
        """Train to `total_steps`. Returns False when stopped early by SIGTERM (after saving)."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._loop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.logger.close()

    def _loop(self) -> bool:
        data = self._batches()
        meter = _Meter(self.state.step)
        global_batch = self.shape.per_rank_batch * self.world_size
        while self.state.step < self.total_steps:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # see _batches
                batch = next(data)
            meter.data_wait += time.perf_counter() - t0
            outcome = self.train_step(batch)
            meter.flops += self._step_flops()
            self.state.step += 1
            self.state.samples_seen += global_batch
            step = self.state.step
            self.logger.record_step(step, {**outcome.losses, **outcome.stats}, outcome.applied)
            if self.logger.should_log(step):
                self.logger.log(step, self._metrics(outcome, meter))
            self.logger.histograms(step, outcome.gates)
            if self.evaluator is not None and self.evaluator.should_run(step):
                with torch.random.fork_rng(devices=[]):  # training draws the same numbers whatever the eval cadence
                    self.logger.log_eval(step, self.evaluator.run(self.net))
            save, stop = self._save_or_stop(step)
            if save:
                self.save()
            if stop:
                logger.info("SIGTERM: saved step %d and stopping; resume with --resume latest", step)
                return False
        self.finish()
        return True

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches across epochs; the loader knows which epoch it is in (and where, after a resume).

        Drawn outside torch's global RNG stream (the caller forks it): torch's DataLoader draws a
        base seed from it whenever an epoch's iterator starts, which a run resumed mid-epoch does at
        another point of the stream than an uninterrupted run. Dropout would then diverge after a resume.
        """
        while True:
            yield from self.loader

    def _save_or_stop(self, step: int) -> tuple[bool, bool]:
        """Rank 0's checkpoint verdict (time-based saves must agree) and any rank's SIGTERM, in one all-reduce."""
        due = self.rank == 0 and self.checkpointer.should_save(step) and step < self.total_steps
        flags = torch.tensor([float(due), float(self._stop_requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save, stop = bool(flags[0]), bool(flags[1])
        return save or stop, stop

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_requested = True  # acted on at the next step boundary, by every rank together

    def finish(self) -> None:
        """Final checkpoint and, on rank 0, the open_clip .pt and .safetensors exports."""
        if self._last_saved_step != self.state.step:
            self.save()
        if self.rank == 0 and self.cfg.checkpoint.export:
            for suffix in (".pt", ".safetensors"):
                path = alip.export_model(self.clip, self.run_dir / f"final{suffix}")
                logger.info("exported final weights to %s", path)

    def _step_flops(self) -> float:
        """Model FLOPs of this rank's last step, for the lengths its text tower computed (alip.flops)."""
        calls = self.bipath.take_text_calls()
        return step_flops(self.clip, self.shape.per_rank_batch, calls) if self._count_flops else 0.0

    def _metrics(self, outcome: StepOutcome, meter: _Meter) -> dict[str, float]:
        step = self.state.step
        steps_per_s, flops_per_s = meter.take(step)
        rate = steps_per_s * self.shape.per_rank_batch
        m = {
            "train/step": step,
            "train/total_steps": self.total_steps,
            "train/samples_seen": self.state.samples_seen,
            "train/samples_per_s_per_rank": rate,
            "train/samples_per_s": rate * self.world_size,
            "train/data_wait_s": meter.take_wait(),
            "train/eta_s": (self.total_steps - step) * self.shape.per_rank_batch / rate if rate > 0 else math.inf,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/logit_scale": float(self.clip.logit_scale.detach().exp()),
            # the sigmoid objective's learnable bias, beside the scale
            **(
                {"train/logit_bias": float(self.clip.logit_bias.detach())}
                if getattr(self.clip, "logit_bias", None) is not None
                else {}
            ),
            "train/grad_norm": outcome.grad_norm,
            "train/loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            "train/skipped_steps": self.state.skipped_steps,
        }
        if self._count_flops:
            m["train/tflops_per_s_per_rank"] = flops_per_s / 1e12
            if self._peak_tflops:  # a GPU of the peak table (alip.flops.PEAK_TFLOPS_BF16)
                m["train/mfu"] = flops_per_s / 1e12 / self._peak_tflops
        m.update({f"train/{k}": v for k, v in {**outcome.losses, **outcome.stats}.items()})  # train/gate/sim_tc_mean...
        m.update({f"train/gate/{k}_mean": float(v.float().mean()) for k, v in outcome.gates.items()})
        return m


class _Meter:
    """Throughput, model FLOPs and data-wait over the window since the last log line."""

    def __init__(self, step: int) -> None:
        self._step, self._time = step, time.perf_counter()
        self.data_wait = 0.0
        self.flops = 0.0  # model FLOPs of this rank's steps in the window

    def take(self, step: int) -> tuple[float, float]:
        """Steps per second and model FLOPs per second since the last call; starts a new window."""
        now = time.perf_counter()
        elapsed = max(now - self._time, 1e-9)
        rates = ((step - self._step) / elapsed, self.flops / elapsed)
        self._step, self._time, self.flops = step, now, 0.0
        return rates

    def take_wait(self) -> float:
        wait, self.data_wait = self.data_wait, 0.0
        return wait
