"""The trainer and its checkpoints against a careless or hostile user (issue 17's sweep, kept as tests).

Every case here once trained wrongly without a word, lost a checkpoint, or printed a traceback for a
mistake of the user's. Each now ends in a clear refusal, or is applied and said out loud. Runs are
the tiny config (configs/tiny_cpu.yaml) for a few steps on the 24-record test shards.
"""

import errno
import json
import os
import re
import shutil
import socket
import types
import typing

import open_clip
import pytest
import torch
import yaml
from test_train import TINY, overrides, read_losses

import alip
from alip.cli import UserError
from alip.config import Config, ConfigError, load_config, to_dict
from alip.files import FolderLock, FolderLockedError
from alip.model import MODEL_CONFIG_DIR
from alip.train import checkpoint as ckpt
from alip.train.__main__ import main as train_main
from alip.train.optim import build_optimizer, build_scheduler
from alip.train.resume import check_resume, config_changes
from alip.train.run import train


@pytest.fixture(scope="module", autouse=True)
def _one_thread_then_restore(one_thread):
    yield
    torch.use_deterministic_algorithms(False)  # the tiny config switches it on process-wide


def config(shards, out, *extra):
    """The tiny config on the test shards, a checkpoint every 2 steps, no final export."""
    base = overrides(shards.meta, out, "checkpoint.every_steps=2", "checkpoint.export=false")
    return load_config(TINY, [*base, *extra])


def run(shards, out, *extra, resume=None):
    return train(config(shards, out, *extra), resume)


