"""The backbone registry: ``model.source`` -> the ``Backbone`` that knows everything about it.

A backbone is one module that defines a ``Backbone`` (``model/interface.py``); adding one is that module,
one line in ``BUILTIN`` below, and its tests. A backbone outside arra_ds registers itself with
``register_backbone`` when its module is imported; name that module in the ``ARRA_DS_PLUGINS`` environment
variable (comma-separated module names) so that every process of a run (launchers, ranks, Slurm tasks)
imports it before the config is read.
"""

from __future__ import annotations

import importlib
import os

from arra_ds.errors import ConfigError
from arra_ds.model.chameleon import CHAMELEON, LUMINA_MGPT
from arra_ds.model.debug import DEBUG
from arra_ds.model.interface import Backbone
from arra_ds.model.janus import JANUS
from arra_ds.model.llamagen.backbone import LLAMAGEN

PLUGINS_ENV = "ARRA_DS_PLUGINS"
BUILTIN: tuple[Backbone, ...] = (DEBUG, CHAMELEON, LUMINA_MGPT, LLAMAGEN, JANUS)

_registry: dict[str, Backbone] = {backbone.name: backbone for backbone in BUILTIN}
_plugins_loaded: set[str] = set()


def register_backbone(backbone: Backbone) -> Backbone:
    """Make ``backbone`` available as ``model.source=<backbone.name>``; returns it. Registering another backbone
    under a name that is taken is an error (re-registering the same object is not)."""
    taken = _registry.get(backbone.name)
    if taken is not None and taken is not backbone:
        raise ValueError(f"model.source={backbone.name!r} is already registered ({type(taken).__name__})")
    _registry[backbone.name] = backbone
    return backbone


def _load_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        if name in _plugins_loaded:
            continue
        try:
            importlib.import_module(name)  # the module registers its backbone when it is imported
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import backbone module {name!r} ({e})") from e
        _plugins_loaded.add(name)


def registered_backbones() -> list[Backbone]:
    _load_plugins()
    return list(_registry.values())


def backbone_for(source: str) -> Backbone:
    """The backbone registered as ``source``; ConfigError listing the registered names otherwise."""
    if source not in _registry:
        _load_plugins()
    if source not in _registry:
        raise ConfigError(
            f"model.source={source!r} is not a registered backbone; use one of {sorted(_registry)} "
            f"(a backbone of your own: register it in a module named in {PLUGINS_ENV})"
        )
    return _registry[source]
