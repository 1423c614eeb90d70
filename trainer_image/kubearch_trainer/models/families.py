"""Imports every built-in family so their ``@register`` decorators run.

A family whose module is not written yet is simply absent from the registry.
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
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as err:
        if err.name != _name:
            raise
