"""YAML plus `a.b=value` overrides merged in one place, validated into a `Config`; errors as one line each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.root import Config
from pipeline.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (`[x, y]` is a list, `0.1` a float)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r}: expected key=value with a dotted key, e.g. algo.kl.coef=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_one_line(e)})") from None
    return [p.strip() for p in parts], value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides to a plain dict from YAML; returns a new dict."""
    merged = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(merged, parts, value, source=f"override {text!r}")
    return merged


def set_dotted(data: dict[str, Any], parts: list[str], value: Any, *, source: str) -> None:
    """data[a][b][c] = value for parts ["a", "b", "c"], in place, making the sections on the way; ConfigError
    (prefixed with `source`) when a prefix already holds a value, not a section."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the schema defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(Path(path))
    return validate(merge_overrides(data, list(overrides)), source=str(path) if path else "defaults")


def validate(data: dict[str, Any], *, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_validation_error(e)}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def describe_validation_error(e: ValidationError) -> str:
    """One line: the dotted key, the bad value and what is allowed (the first error, plus how many more)."""
    errors = e.errors()
    first = errors[0]
    key = dotted_key(first["loc"])
    if first["type"] == "extra_forbidden":
        text = f"{key}: unknown key; allowed here: {', '.join(_allowed_keys(first['loc']))}"
    elif first["type"] == "value_error" and not first["loc"]:
        text = str(first["msg"]).removeprefix("Value error, ")
    else:
        text = f"{key} = {first['input']!r}: {first['msg']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return text + more


def dotted_key(loc: tuple[Any, ...]) -> str:
    """("stages", 1) -> "stages[1]"; ("algo", "kl", "coef") -> "algo.kl.coef"."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ["(see README config reference)"]
        model = annotation
    return list(model.model_fields)


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
