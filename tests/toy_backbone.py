"""A backbone registered from outside arra_ds: a renamed copy of the debug backbone (``model.source=toy``).

Importing this module registers it; ``ARRA_DS_PLUGINS`` makes every process of a run (the
launchers, each rank) import it (tests/ on PYTHONPATH, ARRA_DS_PLUGINS=toy_backbone). tests/test_backbones.py trains,
generates, evaluates and exports it through the
public launchers: a backbone is one module, and nothing outside it names it.
"""

from arra_ds.model.debug import DebugBackbone
from arra_ds.model.registry import register_backbone


class ToyBackbone(DebugBackbone):
    name = "toy"


TOY = register_backbone(ToyBackbone())
