"""Typed configs from YAML files and ``key=value`` overrides (generic: no section is known here).

Each module owns the dataclass of its settings (``ModelConfig`` in ``model/config.py``,
``DataConfig`` in ``data/loader.py``, ...); a launcher's config composes them (the trainer's
``RunConfig`` in ``train/run_config.py``, ``GenerateConfig``, ``EvalConfig``):

    cfg = load_dataclass_config(RunConfig, "configs/debug.yaml", ["train.max_steps=20", "align.layer=2"])

Unknown keys, values of the wrong type and choices outside a ``Literal`` raise ``ConfigError`` with
the valid options; cross-field checks live in each dataclass's ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin

import yaml

from arra_ds.errors import ConfigError
from arra_ds.io import atomic_write

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


# ------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks
# ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads on/off/yes/no/true/false as booleans: give back the string choice so spelled
            spellings = ("on", "yes", "true") if value else ("off", "no", "false")
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in spellings]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a valid choice; use one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} does not fit {_type_name(tp)}: " + "; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[0.9,0.95]")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section ({tp.__name__}); set its fields as {key}.<field>=value")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict; missing fields keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the run config"
            raise ConfigError(f"unknown config key '{full}'.{hint} Valid keys in {where}: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------
# overrides, load, save
# ------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML typing: 20 -> int, true -> bool, [0.9,0.95] -> list. PyYAML (YAML 1.1) reads "1e-5" as a
    # string because it lacks a dot, so scientific notation is converted here.
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        value = float(value)
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_dataclass_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Dataclass ``cls`` from an optional YAML file + ``key=value`` overrides (generate, eval, FID stats)."""
    data = read_config_file(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (atomically: a resumed run may read it while it is replaced)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment at the end of its line in the class source (best effort: {} if the
    source is not available)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """One line per settable key of dataclass ``cls`` (nested sections as ``section.key``): its type,
    default and comment, for a launcher's ``--help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_fields(tp, prefix=f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        comment = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {key}={default!r} ({_type_name(tp)}){comment}")
    return lines
