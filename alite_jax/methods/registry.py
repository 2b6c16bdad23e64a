"""The modes ``config.mode`` can name, each a :class:`~alite_jax.methods.base.Method`, and what is found
through them: a finished run's model (teacher loading, export), the config sections and ranges of every
registered method.

:mod:`alite_jax.methods` registers the library's methods here explicitly; a user's method is one
:func:`register_method` call (e.g. in the module that defines it, imported by the user's config file).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from alite_jax import run_dir
from alite_jax.errors import ConfigError, RunDirError
from alite_jax.methods.base import Method, class_fields

METHODS: dict[str, type[Method]] = {}  # mode -> Method subclass


def register_method(mode: str, method: type[Method]) -> None:
    """Makes ``config.mode = mode`` train with ``method`` (a subclass of
    :class:`~alite_jax.methods.base.Method`); a mode registered twice must name the same class."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"register_method({mode!r}, ...) takes a subclass of alite_jax.methods.Method, got "
                        f"{method!r}")
    if METHODS.get(mode, method) is not method:
        raise ValueError(f"mode {mode!r} is registered already (to {METHODS[mode].__name__})")
    METHODS[mode] = method


def method_class(mode: str) -> type[Method]:
    """The method registered for ``mode``, or a :class:`ConfigError` listing the registered modes."""
    if mode not in METHODS:
        raise ConfigError(f"config.mode must be one of {tuple(METHODS)}, got {mode!r} (a method of your "
                          f"own: alite_jax.methods.register_method, in a module your config imports)")
    return METHODS[mode]


def get_method(config: ml_collections.ConfigDict, num_classes: int) -> Method:
    """The method ``config.mode`` names, built for this config and number of classes."""
    return method_class(config.mode)(config, num_classes)


def run_method(workdir: str, config: ml_collections.ConfigDict | None = None) -> Method:
    """The method of the run in ``workdir``, built from its ``config.json`` (or from ``config``, the
    run's config as a caller changed it)."""
    if config is None:
        stored = run_dir.read_run_config(workdir)
        if stored is None:
            raise RunDirError(f"{workdir} holds no run (no {run_dir.CONFIG})")
        config = ml_collections.ConfigDict(stored)
    try:
        cls = method_class(config.get("mode", "teacher"))
    except ConfigError as e:
        raise RunDirError(f"the run at {workdir} was trained with mode {config.mode!r}, which is not "
                          f"registered here: import the module that registers it first") from e
    return cls(config, config.num_classes)


def run_model(workdir: str, dtype: str = "", config: ml_collections.ConfigDict | None = None) -> nn.Module:
    """The model the variables of the finished run in ``workdir`` belong to (its method's
    :meth:`~alite_jax.methods.base.Method.run_model`; ``config``: the run's config as a caller changed
    it, e.g. another attention implementation)."""
    return run_method(workdir, config).run_model(workdir, dtype)


def load_run(workdir: str, mesh: jax.sharding.Mesh, dtype: str = "") -> tuple[nn.Module, Any]:
    """(model, variables) of the finished run in ``workdir`` (e.g. a distillation's teacher), the
    variables read outside ``jit`` and replicated on ``mesh``. ``dtype`` ("float32" / "bfloat16")
    overrides the compute dtype the run was trained with."""
    method = run_method(workdir)
    model = method.run_model(workdir, dtype)
    config = method.config
    return model, run_dir.restore_model(workdir, model, mesh, config.data.image_size, config.channels)


def registered_sections() -> dict[str, dict[str, Any]]:
    """Every registered method's config sections with their defaults (the first registered wins)."""
    sections: dict[str, dict[str, Any]] = {}
    for cls in METHODS.values():
        for name, defaults in class_fields(cls, "sections").items():
            sections.setdefault(name, defaults)
    return sections


def registered_may_change() -> tuple[str, ...]:
    """The fields any registered method lets change when a run resumes (where its inputs are: a field
    naming a place on disk may move whichever mode the run is, since every config has every section)."""
    return tuple(dict.fromkeys(f for cls in METHODS.values() for f in class_fields(cls, "may_change")))


def registered_ranges() -> dict[str, Any]:
    """Every registered method's numeric field ranges, {"section.field": Range}."""
    ranges: dict[str, Any] = {}
    for cls in METHODS.values():
        ranges.update(class_fields(cls, "field_ranges"))
    return ranges
