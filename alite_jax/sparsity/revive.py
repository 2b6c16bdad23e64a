"""Regrown weights in a dormant channel start at their layer's scale instead of at zero.

A prune/regrow round regrows weights at zero (Algorithm 1). That is harmless where the channel they join
varies over the data, and singular where it does not: a channel whose remaining active weights all read
dead inputs (ReLU channels that are zero over the batch) is constant, the BatchNorm that follows divides
its gradient by sqrt(epsilon), and the weights regrown there, which read live inputs and so collected
that gradient, take a first step hundreds of times the channel's scale. The layer then keeps that scale
(BatchNorm makes it harmless to the function but divides its effective learning rate by |w|^2).

:func:`revive_dormant` draws the weights a round regrew into such a channel from a normal distribution at
the root-mean-square of the layer's kept weights in channels that vary: the channel varies again at its
layer's scale before its first step, as dormant-unit recycling re-initialises a dormant unit's incoming
weights (Sokar, Agarwal, Castro & Evci, "The Dormant Neuron Phenomenon in Deep Reinforcement
Learning", ICML 2023). Which channels are dormant comes from the layers' outputs after the round
(:func:`alite_jax.activity.output_variance`), so the rule needs a forward pass and runs beside the round,
not inside the optimizer's update. docs/sparse_learning.md has the trace and the ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alite_jax.sparsity.masks import is_pruned, path_name
from alite_jax.sparsity.state import Masks, Params, masks_of

# BatchNorm's epsilon in the library's models: a channel whose variance over the batch is below it is
# normalised by epsilon rather than by its own spread.
DORMANT_VARIANCE = 1e-5


def revive_dormant(params: Params, before: Masks, after: Masks, variance: dict, key: jax.Array,
                   threshold: float = DORMANT_VARIANCE) -> tuple[Params, dict[str, jax.Array]]:
    """``params`` with the weights regrown by a round (active in ``after``, not in ``before``) in dormant
    output channels drawn at their layer's scale.

    Args:
      params: the parameters after the round (its regrown weights zero).
      before, after: the masks before and after the round (mask trees, or optimizer states holding a
        sparse-learning state).
      variance: the variance over a batch of each output channel, under ``params``, at the place of
        every pruned kernel it covers (:func:`alite_jax.activity.output_variance`'s tree); kernels it
        does not cover are left as they are.
      key: the random draw's key (one per round: the same after a resume).
      threshold: a channel whose variance is below it is dormant.
    Returns:
      ``(params, revived)``: ``revived`` maps a kernel's path ("a/b/kernel") to the number of weights
      drawn there (an int32 scalar), for every pruned kernel the variance covers.

    The scale is the root-mean-square of the layer's weights active before and after the round in
    channels at or above the threshold; a layer with none falls back to He's sqrt(2 / fan_in). The
    output channel is a kernel's last axis.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree.structure(params)
    flat_before = treedef.flatten_up_to(masks_of(before, params))
    flat_after = treedef.flatten_up_to(masks_of(after, params))
    flat_var = dict(jax.tree_util.tree_flatten_with_path(variance)[0])
    keys = jax.random.split(key, len(flat_params))
    new, revived = [], {}
    for i, ((path, p), b, a) in enumerate(zip(flat_params, flat_before, flat_after)):
        var = flat_var.get(path)
        if var is None or not is_pruned(a):
            new.append(p)
            continue
        dormant = jnp.asarray(var) < threshold
        draw_here = a & ~b & dormant
        kept_live = a & b & ~dormant
        count = jnp.sum(kept_live, dtype=jnp.float32)
        rms = jnp.sqrt(jnp.sum(jnp.where(kept_live, jnp.square(p.astype(jnp.float32)), 0.0))
                       / jnp.maximum(count, 1.0))
        he = jnp.sqrt(2.0 / (p.size // p.shape[-1]))
        scale = jnp.where(count > 0, rms, he)
        draw = (jax.random.normal(keys[i], p.shape, jnp.float32) * scale).astype(p.dtype)
        new.append(jnp.where(draw_here, draw, p))
        revived[path_name(path)] = jnp.sum(draw_here, dtype=jnp.int32)
    return treedef.unflatten(new), revived
