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
shows what happens without them. Ranks come from a full stable argsort compared with traced counts, and
every setting but the structure is an array of the state, so one compilation serves every prune rate,
mask, density and switch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alite_jax.sparsity.masks import (allocate, apply_masks, explicit_sharding, gathered, is_pruned, placed,
                                      rank_of, unit_view)
from alite_jax.sparsity.state import (Masks, Params, SparseLearningState, find_momentum, find_state, merge,
                                      replace_momentum, replace_state, restrict)

SCHEDULES = ("linear", "cosine")
FULL_RATE_STEPS = 20  # steps between rounds below which a round prunes proportionally less


def round_masks(params: Params, masks: Masks, momentum: Params, prune_rate: jax.Array, *, structure: str,
                budget: jax.Array, min_units: jax.Array, redistribute: jax.Array | bool = True,
                reset_regrown_momentum: jax.Array | bool = True,
                keep_channels: jax.Array | bool = True) -> tuple[Masks, Masks, Params]:
    """The round's arithmetic on plain trees (traceable; :func:`prune_and_regrow` and the in-update rounds
    of :func:`alite_jax.sparsity.sparse_learning` both call it).

    Returns:
      ``(keep, masks, momentum)``: ``keep`` is True where a weight keeps its value (active before and
      after; every other weight is zero after the round), ``masks`` the new masks, ``momentum`` the
      momentum with the regrown weights' zeroed when ``reset_regrown_momentum``. Leaves that are not
      pruned come back as they are (``keep`` is their scalar True).
    """
    flat_masks, treedef = jax.tree.flatten(masks)
    flat_params = treedef.flatten_up_to(params)
    flat_mom = treedef.flatten_up_to(momentum)
    idx = [i for i, m in enumerate(flat_masks) if is_pruned(m)]
    if not idx:
        return masks, masks, momentum
    keep_channels = jnp.asarray(keep_channels, bool)
    # Kernels sharded over explicit mesh axes (jax.make_mesh's default) are gathered for the round: its
    # reshapes and sorts need whole kernels. The results go back to the masks' and momentum's shardings.
    shardings = {i: (explicit_sharding(flat_masks[i]), explicit_sharding(flat_mom[i])) for i in idx}
    flat_params, flat_masks, flat_mom = list(flat_params), list(flat_masks), list(flat_mom)
    for i in idx:
        flat_params[i], flat_masks[i], flat_mom[i] = (gathered(x) for x in (flat_params[i], flat_masks[i],
                                                                            flat_mom[i]))

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
        if structure == "irregular":
            channels = flat_masks[idx[j]].shape[-1]
            per_channel = jnp.where(m, strength, -1.0).reshape(-1, channels)
            strongest = jnp.arange(per_channel.shape[0])[:, None] == jnp.argmax(per_channel, axis=0)[None, :]
            candidates = jnp.where(keep_channels, m & ~(strongest.reshape(-1) & m), m)
            k = jnp.minimum(k, jnp.sum(candidates, dtype=jnp.int32))
        kept.append(m & ~(candidates & (rank_of(jnp.where(candidates, strength, jnp.inf)) < k)))

    # 3. Regrow up to the budget: each layer back to its floor (or, without redistribution, to what it
    # held), then the rest in proportion to importance, capped by free units. Every layer held at least
    # its floor before the round, so the floors never need more than the budget.
    kept_count = jnp.stack([jnp.sum(k, dtype=jnp.int32) for k in kept])
    target = jnp.where(jnp.asarray(redistribute, bool), jnp.asarray(min_units, jnp.int32), active)
    owed = jnp.maximum(target - kept_count, 0)
    deficit = jnp.asarray(budget, jnp.int32) - jnp.sum((kept_count + owed) * unit)
    n_regrow = owed + allocate(importance, n_units - kept_count - owed, unit, deficit)

    # 4. Inside a layer, the free units with the largest momentum come back, at zero.
    new_keep, new_masks, new_mom = list(flat_masks), list(flat_masks), list(flat_mom)
    for j, i in enumerate(idx):
        pull = jnp.linalg.norm(mom_units[j].astype(jnp.float32), axis=1)
        grow = ~kept[j] & (rank_of(jnp.where(kept[j], jnp.inf, -pull)) < n_regrow[j])
        shape = flat_masks[i].shape
        as_weights = lambda u: jnp.broadcast_to(u[:, None], w_units[j].shape).reshape(shape)  # noqa: B023
        new_masks[i] = as_weights(kept[j] | grow)
        new_keep[i] = as_weights(kept[j])
        reset = as_weights(grow) & jnp.asarray(reset_regrown_momentum, bool)
        new_mom[i] = jnp.where(reset, jnp.zeros_like(flat_mom[i]), flat_mom[i])
        mask_sharding, mom_sharding = shardings[i]
        new_keep[i], new_masks[i] = placed(new_keep[i], mask_sharding), placed(new_masks[i], mask_sharding)
        new_mom[i] = placed(new_mom[i], mom_sharding)
    return treedef.unflatten(new_keep), treedef.unflatten(new_masks), treedef.unflatten(new_mom)


