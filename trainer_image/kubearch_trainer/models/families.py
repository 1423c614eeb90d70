"""Imports every built-in family so their ``@register`` decorators run.

Every module must import: a missing one (or one of its dependencies) is an error here, not an
architecture that silently drops out of the registry and the tests.
"""

from __future__ import annotations

import importlib

_FAMILY_MODULES = (
    "kubearch_trainer.models.dense",
    "kubearch_trainer.models.mamba",
    "kubearch_trainer.models.moe",
    "kubearch_trainer.models.hybrid",
    "kubearch_trainer.models.vae",
    "kubearch_trainer.models.diffusion",
    "kubearch_trainer.models.cnn",
    "kubearch_trainer.models.recurrent",
)

for _name in _FAMILY_MODULES:
    importlib.import_module(_name)
