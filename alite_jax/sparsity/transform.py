"""``sparse_learning``: sparse training as an optax wrapper whose state carries the masks.

The wrapper (jaxpruner style) feeds the DENSE gradient to the inner optimizer, so its momentum keeps
accumulating for inactive weights (the regrowth signal of sparse momentum, Dettmers & Zettlemoyer 2019),
and returns updates that keep inactive weights exactly zero. Masks live in the optimizer state, so they
are checkpointed and sharded with it. docs/sparse_learning.md gives the sources and the defaults' reasons.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from alite_jax.sparsity.masks import (DISTRIBUTIONS, STRUCTURES, IsPrunable, channel_units, draw_masks,
                                      is_pruned, layer_units, like)
from alite_jax.sparsity.prune_regrow import round_state
from alite_jax.sparsity.state import Params, SparseLearningState, find_momentum

REDISTRIBUTIONS = ("momentum", "none")


def sparse_learning(inner: optax.GradientTransformation, *, density: float,
                    structure: str = "irregular", distribution: str = "uniform",
                    is_prunable: IsPrunable | Params | None = None, seed: int = 0,
                    redistribution: str = "momentum", min_layer_fraction: float = 0.25,
                    reset_regrown_momentum: bool = True, keep_channels: bool = True,
                    round_every: int | None = None,
                    prune_rate: float | Callable[[jax.Array], jax.Array] | None = None,
                    ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that training keeps a global fraction ``density`` of the prunable weights.

    The rounds that move the masks run either inside ``update`` (``round_every``: nothing else to call)
    or from outside the step (:func:`alite_jax.sparsity.prune_and_regrow`, as the trainer does after each
    epoch's evaluation). The options after ``seed`` choose how a round moves the budget
    (docs/sparse_learning.md says why the defaults are what they are, with the measurements).

    Args:
      inner: the optimizer; it must keep a momentum / first-moment trace (sgd with momentum, nesterov,
        adam, adamw, lion, ...), by which a round regrows weights. It may itself be a chain (e.g. with
        ``optax.add_decayed_weights``) and take extra arguments (they are passed on to it).
      density: target fraction of active prunable weights, in (0, 1].
      structure: "irregular" (single weights) or "column" (columns of C_out weights).
      distribution: how the initial budget is split over layers: "uniform" (the same density
        everywhere) or "erk" (Erdos-Renyi-Kernel).
      is_prunable: which leaves are pruned: None (conv and dense kernels, see
        :func:`alite_jax.sparsity.masks.default_is_prunable`), a callable (key_path, leaf) -> bool, or a
        tree of bools.
      seed: seed of the random initial masks.
      redistribution: "momentum" (paper, sparse momentum): the weights freed by a round are regrown
        across layers in proportion to each layer's mean |momentum| over its active weights; "none":
        every layer regrows what it pruned, so per-layer budgets stay as initialised (SET, RigL).
      min_layer_fraction: in [0, 1]; no layer ever holds fewer active units than this fraction of
        its initial allocation (and never fewer than one unit, whatever the value). 0 is the paper's
        rule, under which momentum redistribution can starve a layer to a single unit.
      reset_regrown_momentum: regrown weights restart with zero momentum (RigL), instead of keeping
        the momentum they accumulated while inactive (sparse momentum's public code), which
        kicks every regrown weight by up to lr / (1 - momentum) times its gradient at once.
      keep_channels: (irregular) every output channel of a pruned kernel keeps at least one active
        weight: at the start (each channel's first weight is drawn before the rest, and every layer
        gets at least C_out) and in every round (a channel's strongest weight is never pruned). An empty
        channel followed by BatchNorm has zero variance, where BatchNorm's gradient grows as
        1/sqrt(epsilon): weights regrown into it take steps of 10^4-10^6 and blow the network's weights
        and statistics up (docs/sparse_learning.md). False is the paper's rule.
      round_every: run a prune/regrow round inside ``update`` after every ``round_every`` updates
        (under ``lax.cond``: other steps cost the masking only). None: rounds only from outside.
      prune_rate: with ``round_every``, the rounds' prune rate: a number in [0, 1], or a function of the
        update count (this update included), e.g. :func:`alite_jax.sparsity.round_prune_rate` (the
        paper's linear decay) or an optax schedule.
    Returns:
      A GradientTransformationExtraArgs. ``init(params)`` draws the masks (apply them to the parameters
      with :func:`apply_masks`); ``update(grads, state, params, **extra_args)`` needs ``params``. Its
      updates make inactive weights exactly zero: a weight a round prunes gets ``-w``; the round judges
      ``params + updates``. Nothing that changes the step may be chained after this transformation
      (a scale, a learning rate, weight decay would turn ``-w`` into ``(1 - c) w`` or ``-w + wd w``):
      keep the learning rate and weight decay inside ``inner`` (``optax.sgd(lr, ...)``, ``optax.adamw``,
      ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if redistribution not in REDISTRIBUTIONS:
        raise ValueError(f"unknown redistribution {redistribution!r}; choose one of {REDISTRIBUTIONS}")
    if not 0.0 <= min_layer_fraction <= 1.0:
        raise ValueError(f"min_layer_fraction must be in [0, 1], got {min_layer_fraction}")
    if round_every is not None:
        given = round_every
        try:  # an int, numpy's included; not a float or a bool
            round_every = -1 if isinstance(given, bool) else operator.index(given)
        except TypeError:
            round_every = -1
        if round_every < 1:
            raise ValueError(f"round_every must be a whole number of updates >= 1 (or None), got {given!r}")
    if (round_every is None) != (prune_rate is None):
        raise ValueError("in-update rounds need both round_every and prune_rate (e.g. round_every=100, "
                         "prune_rate=sparsity.round_prune_rate(0.5, total_steps, 100)); give neither to run "
                         "the rounds with prune_and_regrow")
    if prune_rate is not None and not callable(prune_rate) and not 0.0 <= prune_rate <= 1.0:
        raise ValueError(f"prune_rate must be in [0, 1] or a function of the update count, got {prune_rate}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Params) -> SparseLearningState:
        inner_state = inner.init(params)
        find_momentum(inner_state, params)  # fail now, not at the first round
        units, budget = layer_units(params, density, structure, distribution, is_prunable, keep_channels)
        masks = jax.tree.map(_placed_like, draw_masks(params, units, structure, is_prunable, seed,
                                                       keep_channels), params)
        channels = [channel_units(m.shape, structure) if keep_channels else 1
                    for m in jax.tree.leaves(masks) if is_pruned(m)]
        min_units = [min(u, max(c, math.ceil(min_layer_fraction * u))) for u, c in zip(units, channels)]
        return SparseLearningState(
            masks=masks, inner_state=inner_state, count=jnp.zeros((), jnp.int32),
            budget=jnp.asarray(budget, jnp.int32), min_units=jnp.asarray(min_units, jnp.int32),
            redistribute=jnp.asarray(redistribution == "momentum"),
            reset_regrown_momentum=jnp.asarray(bool(reset_regrown_momentum)),
            keep_channels=jnp.asarray(bool(keep_channels)), structure=structure)

    def update_fn(updates: Params, state: SparseLearningState, params: Params | None = None,
                  **extra_args) -> tuple[Params, SparseLearningState]:
        if params is None:
            raise ValueError("sparse_learning's update needs params: call update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        # Inactive weights get -w: zero after optax.apply_updates even if params were never masked (and
        # exactly 0 when they were, so a linear transformation chained after this one keeps them 0).
        updates = _zero_inactive(state.masks, updates, params)
        count = optax.safe_int32_increment(state.count)
        state = dataclasses.replace(state, inner_state=inner_state, count=count)
        if round_every is None:
            return updates, state

        def run_round(operand):
            updates, state = operand
            rate = prune_rate(count) if callable(prune_rate) else prune_rate
            keep, state = round_state(optax.apply_updates(params, updates), state, rate)
            return _zero_inactive(keep, updates, params), state

        return jax.lax.cond(count % round_every == 0, run_round, lambda operand: operand, (updates, state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zero_inactive(masks, updates: Params, params: Params) -> Params:
    """``updates`` where the mask is True, ``-params`` elsewhere (so the weight becomes exactly zero: in
    the wider of the two dtypes, since ``-params`` rounded to bfloat16 updates would not cancel)."""
    def leaf(m, u, p):
        if not is_pruned(m):
            return u
        dtype = jnp.promote_types(u.dtype, p.dtype)
        return jnp.where(like(m, u), u.astype(dtype), -p.astype(dtype))

    return jax.tree.map(leaf, masks, updates, params)


def _placed_like(mask: jax.Array, param: jax.Array) -> jax.Array:
    """A pruned leaf's mask placed like its parameter: a committed array's sharding (eager init), or the
    explicit-axes sharding of a traced one (init under jit). Uncommitted parameters leave the mask
    uncommitted too, so a step compiled for the state's first use serves every later one."""
    if not is_pruned(mask):
        return mask
    if isinstance(param, jax.core.Tracer):
        return like(mask, param)
    if isinstance(param, jax.Array) and param.committed:
        return jax.device_put(mask, param.sharding)
    return mask
