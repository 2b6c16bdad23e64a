"""Sparse learning (paper §3, Algorithm 1) as composable optax pieces; docs/sparse_learning.md gives the
round as implemented, the sources of its rules and the measurements behind its defaults.

    tx = sparse_learning(optax.sgd(0.1, momentum=0.9), density=0.1, round_every=100,
                         prune_rate=round_prune_rate(0.5, total_steps, round_every=100))
    state = tx.init(params); params = apply_masks(params, state)
    ... updates, state = tx.update(grads, state, params); params = optax.apply_updates(params, updates)

Without ``round_every`` the rounds run from outside the step:
``params, state = prune_and_regrow(params, state, rate)``.
"""

from alite_jax.sparsity.masks import (DISTRIBUTIONS, STRUCTURES, apply_masks, channel_units,
                                      default_is_prunable, draw_masks, global_density, init_masks, is_pruned,
                                      layer_densities, layer_units, scale_to_fan_in)
from alite_jax.sparsity.prune_regrow import (SCHEDULES, prune_and_regrow, prune_rate_schedule, round_masks,
                                             round_prune_rate)
from alite_jax.sparsity.revive import DORMANT_VARIANCE, revive_dormant
from alite_jax.sparsity.state import SparseLearningState, find_state, get_masks
from alite_jax.sparsity.transform import REDISTRIBUTIONS, sparse_learning

__all__ = [
    "DISTRIBUTIONS", "DORMANT_VARIANCE", "REDISTRIBUTIONS", "SCHEDULES", "STRUCTURES", "SparseLearningState",
    "apply_masks", "channel_units", "default_is_prunable", "draw_masks", "find_state", "get_masks",
    "global_density", "init_masks", "is_pruned", "layer_densities", "layer_units", "scale_to_fan_in",
    "prune_and_regrow", "prune_rate_schedule", "round_masks", "revive_dormant", "round_prune_rate",
    "sparse_learning",
]
