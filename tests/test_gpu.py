"""What only a GPU can show: mixed-precision steps, the fp16 scaler, eval on CUDA, DALI's GPU decode.

Marked `gpu` and skipped without CUDA, so CI (CPU only) collects them and skips them. On a GPU
machine: `python -m pytest -m gpu tests/test_gpu.py` (benchmarks/gpu_suite.py runs them first).
"""

from pathlib import Path

import pytest
import torch

import alip
from alip.config import load_config, validate
from alip.train.step import forward_backward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def tiny_batch(n: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    tokens = alip.get_tokenizer("ALIP-Tiny")([f"a photo number {i}" for i in range(n)])
    image = torch.randn(n, 3, 64, 64, generator=gen)
    return {"image": image.to(device), "text": tokens.to(device), "caption": tokens.flip(0).to(device)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_is_finite(precision):
    device = torch.device("cuda")
    torch.manual_seed(0)
    clip, _, _ = alip.create_model("ALIP-Tiny", device=device)
    net = alip.BiPathCLIP(clip, text_trim="buckets")
    loss_fn = alip.AlipLoss().to(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    res = forward_backward(
        net, loss_fn, tiny_batch(16, device), 1, lambda: torch.autocast("cuda", dtype=dtype), scaler.scale
    )
    assert res is not None and torch.isfinite(res["loss"])
    grads = [p.grad for p in clip.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_adamw_is_fused_on_cuda():
    """alip/train/optim.py asks for fused AdamW when every parameter is on CUDA (the bf16 config relies on it)."""
    from alip.config import OptimConfig
    from alip.train.optim import build_optimizer

    clip, _, _ = alip.create_model("ALIP-Tiny", device=torch.device("cuda"))
    opt = build_optimizer(clip, OptimConfig())
    assert opt.defaults["fused"]


def test_fp16_scaler_skips_an_injected_overflow(shards, tmp_path):
    from alip.train.trainer import Trainer

    cfg = load_config(TINY, [f"data.train={shards.meta}", f"output_dir={tmp_path}", "train.precision=fp16"])
    trainer = Trainer(cfg, validate(cfg, 1), tmp_path, torch.device("cuda"))
    before = {k: v.clone() for k, v in trainer.clip.state_dict().items()}
    trainer.scaler.update(new_scale=2.0**60)  # fp16 gradients overflow to inf at this loss scale
    batch = next(iter(trainer.loader))
    outcome = trainer.train_step(batch)
    assert not outcome.applied and trainer.state.skipped_steps == 1
    assert trainer.scaler.get_scale() < 2.0**60  # the scaler backed off
    for k, v in trainer.clip.state_dict().items():
        assert torch.equal(v, before[k]), k  # a skipped step changes no weight
    outcome = trainer.train_step(batch)  # at a sane scale again (the scaler keeps halving until finite)
    while not outcome.applied and trainer.state.consecutive_skips < 10:
        outcome = trainer.train_step(batch)
    assert outcome.applied


def test_eval_features_and_linear_probe_on_cuda():
    from alip.eval.features import extract_features, image_encoder
    from alip.eval.linear_probe import fit_logistic_regression

    torch.manual_seed(0)
    clip, _, _ = alip.create_model("ALIP-Tiny")
    images = list(torch.randn(40, 3, 64, 64))
    cpu, _ = extract_features(images, image_encoder(clip), device="cpu", batch_size=8, num_workers=0)
    gpu, _ = extract_features(images, image_encoder(clip.cuda()), device="cuda", batch_size=8, num_workers=0)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-3)
    y = torch.arange(40) % 4
    on_cpu = fit_logistic_regression(cpu, y, 4, C=1.0, device="cpu")
    on_gpu = fit_logistic_regression(cpu, y, 4, C=1.0, device="cuda")
    torch.testing.assert_close(on_gpu.weight.cpu(), on_cpu.weight.cpu(), atol=1e-3, rtol=1e-2)
    assert torch.equal(on_gpu.logits(cpu.cuda()).argmax(1).cpu(), on_cpu.logits(cpu).argmax(1))


def test_dali_mixed_decode_matches_cpu_decode(shards):
    pytest.importorskip("nvidia.dali")
    from alip.data.loaders.config import LoaderConfig
    from alip.data.loaders.dali import DaliLoader

    config = LoaderConfig(batch_size=8, image_size=64, num_threads=2)
    cpu = next(iter(DaliLoader(shards.meta, config, train=False, device="cpu")))
    gpu = next(iter(DaliLoader(shards.meta, config, train=False, device="cuda")))
    assert torch.equal(cpu["text"].cpu(), gpu["text"].cpu())  # same records in the same order
    diff = (cpu["image"].float().cpu() - gpu["image"].float().cpu()).abs()
    # nvJPEG and libjpeg-turbo round the IDCT differently: a level or two of 255, rarely more.
    assert diff.mean() < 0.02 and diff.max() < 0.25


def test_dali_gpu_decode_failure_names_the_shards_and_the_deep_check(shards, tmp_path):
    """Issue 17's case as the user met it: DALI's `mixed` decoder failing with "nvImageCodec failure
    '#4'" and naming nothing. tests/test_adversarial_shards.py checks the CPU decoder."""
    pytest.importorskip("nvidia.dali")
    from test_adversarial_shards import IMAGE_AT, NOT_A_JPEG, config, damaged_copy

    from alip.data.format.recordio import RecordIOError
    from alip.data.loaders.dali import DaliLoader

    meta, rec = damaged_copy(shards, tmp_path / "s", 13, IMAGE_AT, NOT_A_JPEG)
    loader = DaliLoader(meta, config(), train=False, device="cuda")
    with pytest.raises(RecordIOError) as e:
        list(loader)
    assert str(rec) in str(e.value) and "inspect_rec.py --check --deep" in str(e.value)
    loader.close()
