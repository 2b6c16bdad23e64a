"""Methods the trainer runs (see :mod:`alite_jax.methods.base` for the seam): ``config.mode`` picks one.

* ``"teacher"``: the CNN teacher with cross-entropy (:class:`~alite_jax.methods.base.Method`);
* ``"baseline"``: a dense student with cross-entropy (the same);
* ``"distill"``: AttentionLite's sparse distillation
  (:class:`~alite_jax.methods.attentionlite.AttentionLite`);
* ``"spvit_search"``: SPViT's search of a DeiT supernet (:class:`~alite_jax.methods.spvit.SPViTSearch`);
* ``"spvit_finetune"``: SPViT's fine-tuning of the architecture found, optionally hard-distilled from a CNN
  teacher and sparse (:class:`~alite_jax.methods.spvit.SPViTFinetune`).

A new method subclasses :class:`Method` and registers its mode in :data:`METHODS`; the loop does not
change.
"""

from __future__ import annotations

import ml_collections

from alite_jax.methods.attentionlite import AttentionLite, is_sparse, needs_teacher
from alite_jax.methods.base import Method, State, learning_rate_schedule, sgd
from alite_jax.methods.spvit import SPViTFinetune, SPViTSearch

METHODS: dict[str, type[Method]] = {"teacher": Method, "baseline": Method, "distill": AttentionLite,
                                   "spvit_search": SPViTSearch, "spvit_finetune": SPViTFinetune}


def get_method(config: ml_collections.ConfigDict, num_classes: int) -> Method:
    """The method ``config.mode`` names (the mode is checked by the trainer first)."""
    return METHODS[config.mode](config, num_classes)


__all__ = ["METHODS", "AttentionLite", "Method", "SPViTFinetune", "SPViTSearch", "State", "get_method",
           "is_sparse", "learning_rate_schedule", "needs_teacher", "sgd"]
