"""The end-of-epoch step of sparse learning (paper Algorithm 1; reference.md §5), and its schedule.

``prune_and_regrow`` works on units (single weights, or columns of C_out weights):

1. importance of layer l: mu_l = mean |momentum| over its active weights, normalised to sum 1;
2. prune: every layer drops ceil(prune_rate * active units) of its active units with the smallest
   magnitude (|w|, or a column's Frobenius norm);
3. regrow the weights removed (in fact: up to the fixed global budget) across layers in proportion to
   mu_l, each layer capped by its free units, the excess handed to layers with room (integer
   bookkeeping, no drift);
4. inside a layer the inactive units with the largest momentum (|m|, or the column's momentum norm)
   come back, at value zero.

Ranks come from a full stable argsort compared with traced counts, so one compilation serves every
prune rate and every mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from alite_jax.sparsity.masks import Masks, Params, _is_none, allocate, rank_of, unit_view
from alite_jax.sparsity.transform import find_momentum, find_state, replace_state


@functools.partial(jax.jit, static_argnames=("structure", "budget"))
def _prune_regrow(params: Params, masks: Masks, momentum: Params, prune_rate: jax.Array, *,
                  structure: str, budget: int) -> tuple[Params, Masks]:
    flat_masks, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    flat_params = treedef.flatten_up_to(params)
    flat_mom = treedef.flatten_up_to(momentum)
    idx = [i for i, m in enumerate(flat_masks) if m is not None]
    if not idx:
        return params, masks

    # Unit views: (units, weights per unit); a unit's mask is its first weight's (columns are constant).
    w_units = [unit_view(flat_params[i], structure) for i in idx]
    m_units = [unit_view(flat_masks[i], structure)[:, 0] for i in idx]
    mom_units = [unit_view(flat_mom[i], structure) for i in idx]
    unit = jnp.asarray([u.shape[1] for u in w_units], jnp.int32)
    n_units = jnp.asarray([u.shape[0] for u in w_units], jnp.int32)

    # 1. Layer importance: mean |momentum| over active weights.
    active = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in m_units])
    mom_sum = jnp.stack([jnp.sum(jnp.where(m[:, None], jnp.abs(g), 0.0), dtype=jnp.float32)
                         for m, g in zip(m_units, mom_units)])
    importance = mom_sum / jnp.maximum(active * unit, 1).astype(jnp.float32)
    importance = importance / jnp.maximum(jnp.sum(importance), 1e-30)

    # 2. Prune the weakest ceil(rate * active) units of every layer.
    n_prune = jnp.ceil(prune_rate * active.astype(jnp.float32)).astype(jnp.int32)
    kept = []
    for m, w, k in zip(m_units, w_units, n_prune):
        strength = jnp.linalg.norm(w.astype(jnp.float32), axis=1)
        kept.append(m & ~(rank_of(jnp.where(m, strength, jnp.inf)) < k))

    # 3. Regrow up to the budget, in proportion to importance, capped by free units.
    kept_count = jnp.stack([jnp.sum(k, dtype=jnp.int32) for k in kept])
    deficit = budget - jnp.sum(kept_count * unit)
    n_regrow = allocate(importance, n_units - kept_count, unit, deficit)

    # 4. Inside a layer, the free units with the largest momentum come back, at zero.
    new_params, new_masks = list(flat_params), list(flat_masks)
    for j, i in enumerate(idx):
        pull = jnp.linalg.norm(mom_units[j].astype(jnp.float32), axis=1)
        grow = ~kept[j] & (rank_of(jnp.where(kept[j], jnp.inf, -pull)) < n_regrow[j])
        unit_mask = kept[j] | grow
        shape = flat_masks[i].shape
        mask = jnp.broadcast_to(unit_mask[:, None], w_units[j].shape).reshape(shape)
        keep = jnp.broadcast_to(kept[j][:, None], w_units[j].shape).reshape(shape)
        new_masks[i] = mask
        new_params[i] = jnp.where(keep, flat_params[i], jnp.zeros_like(flat_params[i]))
    return treedef.unflatten(new_params), treedef.unflatten(new_masks)


def prune_and_regrow(params: Params, state: optax.OptState,
                     prune_rate: float | jax.Array) -> tuple[Params, optax.OptState]:
    """One prune/regrow round; returns the new params (pruned and regrown weights zero) and state.

    Args:
      params: the current parameters.
      state: a :func:`sparse_learning` state, or any optimizer state that contains one (a chain's).
      prune_rate: fraction of each layer's active units to prune, in [0, 1]; 0 changes nothing.
    Returns:
      (params, state) with the new masks in the state. The global count of active weights stays at the
      budget: exactly for irregular masks, to within a column for column masks.
    """
    sparse = find_state(state)
    momentum = find_momentum(sparse.inner_state, params)
    new_params, new_masks = _prune_regrow(params, sparse.masks, momentum,
                                          jnp.asarray(prune_rate, jnp.float32),
                                          structure=sparse.structure, budget=sparse.budget)
    return new_params, replace_state(state, dataclasses.replace(sparse, masks=new_masks))


def prune_rate_schedule(p0: float, num_epochs: int, kind: str = "linear") -> Callable[[int], float]:
    """Prune rate after epoch e (0-based): p0 at e = 0, decaying to 0 at the last epoch.

    "linear" is the paper's (Algorithm 1); "cosine" is the public sparse-momentum code's alternative.
    Prune/regrow runs after every epoch but the last, so the rates used are those of e < num_epochs - 1.
    """
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"p0 must be in [0, 1], got {p0}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if kind not in ("linear", "cosine"):
        raise ValueError(f"unknown kind {kind!r}; choose 'linear' or 'cosine'")
    span = max(num_epochs - 1, 1)

    def rate(epoch: int) -> float:
        t = min(max(epoch, 0), span) / span
        return p0 * (1.0 - t) if kind == "linear" else p0 * 0.5 * (1.0 + math.cos(math.pi * t))

    return rate