def snapshot(folder):
    """Every file under `folder` with its bytes (the lock's holder record aside): "nothing was touched"."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FolderLock.NAME]
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def cli(capsys, *argv):
    """`python -m alip.train` in this process: (exit status, its error line). Asserts that the error is
    one line and that no traceback was printed (log lines before it are fine)."""
    status = train_main([str(TINY), *argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return status, errors[0]


# ----- item 2: every numeric option has a valid range ------------------------------------------------

OUT_OF_RANGE = {
    "data.image_size": 0,
    "data.random_area": "[0.0, 1.0]",
    "data.random_aspect_ratio": "[-1.0, 1.0]",
    "data.flip_prob": 1.5,
    "data.crop_attempts": 0,
    "data.shuffle_buffer": 0,
    "data.num_threads": 0,
    "data.num_workers": -1,
    "model.text_buckets": 0,
    "model.init_logit_scale": 5.0,  # past ln 100, where the trainer clamps it
    "model.init_logit_bias": ".inf",
    "loss.momentum": 1.0,
    "loss.power": 0,
    "optim.lr": 0,
    "optim.weight_decay": -0.1,
    "optim.betas": "[0.9, 1.0]",
    "optim.eps": 0,
    "optim.grad_clip": -1,  # trained by gradient ascent when accepted
    "schedule.warmup": 1.0,
    "schedule.cycle_beta1": "[0.85, 1.5]",
    "schedule.div_factor": 0,
    "schedule.final_div_factor": -1,
    "schedule.final_lr_fraction": 1.5,
    "train.batch_size": 0,
    "train.accum_steps": 0,
    "train.epochs": 0,
    "train.max_steps": 0,
    "train.scaler_growth_interval": 0,
    "train.seed": -1,
    "train.max_consecutive_skips": 0,
    "checkpoint.every_steps": -5,
    "checkpoint.every_minutes": -1,
    "checkpoint.keep_last": 0,
    "log.every_steps": 0,
    "log.histogram_every_steps": 0,
    "eval.every_steps": 0,
    "eval.max_samples": 0,
}


def numeric_fields(cls=Config, prefix=""):
    """Dotted names of every int/float field (plain, optional or in a tuple) of the config schema."""
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
            yield from numeric_fields(hint, f"{prefix}{name}.")
        elif {int, float} & set(typing.get_args(hint) or (hint,)):
            yield f"{prefix}{name}"


def test_the_range_table_of_this_test_covers_every_numeric_field():
    assert sorted(numeric_fields()) == sorted(OUT_OF_RANGE)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_an_out_of_range_value_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"{key} must be"):
        load_config(TINY, ["data.train=x", f"{key}={OUT_OF_RANGE[key]}"])


@pytest.mark.parametrize(
    "override",
    ["optim.lr=.nan", "optim.grad_clip=.inf", "train.epochs=.inf", "data.random_area=[0.9, 0.5]",
     "data.random_aspect_ratio=[1.25, 0.8]", "schedule.cycle_beta1=[0.95, 0.85]"],
)  # fmt: skip
def test_non_finite_and_unordered_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(TINY, ["data.train=x", override])


def test_null_stays_allowed_where_it_means_off():
    nulls = ["optim.grad_clip=null", "checkpoint.every_steps=null", "checkpoint.every_minutes=null"]
    cfg = load_config(TINY, ["data.train=x", *nulls, "eval.max_samples=null", "train.max_steps=null"])
    assert cfg.optim.grad_clip is None and cfg.checkpoint.every_steps is None


# ----- items 3 and 17: a changed config on resume is applied out loud, or refused before anything is written


def test_resume_with_a_changed_lr_follows_the_new_schedule_and_says_so(shards, tmp_path, caplog):
    onecycle = ["schedule.name=onecycle", "schedule.warmup=0.5", "train.max_steps=4"]
    run(shards, tmp_path / "a", *onecycle)
    with caplog.at_level("WARNING", logger="alip.train"):
        trainer = run(shards, tmp_path / "a", *onecycle, "optim.lr=5e-4", resume="latest")
    assert "optim.lr 0.001 -> 0.0005" in caplog.text

    # resumed at step 4 of 4: the lr and beta1 must be a fresh schedule's with the new lr at that step
    cfg = config(shards, tmp_path / "fresh", *onecycle, "optim.lr=5e-4")
    model, _, _ = alip.create_model(cfg.model.name)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    got = [(g["lr"], g["betas"], g["initial_lr"]) for g in trainer.optimizer.param_groups]
    assert got == [(g["lr"], g["betas"], g["initial_lr"]) for g in optimizer.param_groups]
    assert trainer.scheduler.last_epoch == 4

    # what runs is what is recorded: config.yaml and the checkpoints say 5e-4
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["optim"]["lr"] == 5e-4


def test_resume_continues_from_the_checkpoint_and_applies_the_new_lr_from_then_on(shards, tmp_path, caplog):
    run(shards, tmp_path / "a", "train.max_steps=2")
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer = run(shards, tmp_path / "a", "train.max_steps=3", "optim.lr=5e-4", resume="latest")
    assert "initialized randomly" not in caplog.text  # the checkpoint's weights are loaded
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [5e-4, 5e-4]  # constant schedule
    assert ckpt.load_state(tmp_path / "a" / "checkpoints" / "step-00000003.pt")["config"]["optim"]["lr"] == 5e-4
    assert [r["step"] for r in read_losses(tmp_path / "a")] == [1, 2, 3]


def test_a_change_that_cannot_apply_is_refused_before_config_yaml_is_written(shards, tmp_path):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=2")
    before = snapshot(out)
    with pytest.raises(UserError) as err:
        run(shards, out, "train.max_steps=4", "train.batch_size=16", "loss.power=3.0", resume="latest")
    message = str(err.value)
    assert "train.batch_size 8 -> 16" in message and "loss.power 2.0 -> 3.0" in message
    assert "train.max_steps" not in message  # applicable: not part of the refusal
    assert snapshot(out) == before  # config.yaml included


def test_switching_to_fp16_on_resume_starts_a_loss_scaler(shards, tmp_path):
    run(shards, tmp_path / "a", "train.max_steps=2")  # fp32: the checkpoint has no scaler state
    trainer = run(shards, tmp_path / "a", "train.max_steps=3", "train.precision=fp16", resume="latest")
    assert trainer.scaler.is_enabled() and read_losses(tmp_path / "a")[-1]["step"] == 3


def test_another_world_size_is_refused_and_a_since_added_option_counts_as_its_default():
    cfg = load_config(TINY, ["data.train=x"])
    saved = to_dict(cfg)
    del saved["model"]["text_trim"]  # a checkpoint written before the option existed
    assert config_changes(saved, cfg) == []
    with pytest.raises(UserError, match="written by 2 ranks, this run has 1"):
        check_resume({"world_size": 2, "config": saved}, cfg, world_size=1)


# ----- item 4: checkpoints that exist are never ignored, and never overwritten ------------------------


def test_damaged_manifests_next_to_intact_checkpoints_are_rebuilt_not_ignored(shards, tmp_path, caplog):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=4")
    checkpoints = sorted((out / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["step-00000002.pt", "step-00000004.pt"]
    for path in checkpoints:
        path.with_suffix(".json").write_text("{not json")
    pt_bytes = {p.name: p.read_bytes() for p in checkpoints}
    with caplog.at_level("INFO", logger="alip.train"):
        trainer = run(shards, out, "train.max_steps=5", resume="latest")
    assert "rebuilt the manifest" in caplog.text and "resumed from" in caplog.text
    assert [r["step"] for r in read_losses(out)] == [1, 2, 3, 4, 5]  # resumed at 4, not from scratch
    assert trainer.state.step == 5
    assert all(
        (out / "checkpoints" / name).read_bytes() == data
        for name, data in pt_bytes.items()
        if name != "step-00000002.pt"
    )
    assert ckpt.is_complete(out / "checkpoints" / "step-00000004.pt")


def test_checkpoints_that_are_all_unusable_are_a_refusal_not_a_fresh_start(shards, tmp_path):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=4")
    for path in (out / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(out)
    with pytest.raises(UserError, match="2 checkpoints found, none usable: step-00000004.pt: .*, step-00000002.pt: "):
        run(shards, out, "train.max_steps=6", resume="latest")
    assert snapshot(out) == before


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(shards, tmp_path):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=2")
    before = snapshot(out)
    with pytest.raises(UserError, match="--resume latest"):
        run(shards, out, "train.max_steps=2")
    assert snapshot(out) == before


def test_resuming_an_older_checkpoint_refuses_to_overwrite_the_newer_ones(shards, tmp_path):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=4")
    before = snapshot(out)
    with pytest.raises(UserError, match="step-00000004.pt"):
        run(shards, out, "train.max_steps=4", resume=str(out / "checkpoints" / "step-00000002.pt"))
    assert snapshot(out) == before


def test_an_unusable_newest_checkpoint_is_set_aside_not_overwritten(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint({"step": step}, tmp_path, step)
    newest = tmp_path / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    damaged = newest.read_bytes()
    start = ckpt.resolve_resume("latest", tmp_path)
    assert start.name == "step-00000001.pt"
    unusable = ckpt.claim_directory(tmp_path, start)
    assert newest.read_bytes() == damaged  # claiming only decides; nothing moves before the resume is accepted
    ckpt.set_aside(unusable)
    assert not newest.exists() and (tmp_path / "step-00000002.pt.unusable").read_bytes() == damaged


def test_a_refused_resume_does_not_set_aside_a_damaged_newer_checkpoint(shards, tmp_path):
    out = tmp_path / "a"
    run(shards, out, "train.max_steps=4")
    newest = out / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged: latest is now step 2, with step 4 to set aside
    before = snapshot(out)
    with pytest.raises(UserError, match="loss.power 2.0 -> 3.0"):
        run(shards, out, "train.max_steps=4", "loss.power=3.0", resume="latest")
    assert snapshot(out) == before  # the damaged file is still where the user left it
    run(shards, out, "train.max_steps=4", resume="latest")  # accepted: now it is set aside
    assert (out / "checkpoints" / "step-00000004.pt.unusable").exists()


# ----- item 7: the global RNG stream is exact across a mid-epoch resume --------------------------------


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    """ALIP-Tiny with patch dropout: its masks draw from torch's global generator every step."""
    folder = tmp_path_factory.mktemp("model_configs")
    spec = json.loads((MODEL_CONFIG_DIR / "ALIP-Tiny.json").read_text())
    spec["vision_cfg"]["patch_dropout"] = 0.5
    (folder / "ALIP-Tiny-PatchDropout.json").write_text(json.dumps(spec))
    open_clip.add_model_config(folder)
    return "ALIP-Tiny-PatchDropout"