def round_state(params: Params, sparse: SparseLearningState,
                prune_rate: jax.Array) -> tuple[Masks, SparseLearningState]:
    """A round on a :class:`SparseLearningState`: ``(keep, state)`` with the new masks and momentum (see
    :func:`round_masks` for ``keep``)."""
    momentum = find_momentum(sparse.inner_state, params)
    keep, masks, momentum = round_masks(
        params, sparse.masks, momentum, jnp.asarray(prune_rate, jnp.float32), structure=sparse.structure,
        budget=sparse.budget, min_units=sparse.min_units, redistribute=sparse.redistribute,
        reset_regrown_momentum=sparse.reset_regrown_momentum, keep_channels=sparse.keep_channels)
    inner = replace_momentum(sparse.inner_state, params, momentum)
    return keep, dataclasses.replace(sparse, masks=masks, inner_state=inner)


@jax.jit
def _prune_and_regrow(params: Params, sparse: SparseLearningState,
                      prune_rate: jax.Array) -> tuple[Params, SparseLearningState]:
    keep, sparse = round_state(params, sparse, prune_rate)
    return apply_masks(params, keep), sparse


def prune_and_regrow(params: Params, state: optax.OptState,
                     prune_rate: float | jax.Array) -> tuple[Params, optax.OptState]:
    """One prune/regrow round; returns the new params (pruned and regrown weights zero) and state.

    For rounds run from outside the step (the trainer runs one after each epoch's evaluation); the
    same round runs inside ``update`` with ``sparse_learning(..., round_every=N)``.

    Args:
      params: the current parameters.
      state: a :func:`sparse_learning` state, or any optimizer state that contains one (a chain's,
        ``optax.masked``'s or ``optax.multi_transform``'s: the round then covers the wrapper's group).
      prune_rate: fraction of each layer's active units to prune, in [0, 1]; 0 changes nothing.
    Returns:
      (params, state) with the new masks in the state (and, with ``reset_regrown_momentum``, the
      regrown weights' momentum zeroed in the inner state). The global count of active weights stays
      at the budget: exactly for irregular masks, to within a column for column masks; no layer falls
      below its floor (``min_layer_fraction`` of :func:`sparse_learning`).
    """
    sparse = find_state(state)
    # Under optax.masked / multi_transform the sparse state covers one group: run the round on its view.
    view = restrict(params, sparse.masks)
    new_view, new_sparse = _prune_and_regrow(view, sparse, jnp.asarray(prune_rate, jnp.float32))
    return merge(new_view, params, sparse.masks), replace_state(state, new_sparse)


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


def round_prune_rate(p0: float, total_steps: int, round_every: int, kind: str = "linear", *,
                     full_rate_steps: int = FULL_RATE_STEPS) -> Callable[[jax.Array], jax.Array]:
    """The prune rate of in-update rounds (``sparse_learning(..., round_every=N)``) as a function of the
    update count: Algorithm 1's schedule with "epochs" of ``round_every`` steps.

    The round at update k = (e + 1) x ``round_every`` gets exactly the rate that
    :func:`prune_rate_schedule` (``p0``, ``total_steps // round_every`` epochs, ``kind``,
    ``steps_per_epoch=round_every``, ``full_rate_steps``) gives the round after epoch e, so per-epoch
    rounds and in-update rounds every ``steps_per_epoch`` steps make the same masks. Rounds at or after
    ``total_steps`` get 0 (they change nothing). Traceable: the rates are a table indexed by the count.
    """
    if total_steps < 1 or round_every < 1:
        raise ValueError(f"need total_steps >= 1 and round_every >= 1, got {total_steps} and {round_every}")
    rounds = max(total_steps // round_every, 1)
    epoch_rate = prune_rate_schedule(p0, rounds, kind, steps_per_epoch=round_every,
                                     full_rate_steps=full_rate_steps)
    table = np.array([epoch_rate(e) for e in range(rounds - 1)] + [0.0], np.float32)

    def rate(count: jax.Array) -> jax.Array:
        index = jnp.clip(jnp.asarray(count) // round_every - 1, 0, rounds - 1)
        return jnp.asarray(table)[index]

    return rate
