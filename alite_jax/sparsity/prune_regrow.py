"""A round of sparse learning (paper Algorithm 1, after Dettmers & Zettlemoyer's sparse momentum), and
the prune rate's schedule.

``prune_and_regrow`` works on units (single weights, or columns of C_out weights):

1. importance of layer l: mu_l = mean |momentum| over its active weights, normalised to sum 1;
2. prune: every layer drops ceil(prune_rate * active units) of its active units with the smallest
   magnitude (|w|, or a column's Frobenius norm), never (``keep_channels``) an output channel's last;
3. regrow up to the fixed global budget: first every layer back to its floor (``min_units``), then the
   rest across layers in proportion to mu_l (``redistribution="momentum"``), each layer capped by its
   free units, the excess handed to layers with room (integer bookkeeping, no drift); with
   ``redistribution="none"`` every layer regrows exactly what it pruned;
4. inside a layer the inactive units with the largest momentum (|m|, or the column's momentum norm)
   come back, at value zero, and (``reset_regrown_momentum``) with their momentum set to zero.

docs/sparse_learning.md explains the floor and the momentum reset, which the paper leaves out, and
shows what happens without them. Ranks come from a full stable argsort compared with traced counts, so
one compilation serves every prune rate and every mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from alite_jax.sparsity.masks import Masks, Params, is_none, allocate, rank_of, unit_view
from alite_jax.sparsity.transform import find_momentum, find_state, replace_momentum, replace_state

SCHEDULES = ("linear", "cosine")
FULL_RATE_STEPS = 20  # steps between rounds below which a round prunes proportionally less


@functools.partial(jax.jit, static_argnames=("structure", "budget", "min_units", "redistribution",
                                             "reset_regrown_momentum", "keep_channels"))
def _prune_regrow(params: Params, masks: Masks, momentum: Params, prune_rate: jax.Array, *,
                  structure: str, budget: int, min_units: tuple[int, ...], redistribution: str,
                  reset_regrown_momentum: bool, keep_channels: bool) -> tuple[Params, Masks, Params]:
    flat_masks, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    flat_params = treedef.flatten_up_to(params)
    flat_mom = treedef.flatten_up_to(momentum)
    idx = [i for i, m in enumerate(flat_masks) if m is not None]
    if not idx:
        return params, masks, momentum

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

    # 2. Prune the weakest ceil(rate * active) units of every layer; with keep_channels (irregular), not
    # the strongest active weight of an output channel, so that no channel empties.
    n_prune = jnp.ceil(prune_rate * active.astype(jnp.float32)).astype(jnp.int32)
    kept = []
    for j, (m, w, k) in enumerate(zip(m_units, w_units, n_prune)):
        strength = jnp.linalg.norm(w.astype(jnp.float32), axis=1)
        candidates = m
        if keep_channels and structure == "irregular":
            channels = flat_masks[idx[j]].shape[-1]
            per_channel = jnp.where(m, strength, -1.0).reshape(-1, channels)
            strongest = jnp.arange(per_channel.shape[0])[:, None] == jnp.argmax(per_channel, axis=0)[None, :]
            candidates = m & ~(strongest.reshape(-1) & m)
            k = jnp.minimum(k, jnp.sum(candidates, dtype=jnp.int32))
        kept.append(m & ~(candidates & (rank_of(jnp.where(candidates, strength, jnp.inf)) < k)))

    # 3. Regrow up to the budget: each layer back to its floor (or, without redistribution, to what it
    # held), then the rest in proportion to importance, capped by free units. Every layer held at least
    # its floor before the round, so the floors never need more than the budget.
    kept_count = jnp.stack([jnp.sum(k, dtype=jnp.int32) for k in kept])
    target = active if redistribution == "none" else jnp.asarray(min_units, jnp.int32)
    owed = jnp.maximum(target - kept_count, 0)
    deficit = budget - jnp.sum((kept_count + owed) * unit)
    n_regrow = owed + allocate(importance, n_units - kept_count - owed, unit, deficit)

    # 4. Inside a layer, the free units with the largest momentum come back, at zero.
    new_params, new_masks, new_mom = list(flat_params), list(flat_masks), list(flat_mom)
    for j, i in enumerate(idx):
        pull = jnp.linalg.norm(mom_units[j].astype(jnp.float32), axis=1)
        grow = ~kept[j] & (rank_of(jnp.where(kept[j], jnp.inf, -pull)) < n_regrow[j])
        unit_mask = kept[j] | grow
        shape = flat_masks[i].shape
        mask = jnp.broadcast_to(unit_mask[:, None], w_units[j].shape).reshape(shape)
        keep = jnp.broadcast_to(kept[j][:, None], w_units[j].shape).reshape(shape)
        new_masks[i] = mask
        new_params[i] = jnp.where(keep, flat_params[i], jnp.zeros_like(flat_params[i]))
        if reset_regrown_momentum:
            grown = jnp.broadcast_to(grow[:, None], w_units[j].shape).reshape(shape)
            new_mom[i] = jnp.where(grown, jnp.zeros_like(flat_mom[i]), flat_mom[i])
    return treedef.unflatten(new_params), treedef.unflatten(new_masks), treedef.unflatten(new_mom)


def prune_and_regrow(params: Params, state: optax.OptState,
                     prune_rate: float | jax.Array) -> tuple[Params, optax.OptState]:
    """One prune/regrow round; returns the new params (pruned and regrown weights zero) and state.

    Args:
      params: the current parameters.
      state: a :func:`sparse_learning` state, or any optimizer state that contains one (a chain's).
      prune_rate: fraction of each layer's active units to prune, in [0, 1]; 0 changes nothing.
    Returns:
      (params, state) with the new masks in the state (and, with ``reset_regrown_momentum``, the
      regrown weights' momentum zeroed in the inner state). The global count of active weights stays
      at the budget: exactly for irregular masks, to within a column for column masks; no layer falls
      below its floor (``min_layer_fraction`` of :func:`sparse_learning`).
    """
    sparse = find_state(state)
    momentum = find_momentum(sparse.inner_state, params)
    new_params, new_masks, new_momentum = _prune_regrow(
        params, sparse.masks, momentum, jnp.asarray(prune_rate, jnp.float32),
        structure=sparse.structure, budget=sparse.budget, min_units=sparse.min_units,
        redistribution=sparse.redistribution, reset_regrown_momentum=sparse.reset_regrown_momentum,
        keep_channels=sparse.keep_channels)
    inner = sparse.inner_state
    if sparse.reset_regrown_momentum:
        inner = replace_momentum(inner, params, new_momentum)
    return new_params, replace_state(state, dataclasses.replace(sparse, masks=new_masks, inner_state=inner))


def prune_rate_schedule(p0: float, num_epochs: int, kind: str = "linear", *,
                        steps_per_epoch: int | None = None,
                        full_rate_steps: int = FULL_RATE_STEPS) -> Callable[[int], float]:
    """Prune rate of the round after epoch e (0-based): p0 at e = 0, decaying to 0 at the last epoch.

    "linear" is the paper's (Algorithm 1); "cosine" is the public sparse-momentum code's alternative
    (``CosineDecay``; docs/sparse_learning.md).
    Prune/regrow runs after every epoch but the last, so the rates used are those of e < num_epochs - 1.

    With ``steps_per_epoch`` given, rounds fewer than ``full_rate_steps`` steps apart prune
    proportionally less: rate x steps_per_epoch / full_rate_steps. A round replaces up to p0 of every
    layer with zeros, and the regrown weights need steps to grow before the next round judges them by
    magnitude; at large batches (few steps per epoch) full-rate rounds every epoch replace the network
    faster than it recovers (docs/sparse_learning.md has the measurements). Epochs of at least
    ``full_rate_steps`` steps, as in the paper's settings, keep the paper's rate; 0 turns this off.
    """
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"p0 must be in [0, 1], got {p0}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown kind {kind!r}; choose one of {SCHEDULES}")
    if full_rate_steps < 0 or (steps_per_epoch is not None and steps_per_epoch < 1):
        raise ValueError(f"need steps_per_epoch >= 1 and full_rate_steps >= 0, got {steps_per_epoch} "
                         f"and {full_rate_steps}")
    span = max(num_epochs - 1, 1)
    scale = 1.0
    if steps_per_epoch is not None and full_rate_steps:
        scale = min(1.0, steps_per_epoch / full_rate_steps)

    def rate(epoch: int) -> float:
        t = min(max(epoch, 0), span) / span
        base = p0 * (1.0 - t) if kind == "linear" else p0 * 0.5 * (1.0 + math.cos(math.pi * t))
        return base * scale

    return rate