def test_mid_epoch_resume_of_a_dropout_model_is_bitwise_identical(shards, tmp_path, dropout_model):
    model = f"model.name={dropout_model}"
    whole = run(shards, tmp_path / "whole", model, "train.max_steps=4")
    run(shards, tmp_path / "part", model, "train.max_steps=2")  # 3 steps per epoch: stops mid-epoch
    resumed = run(shards, tmp_path / "part", model, "train.max_steps=4", resume="latest")
    assert read_losses(tmp_path / "part") == read_losses(tmp_path / "whole")
    for name, p in whole.clip.state_dict().items():
        assert torch.equal(resumed.clip.state_dict()[name], p), name


# ----- item 10: one trainer per output folder -----------------------------------------------------------


def test_a_second_trainer_on_a_held_folder_is_refused_with_the_holders_pid(shards, tmp_path):
    out = tmp_path / "a"
    with FolderLock(out, "alip.train"):
        with pytest.raises(FolderLockedError, match=re.escape(f"PID {os.getpid()} on host {socket.gethostname()}")):
            run(shards, out, "train.max_steps=1")
    assert not (out / "checkpoints").exists()
    with pytest.raises(UserError):  # a refused run releases the lock too
        run(shards, out, "train.max_steps=1", "model.name=NoSuchModel")
    with FolderLock(out, "test"):
        pass


