import dataclasses

import pytest

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
from pathalign_ray.pretrain import PretrainConfig


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
        (["scale.zero_stage=3"], "zero_stage must be 0, 1 or 2"),
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


@pytest.mark.parametrize("name", ["configs/pretrain.yaml", "configs/pretrain_64_gpu.yaml"])
def test_shipped_pretrain_configs_are_valid(name):
    assert dataclasses.is_dataclass(load_config(PretrainConfig, name))
