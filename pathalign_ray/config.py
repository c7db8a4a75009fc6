"""Typed job configs: YAML files plus dotted command-line overrides, validated before Ray starts.

Each job declares its config as nested `@config_dataclass` classes. `load_config` reads a YAML
mapping, applies overrides such as `train.lr=1e-5`, and validates the whole tree: unknown keys,
wrong types and broken cross-field rules (checked in `__post_init__`) fail with an error that
names the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

config_dataclass = _pydantic_dataclass(config=ConfigDict(extra="forbid"))


class ConfigError(ValueError):
    """A config file or override that does not fit its job's config class."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or its defaults when path is None) and `key.sub=value` overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    source = str(path) if path is not None else cls.__name__
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in error.errors())) from None


def config_to_dict(config: Any) -> dict:
    """Plain dict of a config, tuples as lists, ready for YAML or JSON."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def parse_job_args(cls: type[T], argv: Sequence[str] | None, default_config: str, description: str) -> T:
    """The command line every job shares: `--config PATH` then `key.sub=value` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config field")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def get_dotted(data: dict, key: str) -> Any:
    """The value at a dotted key ("train.lr") of a nested config dict."""
    node = data
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set the value at a dotted key of a nested config dict, making missing sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def field_type(cls: type, key: str) -> Any:
    """The annotated type of a config class's field at a dotted key, or None where it has no such field."""
    node = cls
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    return node


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        value = raw_value
    try:
        set_dotted(data, key, value)
    except ConfigError as error:
        raise ConfigError(f"override {override!r}: {error}") from None


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "unexpected_keyword_argument":
        message = "unknown key"
    elif error["type"] == "missing_argument":
        message = "required key is missing"
    return f"{location}: {message.removeprefix('Value error, ')}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value