# ----- item 11: a full disk during a checkpoint -----------------------------------------------------------


def _fill_the_disk_during(monkeypatch, error):
    """torch.save writes part of the file, then fails as it does on a full disk."""
    real_save = torch.save

    def save(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        if error is None:
            real_save(obj, "/dev/full")  # the real error: "[enforce fail at inline_container.cc] unexpected pos"
        raise error

    monkeypatch.setattr(ckpt.torch, "save", save)


@pytest.mark.parametrize("kind", ["pytorch_writer", "oserror"])
def test_a_full_disk_says_so_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1)
    if kind == "pytorch_writer":
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full")
        full = types.SimpleNamespace(total=10**9, used=10**9, free=0)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: full)
        _fill_the_disk_during(monkeypatch, None)
    else:
        _fill_the_disk_during(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError) as err:
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(10)}, tmp_path, 2)
    assert str(err.value).startswith(f"no space left on device: {tmp_path / 'step-00000002.pt'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.json", "step-00000001.pt"]
    assert ckpt.find_latest(tmp_path).name == "step-00000001.pt"


# ----- item 15: --resume with a file that is not a training checkpoint ------------------------------------


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    """A finished run's own exports: final.pt (weights only) and final.safetensors."""
    out = tmp_path_factory.mktemp("exported")
    train(config(shards, out, "train.max_steps=1", "checkpoint.export=true"))
    return out


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def wrong_file(kind, exported, folder):
    if kind in ("final.pt", "final.safetensors"):
        return exported / kind
    path = folder / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":
        torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload()}, path)
    return path


RESUME_MESSAGES = {
    "final.pt": ["is a weights file", "model.pretrained="],
    "final.safetensors": ["is a weights file", "model.pretrained="],
    "empty": ["is empty"],
    "random": ["is not a PyTorch checkpoint"],
    "pickle": ["refused", "could run code"],
}


