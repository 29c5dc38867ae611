"""Publishing: tools/export_checkpoint.py --format transformers | open_clip, and the model card.

Every folder is loaded back offline in its own library, and its outputs are compared with open_clip's on the
same pixels and tokens (fp32). The tokenizer and the image processor are compared with open_clip's on varied
strings and on real photos (skimage.data). A tiny training run with a real evaluation feeds the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from shard_factory import photo, write_test_shards

import alip
from alip.cli import guarded
from alip.publish import STAMP, ExportFolderError, ExportRefused, export_folder
from alip.publish.transformers_format import transformers_state_dict

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "hubble_deep_field", "rocket"]
TEXTS = ["a photo of a cat", "", "A DOG ON A SOFA", "two  spaces\tand\nnewlines", "x" * 300, "word " * 120]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may come from a hub: every folder must load on its own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tool(argv: list) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_checkpoint", ROOT / "tools" / "export_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return guarded(module.main)([str(a) for a in argv])


def seeded(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    with alip.model.quiet_random_init():
        model = alip.create_model(name, **kwargs)[0]
    return model.eval()


def exported(tmp: Path, model: torch.nn.Module, name: str, fmt: str) -> Path:
    ckpt = tmp / f"{name}.safetensors"
    alip.export_model(model, ckpt)
    out = tmp / f"{name}-{fmt}"
    export_folder(model, name, out, fmt, checkpoint=ckpt)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    model = seeded("ALIP-Tiny")
    return model, {fmt: exported(tmp, model, "ALIP-Tiny", fmt) for fmt in ("transformers", "open_clip")}


def hf_outputs(folder: Path, pixels: torch.Tensor, tokens: torch.Tensor):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=tokens, pixel_values=pixels)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def open_clip_outputs(model, pixels, tokens):
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    return image, text, model.logit_scale.exp() * image @ text.T


def assert_same_outputs(model, name, folder, fmt, *, context=None):
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]  # a ResNet tower's is an int
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(name, context_length=context)(TEXTS)
    expected = open_clip_outputs(model, pixels, tokens)
    if fmt == "transformers":
        got = hf_outputs(folder, pixels, tokens)
    else:
        loaded = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0].eval()
        got = open_clip_outputs(loaded, pixels, tokens)
    for what, a, b in zip(("image", "text", "logits"), expected, got, strict=True):
        assert a.shape == b.shape, what
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{fmt} {what}")


@pytest.mark.parametrize("fmt", ["transformers", "open_clip"])
def test_tiny_vit_round_trips_with_equal_features_and_logits(tiny, fmt):
    model, folders = tiny
    assert_same_outputs(model, "ALIP-Tiny", folders[fmt], fmt)


@pytest.mark.slow
def test_vit_b32_round_trips_both_ways(tmp_path):
    """The reference architecture, seeded: every weight maps and both folders compute open_clip's outputs."""
    model = seeded("ViT-B-32", seed=3)
    for fmt in ("transformers", "open_clip"):
        folder = exported(tmp_path, model, "ViT-B-32", fmt)
        assert_same_outputs(model, "ViT-B-32", folder, fmt)
        if fmt == "transformers":
            config = json.loads((folder / "config.json").read_text())
            vision, text = config["vision_config"], config["text_config"]
            assert (vision["hidden_size"], vision["num_hidden_layers"], vision["patch_size"]) == (768, 12, 32)
            assert (text["hidden_size"], text["num_attention_heads"], text["max_position_embeddings"]) == (512, 8, 77)
            assert vision["hidden_act"] == text["hidden_act"] == "gelu"  # open_clip's ViT-B-32: nn.GELU
            assert config["projection_dim"] == 512
        import shutil

        shutil.rmtree(folder)  # 600 MB each


def test_every_weight_maps_once():
    """Each transformers tensor comes from exactly one open_clip tensor (in_proj: three), none left over."""
    from transformers import CLIPConfig, CLIPModel

    from alip.publish.transformers_format import transformers_config

    model = seeded("ALIP-Tiny")
    mapped = transformers_state_dict(model)
    expected = CLIPModel(CLIPConfig(**transformers_config(model))).state_dict()
    persistent = {k for k in expected if not k.endswith("position_ids")}
    assert set(mapped) == persistent
    assert all(mapped[k].shape == expected[k].shape for k in mapped)
    numel = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in mapped.values()) == numel


def test_quick_gelu_and_layer_norm_eps_are_carried(tmp_path):
    model = seeded("ALIP-Tiny", force_quick_gelu=True)
    folder = exported(tmp_path, model, "ALIP-Tiny", "transformers")
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == "quick_gelu"
    assert config["vision_config"]["layer_norm_eps"] == 1e-5
    assert_same_outputs(model, "ALIP-Tiny", folder, "transformers")


