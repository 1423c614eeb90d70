"""Architectures. ``build_model(cfg)`` is the only entry the train loop needs."""

from kubearch_trainer.models.base import TASKS, KubearchModel, ModelOutput
from kubearch_trainer.models.registry import available_architectures, build_model, get_model_class, register

__all__ = [
    "TASKS",
    "KubearchModel",
    "ModelOutput",
    "available_architectures",
    "build_model",
    "get_model_class",
    "register",
]
