"""Sparse learning (paper §3, Algorithm 1) as composable optax pieces; docs/sparse_learning.md gives the
round as implemented, the sources of its rules and the measurements behind its defaults.

    tx = sparse_learning(optax.sgd(0.1, momentum=0.9), density=0.1)
    state = tx.init(params); params = apply_masks(params, get_masks(state))
    ... updates, state = tx.update(grads, state, params); params = optax.apply_updates(params, updates)
    ... at the end of an epoch: params, state = prune_and_regrow(params, state, schedule(epoch))
"""

from alite_jax.sparsity.masks import (DISTRIBUTIONS, STRUCTURES, apply_masks, channel_units,
                                      default_is_prunable, draw_masks, global_density, init_masks,
                                      layer_densities, layer_units, scale_to_fan_in)
from alite_jax.sparsity.prune_regrow import SCHEDULES, prune_and_regrow, prune_rate_schedule
from alite_jax.sparsity.transform import REDISTRIBUTIONS, SparseLearningState, get_masks, sparse_learning

__all__ = [
    "DISTRIBUTIONS", "REDISTRIBUTIONS", "SCHEDULES", "STRUCTURES", "SparseLearningState", "apply_masks",
    "channel_units", "default_is_prunable", "draw_masks", "get_masks", "global_density", "init_masks",
    "layer_densities", "layer_units", "scale_to_fan_in",
    "prune_and_regrow", "prune_rate_schedule", "sparse_learning",
]
