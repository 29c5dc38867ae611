"""Trainer logging: TensorBoard scalars and gate histograms, wandb offline resuming the same run, eval.jsonl."""

import json
from pathlib import Path

import pytest
import torch
from shard_factory import write_test_shards

from alip.config import load_config
from alip.train.run import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread_then_restore():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # the tiny config switches it on process-wide


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("log_shards"), num_records=24, per_shard=10).meta


def run(data, out, *extra):
    base = [f"data.train={data}", f"output_dir={out}", "log.every_steps=2", "log.histogram_every_steps=2"]
    return train(load_config(TINY, [*base, *extra]), resume="latest")


def test_tensorboard_gets_namespaced_scalars_and_gate_histograms(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(data, tmp_path, "train.max_steps=4", "log.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("train/loss", "train/loss_raw", "train/loss_caption", "train/gate/weight_sample_mean", "train/lr"):
        assert key in tags["scalars"], key
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    for name in ("weight_sample", "weight_raw", "weight_caption"):
        hist = events.Histograms(f"train/gate/{name}")
        assert [h.step for h in hist] == [2, 4] and hist[0].histogram_value.num == 8  # global batch of 8


def test_wandb_offline_resumes_the_same_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "myrun"
    run(data, out, "train.max_steps=2", "log.tensorboard=false", "log.wandb=true", "log.wandb_mode=offline")
    run(data, out, "train.max_steps=4", "log.tensorboard=false", "log.wandb=true", "log.wandb_mode=offline")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-myrun") for r in runs)  # one wandb run id across the resume
    assert all(list(r.glob("run-myrun.wandb")) for r in runs)


def test_eval_lines_go_to_eval_jsonl_and_resume_drops_the_stale_ones(tmp_path):
    from alip.config import LogConfig
    from alip.train.logger import TrainLogger

    log = TrainLogger(LogConfig(tensorboard=False), tmp_path, is_main=True, run_config={})
    for step in (10, 20, 30):
        log.record_step(step, {"loss": 1.0}, True)
        log.log_eval(step, {"eval/shapes/top1": float(step)})
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, "eval/shapes/top1": float(s)} for s in (10, 20, 30)]
    log.truncate_after(20)  # a resume from the step-20 checkpoint: the killed run's step-30 lines are stale
    for name in ("eval.jsonl", "losses.jsonl"):
        assert [json.loads(x)["step"] for x in (tmp_path / name).read_text().splitlines()] == [10, 20]
    log.close()
    other = TrainLogger(LogConfig(tensorboard=False), tmp_path / "r1", is_main=False, run_config={})
    other.log_eval(5, {"eval/x": 1.0})  # only the main rank writes
    assert not (tmp_path / "r1" / "eval.jsonl").exists()


def test_log_has_model_tflops_and_counts_each_forward_once(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alip.config import validate
    from alip.flops import image_flops, text_flops
    from alip.train.trainer import Trainer

    run(data, tmp_path / "r", "train.max_steps=4", "log.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert all(e.value > 0 for e in events.Scalars("train/tflops_per_s_per_rank"))
    assert "train/mfu" not in events.Tags()["scalars"]  # no GPU peak to divide by on a CPU

    # Cached accumulation runs every micro-batch forward twice (no grad, then with grad): the
    # recomputation is not model work, so a step counts 3 x (images + 2 texts at 77 tokens).
    cfg = load_config(
        TINY, [f"data.train={data}", f"output_dir={tmp_path / 't'}", "train.accum_steps=2", "model.text_trim=off"]
    )
    trainer = Trainer(cfg, validate(cfg, 1), tmp_path / "t", torch.device("cpu"))
    b, clip = trainer.shape.per_rank_batch, trainer.clip
    batches = iter(trainer.loader)
    for _ in range(2):  # the second step counts only its own calls
        trainer.train_step(next(batches))
        assert trainer._step_flops() == pytest.approx(3 * (b * image_flops(clip) + 2 * b * text_flops(clip, 77)))


def test_mfu_is_the_model_tflops_over_the_gpu_peak(data, tmp_path, monkeypatch):
    """train/mfu = train/tflops_per_s_per_rank / the device's bf16 peak (alip.flops.device_peak_tflops,
    which the trainer reads once; a CPU has no peak, so the test pretends one of 100 TFLOP/s)."""
    import alip.train.trainer as trainer_module
    from alip.train.logger import TrainLogger

    monkeypatch.setattr(trainer_module, "device_peak_tflops", lambda device: 100.0)
    logged = []
    original = TrainLogger.log
    monkeypatch.setattr(TrainLogger, "log", lambda self, step, m: logged.append(dict(m)) or original(self, step, m))
    trainer = run(data, tmp_path, "train.max_steps=4", "log.tensorboard=false")
    assert trainer._peak_tflops == 100.0
    assert [m["train/step"] for m in logged] == [2, 4]
    for m in logged:
        assert m["train/tflops_per_s_per_rank"] > 0
        assert m["train/mfu"] == m["train/tflops_per_s_per_rank"] / 100


def test_peak_table_tells_h100_variants_apart():
    from alip.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 NVL") == 835.5  # not the SXM part's 989.4: "H100" also matches it
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.4


STEP_METRICS = {
    "train/step": 2,
    "train/total_steps": 4,
    "train/samples_per_s_per_rank": 1.0,
    "train/samples_per_s": 1.0,
    "train/data_wait_s": 0.0,
    "train/eta_s": 1.0,
    "train/logit_scale": 2.66,
    "train/grad_norm": 0.5,
    "train/loss_scale": 1.0,
    "train/skipped_steps": 0,
}


@pytest.mark.parametrize(
    ("objective", "metrics", "shown", "absent"),
    [
        ({"use_caption": False}, {"train/loss": 2.0, "train/loss_raw": 2.0}, ["loss 2.0000 |"], ["caption", "gates"]),
        (
            {"use_caption": True, "use_gates": False},
            {"train/loss": 3.0, "train/loss_raw": 2.0, "train/loss_caption": 1.0},
            ["loss 3.0000 (raw 2.0000, caption 1.0000)"],
            ["gates"],
        ),
        (
            {"use_caption": True, "use_gates": True},
            {"train/loss": 3.0, "train/loss_raw": 2.0, "train/loss_caption": 1.0}
            | {f"train/gate/weight_{w}_mean": 0.5 for w in ("sample", "raw", "caption")},
            ["(raw 2.0000, caption 1.0000)", "gates s 0.500 t 0.500 c 0.500"],
            [],
        ),
    ],
    ids=["clip", "alip_no_gates", "alip"],
)
def test_the_step_line_prints_only_what_the_objective_computes(tmp_path, caplog, objective, metrics, shown, absent):
    """A CLIP run has no caption term and no gates: its step line says neither (no `caption nan`, `c nan`)."""
    from alip.config import LogConfig
    from alip.train.logger import TrainLogger

    log = TrainLogger(LogConfig(tensorboard=False), tmp_path, is_main=True, run_config={"loss": objective})
    with caplog.at_level("INFO", logger="alip.train"):
        log.log(2, {**STEP_METRICS, **metrics})
    line = caplog.records[-1].getMessage()
    assert "nan" not in line and all(s in line for s in shown) and not [a for a in absent if a in line], line
    log.close()
