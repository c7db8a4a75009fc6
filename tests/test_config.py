import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml
from test_demo import CONFIG_INPUTS  # each file in configs/ and its config class

from pathalign_ray.config import (
    ConfigError,
    config_to_dict,
    field_type,
    get_dotted,
    load_config,
    parse_job_args,
    save_config,
    set_dotted,
)
from pathalign_ray.generator.pretrain import PretrainConfig


def test_defaults_load_without_a_file():
    config = load_config(PretrainConfig)
    assert config.scale.zero_stage == 2 and config.model.sample_size == 32


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\nmodel:\n  block_out_channels: [16, 32]\n")
    config = load_config(PretrainConfig, path, ["train.lr=1e-5", "scale.precision=bf16", "train.steps=7"])
    assert config.train.lr == pytest.approx(1e-5)
    assert config.scale.precision == "bf16"
    assert config.train.steps == 7
    assert config.model.block_out_channels == (16, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.lr=abc"], "train.lr: Input should be a valid number"),
        (["scale.precision=fp16"], "scale.precision"),
        (["scale.zero_stage=3"], "scale.zero_stage: Input should be less than or equal to 2"),
        (["train.lr=0"], "train.lr: Input should be greater than 0"),
        (["train.ema_decay=1"], "train.ema_decay: Input should be less than 1"),
        (["model.beta_schedule=cosine"], "model.beta_schedule: Input should be 'linear', 'scaled_linear' or"),
        (["model.sample_size=30"], "must be divisible"),
        (["train.lr"], "must look like key.sub=value"),
        (["train.steps.x=1"], "train.steps: Input should be a valid integer"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(PretrainConfig, None, overrides)


def test_dotted_keys_read_write_and_name_fields():
    data = {"train": {"lr": 0.1}}
    set_dotted(data, "train.lr", 0.2)
    set_dotted(data, "model.sample_size", 16)  # a missing section is made
    assert get_dotted(data, "train.lr") == 0.2 and data["model"] == {"sample_size": 16}
    with pytest.raises(ConfigError, match=r"train\.lr is not a section"):
        set_dotted(data, "train.lr.x", 1)
    assert field_type(PretrainConfig, "train.lr") is float
    assert field_type(PretrainConfig, "train.learning_rate") is None
    assert field_type(PretrainConfig, "train.lr.x") is None


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(PretrainConfig, bad)


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(PretrainConfig, None, ["train.steps=11", "model.block_out_channels=[16,32]"])
    path = save_config(config, tmp_path / "saved.yaml")
    assert load_config(PretrainConfig, path) == config
    assert config_to_dict(config)["model"]["block_out_channels"] == [16, 32]


def test_job_command_line_exits_with_the_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(PretrainConfig, ["train.nope=1"], "configs/pretrain.yaml", "test")
    assert exit_info.value.code == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def _config_class(name: str) -> type:
    module, cls = CONFIG_INPUTS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def test_every_file_in_configs_loads(tmp_path):
    names = sorted(p.name for p in Path("configs").glob("*.yaml"))
    assert sorted(CONFIG_INPUTS) == [name for name in names if name != "serve_reward_app.yaml"]
    for name in CONFIG_INPUTS:
        assert dataclasses.is_dataclass(load_config(_config_class(name), f"configs/{name}")), name
    app = yaml.safe_load(Path("configs/serve_reward_app.yaml").read_text())["applications"][0]  # a Serve config file
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(app["args"]))
    assert load_config(_config_class("serve_reward.yaml"), tmp_path / "args.yaml").model == app["args"]["model"]


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("pretrain.yaml", "scale.num_workers=0", "scale.num_workers: Input should be greater than 0"),
        ("finetune.yaml", "objective.ratio_clip=1.5", "objective.ratio_clip: Input should be less than 1"),
        ("tune.yaml", "probe.n_per_class=0", "probe.n_per_class: Input should be greater than 0"),
        ("tune.yaml", "finetune.train.warmup_steps=-1", "finetune.train.warmup_steps: Input should be greater than or equal to 0"),
        ("evaluate.yaml", "encoder.channels=[16,0]", "encoder.channels.1: Input should be greater than 0"),
        ("align.yaml", "simulate.flip_rate=2", "simulate.flip_rate: Input should be less than or equal to 1"),
        ("align.yaml", "rounds=1000", "rounds: Input should be less than or equal to 999"),
        ("demo.yaml", "align.reward.data.test_fraction=1", "align.reward.data.test_fraction: Input should be less than 1"),
        ("demo.yaml", "evaluate.confidence=1", "evaluate.confidence: Input should be less than 1"),
        ("demo.yaml", "align.serve.autoscaling.min_replicas=-1", "align.serve.autoscaling.min_replicas: Input should be"),
        ("label.yaml", "experts.ana=short", "experts.ana: String should have at least 16 characters"),
        ("serve_reward.yaml", "route_prefix=score", "route_prefix: String should match pattern '^/'"),
    ],
)  # fmt: skip
def test_an_out_of_range_value_in_a_nested_section_names_its_dotted_key(name, override, message):
    with pytest.raises(ConfigError, match=re.escape(f"configs/{name}: {message}")):
        load_config(_config_class(name), f"configs/{name}", [override])


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("align.yaml", "sample.model=runs/x/model", "sample.model: set per round by the loop"),
        ("align.yaml", "simulate.round=3", "simulate.round: set per round by the loop"),
        ("align.yaml", "reward.run_dir=runs/x", "reward.run_dir: set from run_dir"),
        ("align.yaml", "serve.model=runs/x/reward", "serve.model: set per round by the loop"),
        ("demo.yaml", "align.sample.out_dir=runs/x", "align.sample.out_dir: set per round by the loop"),
        ("demo.yaml", "align.run_dir=runs/x", "align.run_dir: set from run_dir"),
        ("demo.yaml", "evaluate.models=[runs/x/model]", "evaluate.models: set from run_dir"),
        ("demo.yaml", "dataset.out_dir=runs/x/data", "dataset.out_dir: set from run_dir"),
        ("demo_pretrain.yaml", "pretrain.data.dataset=runs/x/data", "pretrain.data.dataset: set from run_dir"),
    ],
)  # fmt: skip
def test_a_field_the_job_sets_itself_is_refused_with_its_key(name, override, message):
    with pytest.raises(ConfigError, match=re.escape(f"configs/{name}: {message}")):
        load_config(_config_class(name), f"configs/{name}", [override])


