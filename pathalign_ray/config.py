"""Typed job configs: YAML files plus dotted command-line overrides, validated before Ray starts.

Each job declares its config as nested `@config_dataclass` classes. `load_config` reads a YAML
mapping, applies overrides such as `train.lr=1e-5`, and validates the whole tree: unknown keys,
wrong types, values out of a field's bounds (declared on the field: `steps: PositiveInt`,
`Annotated[float, Field(ge=0, lt=1)]`) and broken cross-field rules (checked in `__post_init__`)
fail with an error that names the dotted key. A cross-field rule names its key by starting its
message with it: `ValueError("sample.model: set per round")` inside `align` reads
`align.sample.model: set per round`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")
_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

config_dataclass = _pydantic_dataclass(config=ConfigDict(extra="forbid"))

# Bounds shared by many fields; a field with other bounds spells them out: Annotated[float, Field(ge=0, lt=1)].
PositiveInt = Annotated[int, Field(gt=0)]  # counts, sizes and steps: >= 1
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]  # rates, timeouts; NaN is refused too
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # a probability or a share, both ends included
FractionBelowOne = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): a held-out share, a decay


def _check_location(value: str) -> str:
    """A storage location's scheme, bucket and credentials, checked when the config loads (pathalign_ray.storage)."""
    from pathalign_ray.storage import StorageError, check_bucket  # heavy: storage imports pyarrow

    try:
        check_bucket(value)
    except StorageError as error:
        raise ValueError(str(error)) from None
    return value


# A folder or file a job reads or writes: a plain path, file://, s3://bucket/key or gs://bucket/key. A URI's
# scheme, bucket and credentials are checked as the config loads, so a wrong one fails before Ray starts.
Location = Annotated[str, AfterValidator(_check_location)]


class ConfigError(ValueError):
    """A config file or override that does not fit its job's config class."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or its defaults when path is None) and `key.sub=value` overrides."""
    data = _read_yaml(path) if path is not None else {}
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


def save_config(config: Any, path: str | Path) -> str | Path:
    """Write a config as YAML to a path or a URI (pathalign_ray.storage); return where it went."""
    from pathalign_ray.storage import write_bytes  # heavy: storage imports pyarrow

    write_bytes(path, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode())
    return path


def parse_job_args(cls: type[T], argv: Sequence[str] | None, default_config: str, description: str) -> T:
    """The command line every job shares: `--config PATH` then `key.sub=value` overrides.

    A top-level key may also be given as a flag, `--key VALUE` or `--key=VALUE`: the override
    key=VALUE. A list or tuple key takes the values up to the next flag or key=value (`--models A B`:
    models=[A, B]). String values are quoted, so a path is never read as a number, a bool or a list.
    """
    epilog = "Any top-level key is also a flag: --key VALUE (a list: --key A B ...)."
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config field")
    try:
        rest, flag_overrides = _flag_overrides(cls, sys.argv[1:] if argv is None else list(argv))
    except ConfigError as error:
        parser.error(str(error))
    args = parser.parse_intermixed_args(rest)
    try:
        return load_config(cls, args.config, [*args.overrides, *flag_overrides])
    except ConfigError as error:
        parser.error(str(error))


def refuse_overwritten(config: Any, keys: Sequence[str], why: str) -> None:
    """Refuse a value given for a nested field that the job sets itself and would silently replace.

    keys are dotted from `config` ("sample.model"); a field holding its default passes, and a section
    that is None (an optional one left out) is skipped. The error names the key and says `why`.
    """
    for key in keys:
        *path, name = key.split(".")
        section = config
        for part in path:
            section = getattr(section, part) if section is not None else None
        if section is None:
            continue
        (spec,) = [f for f in dataclasses.fields(section) if f.name == name]
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        if getattr(section, name) != default:
            raise ValueError(f"{key}: {why}; leave it out of the config (got {getattr(section, name)!r})")


def _read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or from a URI (s3://, gs://, file://: a config the Tune search wrote on a bucket)."""
    if "://" in str(path):
        from pathalign_ray.storage import StorageError, read_bytes

        try:
            text = read_bytes(path).decode()
        except (FileNotFoundError, IsADirectoryError):
            raise ConfigError(f"config file not found: {path}") from None
        except StorageError as error:
            raise ConfigError(f"config file: {error}") from None
    elif not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    else:
        text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
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


def _flag_overrides(cls: type, argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `--key VALUE...` flags naming top-level fields of cls off argv: (the rest, key=value overrides)."""
    hints = typing.get_type_hints(cls)
    rest, overrides = [], []
    position = 0
    while position < len(argv):
        arg = argv[position]
        position += 1
        name, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in hints:
            rest.append(arg)
            continue
        many = typing.get_origin(hints[name]) in (tuple, list)
        if eq:
            values = [value]
        elif many:  # up to the next flag or key=value (a path holding "=" goes in key=[...] instead)
            values = []
            while position < len(argv) and not argv[position].startswith("--") and "=" not in argv[position]:
                values.append(argv[position])
                position += 1
        elif position < len(argv) and not argv[position].startswith("--"):
            values = [argv[position]]
            position += 1
        else:
            raise ConfigError(f"--{name} needs a value")
        element = typing.get_args(hints[name])[0] if many else hints[name]
        values = [_quote(v) for v in values] if element is str else values
        overrides.append(f"{name}=[{', '.join(values)}]" if many else f"{name}={values[0]}")
    return rest, overrides


def _quote(text: str) -> str:
    """A YAML double-quoted scalar, so a path is never read as a number, a bool or a list."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    location = [str(part) for part in error["loc"]]
    message = error["msg"]
    if error["type"] == "unexpected_keyword_argument":
        message = "unknown key"
    elif error["type"] == "missing_argument":
        message = "required key is missing"
    elif error["type"] == "value_error":  # a __post_init__ rule; "sub.key: ..." names the key below this section
        message = message.removeprefix("Value error, ")
        key, sep, rest = message.partition(": ")
        if sep and _DOTTED_KEY.fullmatch(key):
            location, message = [*location, key], rest
    return f"{'.'.join(location) or '(top level)'}: {message}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