@pytest.mark.parametrize("kind", sorted(RESUME_MESSAGES))
def test_resume_from_the_wrong_kind_of_file_says_what_it_is(shards, tmp_path, exported, kind, capsys):
    path = wrong_file(kind, exported, tmp_path)
    argv = [*overrides(shards.meta, tmp_path / "run"), "--resume", str(path)]
    status, err = cli(capsys, *argv)
    assert status == 2 and all(part in err for part in RESUME_MESSAGES[kind]), err
    assert "KeyError" not in err and "weights_only=False" not in err
    if kind == "random":
        assert "pickle" not in err


@pytest.mark.parametrize("kind", ["empty", "random", "pickle"])
def test_load_checkpoint_names_what_is_wrong_with_the_file(tmp_path, exported, kind):
    model, _, _ = alip.create_model("ALIP-Tiny")
    with pytest.raises(alip.CheckpointError) as err:
        alip.load_checkpoint(model, wrong_file(kind, exported, tmp_path))
    assert all(part in str(err.value) for part in RESUME_MESSAGES[kind])
    assert "weights_only=False" not in str(err.value)


def test_load_checkpoint_wraps_a_damaged_safetensors_file(tmp_path, exported):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((exported / "final.safetensors").read_bytes()[:200])
    model, _, _ = alip.create_model("ALIP-Tiny")
    with pytest.raises(alip.CheckpointError, match="cut.safetensors"):
        alip.load_checkpoint(model, path)


# ----- item 14: user errors of the train command are one line, exit 2 ------------------------------------


def _corrupt_shards(shards, folder):
    copy = folder / "corrupt"
    shutil.copytree(shards.meta.parent, copy)
    rec = sorted(copy.glob("*.rec"))[0]
    data = bytearray(rec.read_bytes())
    data[0:4] = b"\0\0\0\0"  # the first record's magic
    rec.write_bytes(bytes(data))
    return copy / shards.meta.name


def _a_file(folder):
    (folder / "a_file").write_text("not a folder")
    return folder / "a_file"


CLI_CASES = {
    "missing data.train": lambda shards, tmp: [f"data.train={tmp / 'nowhere.json'}"],
    "preflight failure": lambda shards, tmp: [f"data.train={_corrupt_shards(shards, tmp)}"],
    "unknown model": lambda shards, tmp: [f"data.train={shards.meta}", "model.name=NoSuchModel"],
    "output_dir is a file": lambda shards, tmp: [f"data.train={shards.meta}", f"output_dir={_a_file(tmp)}"],
    "bad value": lambda shards, tmp: [f"data.train={shards.meta}", "optim.grad_clip=-1"],
    "refused resume": lambda shards, tmp: [f"data.train={shards.meta}", "--resume", str(tmp / "nope.pt")],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_user_errors_are_one_line_and_exit_2(shards, tmp_path, capsys, case):
    argv = [f"output_dir={tmp_path / 'run'}", "train.max_steps=1", *CLI_CASES[case](shards, tmp_path)]
    status, _ = cli(capsys, *argv)
    assert status == 2


def test_debug_shows_the_traceback(shards, tmp_path, monkeypatch):
    with pytest.raises(ConfigError):
        train_main([str(TINY), f"data.train={shards.meta}", "optim.grad_clip=-1", "--debug"])
    monkeypatch.setenv("ALIP_DEBUG", "1")
    with pytest.raises(ConfigError):
        train_main([str(TINY), f"data.train={shards.meta}", "optim.grad_clip=-1"])


def test_a_checkpoint_from_before_an_option_existed_counts_as_the_old_behaviour():
    from alip.config import Config, to_dict
    from alip.train.resume import config_changes

    saved = to_dict(Config())
    del saved["data"]["crop_attempts"], saved["data"]["last_batch"]  # written before the two options
    assert config_changes(saved, Config()) == ["data.crop_attempts 10 -> 100", 'data.last_batch "pad" -> "drop"']
    cfg = Config()
    cfg.data.crop_attempts, cfg.data.last_batch = 10, "pad"  # what the old run did: resumes unchanged
    assert config_changes(saved, cfg) == []