def test_cross_field_rules_name_their_key():
    from pathalign_ray.reward.serve import ServeRewardConfig

    with pytest.raises(ConfigError, match=r"ServeRewardConfig: autoscaling\.min_replicas: 3 is above max_replicas 2"):
        load_config(ServeRewardConfig, None, ["autoscaling.min_replicas=3", "autoscaling.max_replicas=2"])
    with pytest.raises(ConfigError, match=r"PretrainConfig: model: sample_size 30 must be divisible"):
        load_config(PretrainConfig, None, ["model.sample_size=30"])


def test_top_level_keys_are_also_flags(capsys):
    from pathalign_ray.evaluation.evaluate import EvaluateConfig
    from pathalign_ray.generator.sampling import SampleConfig

    # a list takes values up to the next flag or key=value; paths stay strings, whatever they look like
    argv = ["--models", "runs/a/model", "1e3", "prdc_k=3", "--real", "true", "--config", "configs/evaluate.yaml"]
    config = parse_job_args(EvaluateConfig, [*argv, "seed=1"], "configs/evaluate.yaml", "test")
    assert (config.models, config.real, config.prdc_k, config.seed) == (("runs/a/model", "1e3"), "true", 3, 1)
    config = parse_job_args(EvaluateConfig, ["--models=a", "--real=b=c"], "configs/evaluate.yaml", "test")
    assert (config.models, config.real) == (("a",), "b=c")
    argv = ["--select", "uncertain", "--k", "4", "reward_model=r"]
    config = parse_job_args(SampleConfig, argv, "configs/sample.yaml", "test")
    assert (config.select, config.k, config.reward_model) == ("uncertain", 4, "r")
    for argv, error in [(["--k"], "--k needs a value"), (["--nope", "1"], "unrecognized arguments: --nope")]:
        with pytest.raises(SystemExit):
            parse_job_args(SampleConfig, argv, "configs/sample.yaml", "test")
        assert error in capsys.readouterr().err
