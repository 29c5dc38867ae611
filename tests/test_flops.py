"""The analytic FLOP count (alip.flops) equals torch's flop counter on real forwards."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import alip
from alip.flops import image_flops, peak_tflops, step_flops, supports_count, text_flops
from alip.model import quiet_random_init
from alip.text_trim import encode_text_prefix


def counted(fn) -> float:
    # The math attention backend: torch's flop counter has no formula for the fused CPU kernel
    # (_scaled_dot_product_flash_attention_for_cpu) and would miss every attention product.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["ALIP-Tiny", "ViT-B-32"])
def test_tower_flops_match_the_flop_counter(name, one_thread):
    with quiet_random_init():
        clip, _, _ = alip.create_model(name)
    assert supports_count(clip)
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    image = torch.zeros(2, 3, size, size)
    assert image_flops(clip) * 2 == pytest.approx(counted(lambda: clip.encode_image(image)), rel=1e-3)
    for length in (5, 16, 77):
        tokens = torch.zeros(3, length, dtype=torch.long)
        tokens[:, -1] = 49407
        measured = counted(lambda tokens=tokens: encode_text_prefix(clip, tokens))
        assert text_flops(clip, length) * 3 == pytest.approx(measured, rel=1e-3), length


def test_vit_b_32_forward_is_the_known_figure():
    # ViT-B/32 at 224 px: 4.4 GMACs per image, 2.98 GMACs per 77-token text (open_clip's model profile).
    with quiet_random_init():
        clip, _, _ = alip.create_model("ViT-B-32")
    assert image_flops(clip) / 2e9 == pytest.approx(4.41, abs=0.01)
    assert text_flops(clip, 77) / 2e9 == pytest.approx(2.98, abs=0.01)
    # One ALIP sample: image + two texts, forward and backward (3x).
    assert step_flops(clip, 1, [(2, 77)]) == pytest.approx(3 * (image_flops(clip) + 2 * text_flops(clip, 77)))


def test_peak_table():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla T4") is None
