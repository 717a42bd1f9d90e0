"""Run configuration: typed dataclasses, a YAML file and ``key=value`` overrides.

Each module owns the dataclass of its settings (``ModelConfig`` in ``model/backbone.py``,
``AlignConfig`` in ``model/arra.py``, ``DataConfig`` in ``data/loader.py``, ``OptimConfig`` in
``train/optim.py``, ``TrainConfig`` in ``train/loop.py``); ``RunConfig`` composes them.

    cfg = load_config("configs/debug.yaml", ["train.max_steps=20", "align.layer=2"])

Unknown keys, values of the wrong type and choices outside a ``Literal`` raise ``ConfigError`` with
the valid options; cross-field checks live in each dataclass's ``validate`` and in
``RunConfig.validate``. ``save_config`` writes the resolved config into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin

import yaml

from arra_ds.data.loader import DataConfig
from arra_ds.eval.train_eval import TrainEvalConfig
from arra_ds.model.arra import AlignConfig
from arra_ds.model.backbone import ModelConfig
from arra_ds.train.loop import TrainConfig
from arra_ds.train.optim import OptimConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "debug.yaml"
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config value that cannot be used; the message says which key and how to fix it."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)  # used when train.eval_every > 0
    output_dir: str = "runs/debug"
    seed: int = 0

    def validate(self) -> None:
        for section in (self.model, self.align, self.data, self.optim, self.train):
            section.validate()
        if self.train.eval_every:
            self.eval.validate()
        if self.data.is_demo:  # the demo data must fit the model's vocabulary and the align encoder
            self.data.demo.check_run(self.model, self.align, self.data.max_seq_len)
        num_layers = self.model.num_hidden_layers()
        if self.align.enabled and not 1 <= self.align.layer <= num_layers:
            raise ConfigError(
                f"align.layer={self.align.layer} is out of range: the backbone has {num_layers} decoder layers, "
                f"so use 1..{num_layers} (layer L is Hugging Face hidden_states[L], the output of decoder layer L)"
            )
        if self.data.max_seq_len > self.model.max_positions() > 0:
            raise ConfigError(
                f"data.max_seq_len={self.data.max_seq_len} exceeds the backbone's max_position_embeddings="
                f"{self.model.max_positions()}; lower data.max_seq_len"
            )


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


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """YAML file (default: the embedded ``configs/debug.yaml``) + ``key=value`` overrides -> RunConfig."""
    cfg = load_dataclass_config(RunConfig, path or DEFAULT_CONFIG, overrides)
    cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
