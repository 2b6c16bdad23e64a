"""Methods the trainer runs (see :mod:`alite_jax.methods.base` for the seam): ``config.mode`` picks one.

* ``"teacher"``: the CNN teacher with cross-entropy (:class:`~alite_jax.methods.base.Method`);
* ``"baseline"``: a dense student with cross-entropy (the same);
* ``"distill"``: AttentionLite's sparse distillation
  (:class:`~alite_jax.methods.attentionlite.AttentionLite`);
* ``"spvit_search"``: SPViT's search of a DeiT supernet (:class:`~alite_jax.methods.spvit.SPViTSearch`);
* ``"spvit_finetune"``: SPViT's fine-tuning of the architecture found, optionally hard-distilled from a CNN
  teacher and sparse (:class:`~alite_jax.methods.spvit.SPViTFinetune`).

A new method subclasses :class:`Method` (mixing in :class:`SparseLearning` or :class:`TeacherRun` if it
prunes or distils) and is registered with :func:`register_method`; nothing else in the package changes.
"""

from __future__ import annotations

import ml_collections

from alite_jax.methods.attentionlite import AttentionLite
from alite_jax.methods.base import Method, State, class_fields
from alite_jax.methods.optim import learning_rate_schedule, optimizer_from_config, sgd
from alite_jax.methods.registry import (METHODS, get_method, load_run, method_class, register_method,
                                        registered_may_change, registered_ranges, registered_sections,
                                        run_model)
from alite_jax.methods.sparse import SparseLearning
from alite_jax.methods.spvit import SPViTFinetune, SPViTSearch
from alite_jax.methods.teacher import TeacherRun

for _mode, _method in (("teacher", Method), ("baseline", Method), ("distill", AttentionLite),
                       ("spvit_search", SPViTSearch), ("spvit_finetune", SPViTFinetune)):
    register_method(_mode, _method)


def is_sparse(config: ml_collections.ConfigDict) -> bool:
    """Whether a run of ``config`` prunes with sparse learning (its method can, and its density < 1)."""
    method = method_class(config.mode)
    return issubclass(method, SparseLearning) and config.sparsity.density < 1.0


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether a run of ``config`` runs a teacher in its step (e.g. ``distill.loss="ce"`` needs none)."""
    method = method_class(config.mode)
    return issubclass(method, TeacherRun) and method(config, 0).uses_teacher()


__all__ = ["METHODS", "AttentionLite", "Method", "SPViTFinetune", "SPViTSearch", "SparseLearning", "State",
           "TeacherRun", "class_fields", "get_method", "is_sparse", "learning_rate_schedule", "load_run",
           "method_class", "needs_teacher", "optimizer_from_config", "register_method",
           "registered_may_change", "registered_ranges", "registered_sections", "run_model", "sgd"]
