"""configs/yfcc15m_vitb32_alip_bf16.yaml is the default recipe with only speed and memory changed."""

from pathlib import Path

import torch

from alip.config import OptimConfig, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# What the bf16 config may change: numerics-neutral speed / memory settings and the run folder.
ALLOWED = {
    "train.precision",
    "model.grad_checkpointing",
    "output_dir",
    "model.compile",
    "model.text_trim",
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_bf16_config_differs_from_the_default_recipe_only_in_allowed_keys():
    default = flat(to_dict(load_config(CONFIGS / "yfcc15m_vitb32_alip.yaml")))
    bf16 = flat(to_dict(load_config(CONFIGS / "yfcc15m_vitb32_alip_bf16.yaml")))
    assert default.keys() == bf16.keys()
    changed = {k for k in default if default[k] != bf16[k]}
    assert changed <= ALLOWED, {k: (default[k], bf16[k]) for k in changed - ALLOWED}
    assert bf16["train.precision"] == "bf16" and not bf16["model.grad_checkpointing"]
    assert bf16["model.text_trim"] != "off"


def test_adamw_is_not_fused_on_the_cpu():
    """The fused kernel is CUDA-only (tests/test_gpu.py checks that CUDA gets it)."""
    from alip.train.optim import build_optimizer

    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig())
    assert not opt.defaults["fused"]
