"""Name -> architecture class. Built-ins register on import; plugins call :func:`register`.

A user adds an architecture without editing the trainer::

    from kubearch_trainer.models import KubearchModel, register

    @register("my_arch", task="lm")
    class MyArch(KubearchModel): ...

then ``kubearch-train --architecture my_arch`` (after importing the plugin module, e.g. through
``--plugin my_package.my_module``) builds it.
"""

from __future__ import annotations

from collections.abc import Callable

from kubearch_trainer.config import BUILTIN_ARCHITECTURES, PLUGIN_ARCHITECTURES, ModelConfig
from kubearch_trainer.models.base import TASKS, KubearchModel

_REGISTRY: dict[str, type[KubearchModel]] = {}


def register(name: str, task: str | None = None) -> Callable[[type[KubearchModel]], type[KubearchModel]]:
    """Class decorator registering ``cls`` under ``name`` (``task`` overrides ``cls.task``)."""

    def wrap(cls: type[KubearchModel]) -> type[KubearchModel]:
        if not issubclass(cls, KubearchModel):
            raise TypeError(f"{cls.__name__} must subclass KubearchModel to be registered")
        if task is not None:
            if task not in TASKS:
                raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
            cls.task = task
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        if name not in BUILTIN_ARCHITECTURES:
            PLUGIN_ARCHITECTURES.add(name)
        return cls

    return wrap


def _load_builtins() -> None:
    # Importing the family modules runs their @register decorators.
    from kubearch_trainer.models import families  # noqa: F401


def get_model_class(name: str) -> type[KubearchModel]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"model.architecture: {name!r} is not one of {', '.join(sorted(_REGISTRY))}") from None


def available_architectures() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def plugin_architectures(module: str) -> list[str]:
    """The names registered by classes defined in ``module`` or its submodules (for messages)."""
    _load_builtins()
    return sorted(
        name
        for name, cls in _REGISTRY.items()
        if cls.__module__ == module or cls.__module__.startswith(module + ".")
    )


def build_model(cfg: ModelConfig) -> KubearchModel:
    """Instantiate the registered class for ``cfg.architecture``."""
    return get_model_class(cfg.architecture)(cfg)
