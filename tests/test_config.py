"""alip.config: YAML + dotted overrides, type checks, impossible combinations, round trip."""

import pytest

from alip.config import Config, ConfigError, from_dict, load_config, save_config, to_dict, validate


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: shards/train.meta.json\noptim:\n  lr: 5e-4\ntrain:\n  batch_size: 64\n")
    assert load_config(path).optim.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string; still a float here
    cfg = load_config(
        path, ["optim.lr=2e-4", "optim.betas=[0.9, 0.95]", "optim.grad_clip=null", "loss.pair_gate=paper"]
    )
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip is None
    assert cfg.train.batch_size == 64 and cfg.loss.pair_gate == "paper"
    assert cfg.optim.weight_decay == 0.2 and cfg.schedule.name == "onecycle"  # untouched defaults
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1e-3", "unknown config key optim.lrr; did you mean optim.lr?"),
        ("optimizer.lr=1e-3", "unknown config key optimizer; did you mean optim?"),
        ("train.batch_size=abc", "train.batch_size must be an integer, got 'abc'"),
        ("train.batch_size=1.5", "train.batch_size must be an integer"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("loss.use_gates=maybe", "loss.use_gates must be true or false"),
        ("loss.pair_gate=both", "loss.pair_gate must be one of ['official', 'paper']"),
        ("optim.betas=0.9", "optim.betas must be a list of 2 values"),
        ("train.precision=fp8", "train.precision must be one of"),
        ("optim", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x", override])
    assert message in str(err.value)


def test_impossible_combinations_are_refused():
    with pytest.raises(ConfigError, match="use_gates=true needs loss.use_caption=true"):
        load_config(None, ["data.train=x", "loss.use_caption=false"])
    with pytest.raises(ConfigError, match="schedule.warmup"):
        load_config(None, ["data.train=x", "schedule.warmup=10"])
    with pytest.raises(ConfigError, match="data.train must name"):
        load_config(None, [])
    cfg = load_config(None, ["data.train=x", "train.batch_size=512", "train.accum_steps=2"])
    shape = validate(cfg, world_size=8)
    assert (shape.per_rank_batch, shape.micro_batch) == (64, 32)
    with pytest.raises(ConfigError, match="train.batch_size=512 does not divide across 3 ranks x 2 accumulation"):
        validate(cfg, world_size=3)


def test_clip_baseline_is_expressible():
    cfg = load_config(None, ["data.train=x", "loss.use_caption=false", "loss.use_gates=false"])
    assert not cfg.loss.use_caption


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["data.train=x", "optim.betas=[0.9, 0.95]", "eval.max_samples=null"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and isinstance(again, Config)
    assert from_dict(to_dict(cfg)) == cfg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_bare_off_in_yaml_means_the_option_value_off(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x}\nmodel: {text_trim: off}\n")  # PyYAML reads `off` as False
    assert load_config(path).model.text_trim == "off"
    assert load_config(None, ["data.train=x", "model.text_trim=off"]).model.text_trim == "off"
    with pytest.raises(ConfigError, match="model.text_trim must be one of"):
        load_config(None, ["data.train=x", "model.text_trim=on"])