def test_an_extended_text_context_is_carried(tmp_path):
    """A 248-position text tower (long captions): both folders build it, and long texts give equal features."""
    cfg = open_clip.get_model_config("ALIP-Tiny")
    model = seeded("ALIP-Tiny", text_cfg={**cfg["text_cfg"], "context_length": 248})
    for fmt in ("transformers", "open_clip"):
        folder = exported(tmp_path, model, "ALIP-Tiny", fmt)
        assert_same_outputs(model, "ALIP-Tiny", folder, fmt, context=248)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path / "ALIP-Tiny-transformers").model_max_length == 248
    oc_config = json.loads((tmp_path / "ALIP-Tiny-open_clip" / "open_clip_config.json").read_text())
    assert oc_config["model_cfg"]["text_cfg"]["context_length"] == 248


def test_a_resnet_tower_is_refused_in_one_line_naming_what_works(tmp_path, capsys):
    model = seeded("ALIP-Demo")
    ckpt = tmp_path / "demo.pt"
    alip.export_model(model, ckpt)
    assert tool([ckpt, tmp_path / "out", "--format", "transformers", "--model", "ALIP-Demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ModifiedResNet" in err and "--format open_clip" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert tool([ckpt, tmp_path / "hub", "--format", "open_clip", "--model", "ALIP-Demo"]) == 0  # what works
    assert_same_outputs(model, "ALIP-Demo", tmp_path / "hub", "open_clip")


def test_a_logit_bias_goes_to_open_clip_and_is_refused_by_clipmodel(tmp_path):
    """SigLIP's bias has no CLIPModel field, and SiglipModel's towers are not CLIP's: refused, naming both.
    open_clip's folder builds the parameter and carries its trained value."""
    model = seeded("ALIP-Tiny", init_logit_bias=-10.0)
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
    ckpt = tmp_path / "sig.safetensors"
    alip.export_model(model, ckpt)
    with pytest.raises(ExportRefused, match="logit_bias.*SiglipModel"):
        export_folder(model, "ALIP-Tiny", tmp_path / "hf", "transformers", checkpoint=ckpt)
    folder = exported(tmp_path, model, "ALIP-Tiny", "open_clip")
    loaded = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0]
    assert float(loaded.logit_bias) == -7.25


# Strings the two tokenizers read alike: ids equal up to and with the end token, open_clip's 0s after it.
SAME_IDS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photo of a cat.",
    "wow! what?!",
    "don't stop, it's fine",
    "the 3.14 numbers 12345 and 2026",
    "e-mail: someone@example.com",
    "path/to/file_name.jpg",
    "#hashtag @mention $100 50% off",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed",
    "Café déjà vu",
    "naïve façade résumé",
    "Ünïcödé ÀÉÎ ÕÜ",
    "Straße in München",
    "Привет, мир",
    "Γειά σου κόσμε",
    "東京タワーの夜景",
    "北京烤鸭",
    "서울의 밤",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "🐱 a cat emoji 🎉🎉",
    "👩‍👩‍👧 family",
    "🇫🇷 flag",
    "e\u0301 combining accent",
    "x" * 300,
    "word " * 120,
    "a " * 80,
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism " * 10,
    "(parentheses) [brackets] {braces}",
    "<html> tags </html>",
    "under_score and hy-phen",
    "ALL CAPS SENTENCE WITH NUMBERS 123",
    "mixed123letters456",
    "¿Qué pasa? ¡Nada!",
    "a photo of a 🐕 on the 🏖️",
    "カタカナ full-width katakana",
    "ℕ ℤ ℚ math letters",
    "½ ¾ fractions",
    "©®™ symbols",
    "…ellipsis",
    "—dash–en",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
]
# Strings open_clip's cleaning changes before its BPE (ftfy, HTML unescaping): transformers' CLIPTokenizer
# has neither, so their ids differ; the README says so, and open_clip's own cleaning makes them equal.
CLEANED_BY_OPEN_CLIP = [
    "it’s a “quote”",  # curly quotes
    "Tom &amp; Jerry",  # an HTML entity
    "ﬁne ligature",
    "ＦＵＬＬ width",
    "ﾊﾝｶｸ half-width katakana",
    "caf\u00c3\u00a9 mojibake",  # UTF-8 read as Latin-1
]


def hf_ids(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder)
    enc = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_ids_equal_open_clips_on_50_varied_strings(tiny):
    assert len(SAME_IDS) == 50
    ids, mask = hf_ids(tiny[1]["transformers"], SAME_IDS)
    expected = open_clip.get_tokenizer("ALIP-Tiny")(SAME_IDS)
    for text, a, m, b in zip(SAME_IDS, ids, mask, expected, strict=True):
        n = int(m.sum())
        assert a[:n].tolist() == b[:n].tolist(), repr(text)
        assert b[n:].eq(0).all() and a[n - 1] == 49407, repr(text)  # after the end token: pads either way
    long = [SAME_IDS.index("word " * 120), SAME_IDS.index("a " * 80)]
    assert expected[long].ne(0).all() and ids[long, -1].eq(49407).all()  # cut at 77, ending in the end token


