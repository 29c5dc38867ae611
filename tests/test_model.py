"""Model factory, bi-path forward, checkpoint formats, export and refusal of unsafe checkpoints."""

import os
from unittest import mock

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import alip

NAME = "ALIP-Tiny"


def tiny(seed):
    torch.manual_seed(seed)
    model, _, _ = alip.create_model(NAME)
    return model.eval()


@pytest.fixture(scope="module")
def probe():
    gen = torch.Generator().manual_seed(7)
    tokens = alip.get_tokenizer(NAME)(["a red square on a white table", "IMG_4821.JPG", "", "#photooftheday"])
    return torch.randn(4, 3, 64, 64, generator=gen), tokens


def outputs(model, probe):
    image, tokens = probe
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(tokens)


def test_create_model_and_tokenizer():
    model, train_tf, val_tf = alip.create_model(NAME)
    assert hasattr(model, "encode_image") and hasattr(model, "logit_scale")
    assert train_tf is not None and val_tf is not None
    tokens = alip.get_tokenizer("ViT-B-32")(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        alip.create_model("ViT-Q-99")


def test_vit_b_32_has_the_official_architecture():
    # The official ALIP ViT-B/32 has exactly open_clip's ViT-B-32 keys and shapes (GELU, not QuickGELU).
    model, _, _ = alip.create_model("ViT-B-32")
    sd = model.state_dict()
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["text_projection"].shape == (512, 512) and sd["token_embedding.weight"].shape == (49408, 512)
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_bipath_encodes_raw_text_and_caption_in_one_call(probe):
    model = tiny(0)
    image, tokens = probe
    raw, cap = tokens, tokens.flip(0)
    with mock.patch.object(model, "encode_text", wraps=model.encode_text) as spy, torch.no_grad():
        out = alip.BiPathCLIP(model, text_trim="off")(image, raw, cap)  # untrimmed, as the release: one call
    assert spy.call_count == 1 and spy.call_args.args[0].shape == (8, 77)
    with torch.no_grad():
        torch.testing.assert_close(out["raw_features"], model.encode_text(raw, normalize=True), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            out["caption_features"], model.encode_text(cap, normalize=True), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(out["image_features"], model.encode_image(image, normalize=True))
    assert out["image_features"].norm(dim=-1).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(out["logit_scale"], model.logit_scale.exp())
    assert alip.BiPathCLIP(model)(image, raw)["caption_features"] is None


def _save_variants(model, tmp_path):
    sd = model.state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    files = {
        "official_release.pt": ddp,  # ALIP release: bare state dict saved from DDP
        "open_clip_ddp.pt": {"epoch": 32, "name": "run", "state_dict": ddp, "optimizer": {}},
        "open_clip.pt": {"epoch": 1, "state_dict": sd},
        "ours.pt": {"model": sd, "step": 10, "config": {"model": {"name": NAME}}, "gates": {}},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    alip.export_model(model, tmp_path / "export.safetensors")
    alip.export_model(alip.BiPathCLIP(model), tmp_path / "export.pt")  # wrapper unwrapped on export
    return [*files, "export.safetensors", "export.pt"]


def test_every_accepted_format_round_trips(tmp_path, probe):
    source = tiny(0)
    want = outputs(source, probe)
    expected_format = {
        "official_release.pt": "state_dict",
        "open_clip_ddp.pt": "open_clip",
        "open_clip.pt": "open_clip",
        "ours.pt": "alip-train",
        "compiled.pt": "state_dict",
        "export.safetensors": "state_dict",
        "export.pt": "state_dict",
    }
    for name in _save_variants(source, tmp_path):
        target = tiny(1)
        assert not torch.equal(outputs(target, probe)[0], want[0])  # really another model before loading
        assert alip.load_checkpoint(target, tmp_path / name) == expected_format[name]
        got = outputs(target, probe)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name


def test_exports_load_in_open_clip_unchanged(tmp_path, probe):
    source = tiny(0)
    want = outputs(source, probe)
    for name in ("export.safetensors", "export.pt"):
        alip.export_model(source, tmp_path / name)
        model = open_clip.create_model(NAME, pretrained=str(tmp_path / name)).eval()
        got = outputs(model, probe)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert set(load_file(tmp_path / "export.safetensors")) == set(source.state_dict())


def test_create_model_with_a_local_checkpoint(tmp_path, probe, caplog):
    source = tiny(0)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "alip.pt")
    caplog.clear()  # tiny() built the source model without weights: its warning is true
    with caplog.at_level("WARNING"):
        model, _, _ = alip.create_model(NAME, pretrained=str(tmp_path / "alip.pt"))
    assert torch.equal(outputs(model.eval(), probe)[0], outputs(source, probe)[0])
    # open_clip's "initialized randomly" would be false here: the checkpoint was loaded
    assert not any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        alip.create_model(NAME)  # no checkpoint: the warning is true and stays
    assert any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint not found"):
        alip.create_model(NAME, pretrained=str(tmp_path / "missing.pt"))


def test_mismatch_names_missing_unexpected_keys_and_shapes(tmp_path):
    sd = dict(tiny(0).state_dict())
    del sd["ln_final.bias"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    sd["text_projection"] = torch.zeros(64, 32)
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    model = tiny(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(alip.CheckpointError) as err:
        alip.load_checkpoint(model, tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys (1): ln_final.bias" in msg
    assert "unexpected keys (1): visual.extra_head.weight" in msg
    assert "text_projection: checkpoint [64, 32] vs model [64, 64]" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_loading_another_architecture_fails_clearly(tmp_path):
    vitb, _, _ = alip.create_model("ViT-B-32")
    torch.save(vitb.state_dict(), tmp_path / "b32.pt")
    with pytest.raises(alip.CheckpointError, match="shape mismatches"):
        alip.load_checkpoint(tiny(0), tmp_path / "b32.pt")


def test_planted_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    sd = dict(tiny(0).state_dict())
    torch.save({"state_dict": sd, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(alip.CheckpointError, match="refused to load"):
        alip.load_checkpoint(tiny(1), tmp_path / "evil.pt")
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_unreadable_and_missing_checkpoints(tmp_path):
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(alip.CheckpointError, match="cannot read checkpoint"):
        alip.load_checkpoint(tiny(0), tmp_path / "trunc.pt")
    with pytest.raises(FileNotFoundError):
        alip.load_checkpoint(tiny(0), tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="must end in"):
        alip.export_model(tiny(0), tmp_path / "model.onnx")