def test_strings_open_clip_cleans_differ_unless_cleaned_the_same_way(tiny):
    from open_clip.tokenizer import basic_clean, whitespace_clean

    folder = tiny[1]["transformers"]
    expected = open_clip.get_tokenizer("ALIP-Tiny")(CLEANED_BY_OPEN_CLIP)
    raw, _ = hf_ids(folder, CLEANED_BY_OPEN_CLIP)
    cleaned, mask = hf_ids(folder, [whitespace_clean(basic_clean(t)) for t in CLEANED_BY_OPEN_CLIP])
    for text, r, c, m, e in zip(CLEANED_BY_OPEN_CLIP, raw, cleaned, mask, expected, strict=True):
        n = int(m.sum())
        assert r[:n].tolist() != e[:n].tolist(), repr(text)  # documented: the README's known difference
        assert c[:n].tolist() == e[:n].tolist(), repr(text)


def crop_margin(size: tuple[int, int], target: int) -> int:
    """The resized long side's margin over the crop (torchvision's Resize rule)."""
    short, long = sorted(size)
    return int(target * long / short) - target


def test_processor_pixels_equal_the_eval_transform_on_real_photos(tiny):
    """PIL backend: open_clip's pixels exactly, unless the crop margin is odd and rounds apart (then shifted one
    pixel, transformers rounding it down, torchvision half to even). Torchvision backend (the default): within
    one 8-bit level, its resize rounding."""
    from transformers import CLIPProcessor

    model, folders = tiny
    preprocess = alip.create_model("ALIP-Tiny")[2]
    size = model.visual.image_size[0]
    pil = CLIPProcessor.from_pretrained(folders["transformers"], backend="pil").image_processor
    fast = CLIPProcessor.from_pretrained(folders["transformers"]).image_processor  # what the pipeline uses
    assert pil.backend == "pil" and fast.backend == "torchvision"
    level = 1 / 255 / min(open_clip.OPENAI_DATASET_STD)
    shifted = 0
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        ours = preprocess(image)
        exact = pil(images=image, return_tensors="pt")["pixel_values"][0]
        assert exact.shape == ours.shape
        margin = crop_margin(image.size, size)
        if round(margin / 2) == margin // 2:
            torch.testing.assert_close(exact, ours, atol=0, rtol=0, msg=name)
            default = fast(images=image, return_tensors="pt")["pixel_values"][0]
            assert float((default - ours).abs().max()) <= level + 1e-6, name
        else:  # one pixel further up/left
            shifted += 1
            axis = 2 if image.size[0] > image.size[1] else 1
            a, b = exact.narrow(axis, 1, size - 1), ours.narrow(axis, 0, size - 1)
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert 0 < shifted < len(PHOTOS)  # both cases are measured


def test_zero_shot_pipeline_runs_offline_and_agrees_with_alip_eval(tiny):
    """transformers' pipeline (its default, torchvision backend) predicts alip.eval's class on every photo; its
    probabilities are alip.eval's within 5e-4 where the crops agree (measured: up to 9e-5; 5e-3 on the photo
    whose crop is one pixel off)."""
    from transformers import pipeline

    from alip.eval.zeroshot import build_classifier

    model, folders = tiny
    classes = ["astronaut", "cat", "coffee cup", "photographer", "galaxy", "rocket"]
    classify = pipeline("zero-shot-image-classification", model=str(folders["transformers"]))
    classifier = build_classifier(model, open_clip.get_tokenizer("ALIP-Tiny"), classes, ["This is a photo of {c}."])
    preprocess = alip.create_model("ALIP-Tiny")[2]
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        with torch.no_grad():
            feats = model.encode_image(preprocess(image)[None], normalize=True)
            probs = (model.logit_scale.exp() * feats @ classifier.T).softmax(-1)[0]
        got = {r["label"]: r["score"] for r in classify(image, candidate_labels=classes)}
        assert max(got, key=got.get) == classes[int(probs.argmax())], name
        margin = crop_margin(image.size, model.visual.image_size[0])
        if round(margin / 2) == margin // 2:  # the same crop: only the resize's 8-bit rounding differs
            np.testing.assert_allclose([got[c] for c in classes], probs.numpy(), atol=5e-4, err_msg=name)


def test_output_folder_rules(tmp_path):
    """A non-empty target is refused; --overwrite replaces an earlier export only; a failed export leaves nothing."""
    model = seeded("ALIP-Tiny")
    ckpt = tmp_path / "m.safetensors"
    alip.export_model(model, ckpt)
    out = tmp_path / "out"
    export_folder(model, "ALIP-Tiny", out, "open_clip", checkpoint=ckpt)
    assert (out / STAMP).is_file()
    with pytest.raises(ExportFolderError, match="not empty.*--overwrite"):
        export_folder(model, "ALIP-Tiny", out, "open_clip", checkpoint=ckpt)
    export_folder(model, "ALIP-Tiny", out, "transformers", checkpoint=ckpt, overwrite=True)  # its own: replaced
    assert (out / "config.json").is_file() and not (out / "open_clip_config.json").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportFolderError, match="1 file.*no export wrote.*notes.txt"):
        export_folder(model, "ALIP-Tiny", out, "transformers", checkpoint=ckpt, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    stranger = tmp_path / "theirs"
    stranger.mkdir()
    (stranger / "data.bin").write_bytes(b"x")
    with pytest.raises(ExportFolderError, match="not empty"):
        export_folder(model, "ALIP-Tiny", stranger, "open_clip", checkpoint=ckpt, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial folders


def test_tool_messages_and_suffix_rules(tmp_path, capsys):
    model = seeded("ALIP-Tiny")
    ckpt = tmp_path / "m.safetensors"
    alip.export_model(model, ckpt)
    with pytest.raises(SystemExit):
        tool([ckpt, tmp_path / "x.pt", "--format", "transformers", "--model", "ALIP-Tiny"])
    assert "writes a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool([ckpt, tmp_path / "folder", "--model", "ALIP-Tiny"])
    assert "a folder needs --format" in capsys.readouterr().err
    assert tool([ckpt, tmp_path / "hf", "--format", "transformers", "--model", "ALIP-Tiny"]) == 0
    out = capsys.readouterr().out
    assert "transformers:" in out and "loaded back, features within" in out and "no run folder" in out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny ALIP run (2 steps, in-training evaluation at step 2) and a real alip.eval of its final
    weights, plus one evaluation of other weights (a random model) that the card must leave out."""
    from test_eval_formats import CIFAR10_CLASSES, write_imagefolder

    from alip.config import load_config
    from alip.eval.__main__ import main as eval_main
    from alip.train.run import train

    tmp = tmp_path_factory.mktemp("run")
    shards = write_test_shards(tmp / "shards", num_records=16, per_shard=8)
    toy = write_imagefolder(tmp / "toy", CIFAR10_CLASSES[:3], per_class=[2, 2, 2])
    run_dir = tmp / "run"
    extra = ["train.max_steps=2", "eval.every_steps=2", f"eval.zeroshot={toy}", "log.every_steps=1000"]
    cfg = load_config(
        ROOT / "configs" / "tiny_cpu.yaml", [f"data.train={shards.meta}", f"output_dir={run_dir}", *extra]
    )
    train(cfg)
    common = ["zeroshot", "--model", "ALIP-Tiny", "--dataset", "toy", "--data", str(toy), "--workers", "0"]
    eval_main([*common, "--checkpoint", str(run_dir / "final.safetensors"), "--output", str(run_dir / "evals/zs.json")])
    eval_main([*common, "--output", str(run_dir / "evals/random.json")])  # no checkpoint: other weights
    return run_dir, shards


@pytest.mark.parametrize("source", ["final.pt", "checkpoints/step-00000002.pt"])
def test_model_card_holds_what_the_run_measured_and_nothing_else(run, tmp_path, capsys, source):
    run_dir, shards = run
    out = tmp_path / "card"
    assert tool([run_dir / source, out, "--format", "transformers"]) == 0  # the model name from the run's config
    printed = capsys.readouterr().out
    assert "1 evaluation(s) of these weights" in printed and "1 of other weights left out" in printed
    card = (out / "README.md").read_text()
    measured = json.loads((run_dir / "evals" / "zs.json").read_text())["datasets"][0]["metrics"]
    assert "protocol `clip_benchmark`" in card and f"{measured['top1']:.2f}" in card
    assert "(1 results file(s) in the run folder were measured on other weights.)" in card
    in_training = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert in_training["step"] == 2 and f"`eval/toy/top1`: {in_training['eval/toy/top1']:.2f}" in card
    assert "step 2" in card and "ALIP-Tiny" in card and "gates on" in card
    assert "16 records in 2 shard(s)" in card and "texts per record: raw, caption" in card
    assert "## Training config (these weights: step 2)" in card and "max_steps: 2" in card


def test_model_card_of_a_checkpoint_without_a_run_claims_no_training(tiny):
    card = (tiny[1]["open_clip"] / "README.md").read_text()
    assert "The checkpoint records no training config." in card and "Not recorded with this checkpoint." in card
    assert "No evaluation of these weights was found (no run folder" in card
    assert "| " not in card  # no results table
