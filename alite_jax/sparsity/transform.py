"""``sparse_learning``: sparse training as an optax wrapper whose state carries the masks.

The wrapper (jaxpruner style) feeds the DENSE gradient to the inner optimizer, so its momentum keeps
accumulating for inactive weights (the regrowth signal of sparse momentum, Dettmers & Zettlemoyer 2019),
and returns updates that keep inactive weights exactly zero. Masks live in the optimizer state, so they
are checkpointed and sharded with it. docs/sparse_learning.md gives the sources and the defaults' reasons.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import optax

from alite_jax.sparsity.masks import (DISTRIBUTIONS, STRUCTURES, IsPrunable, Masks, Params, is_none,
                                      channel_units, draw_masks, layer_units)

REDISTRIBUTIONS = ("momentum", "none")

MOMENTUM_FIELDS = ("trace", "mu")  # optax.TraceState.trace; ScaleByAdamState.mu, ScaleByLionState.mu, ...


@dataclasses.dataclass(frozen=True)
class SparseLearningState:
    """State of :func:`sparse_learning`.

    The arrays (masks, inner state) are the pytree's leaves; the rest is static configuration that
    :func:`alite_jax.sparsity.prune_and_regrow` reads, fixed by :func:`sparse_learning`.

    Attributes:
      masks: booleans parallel to params (None for leaves that are not pruned).
      inner_state: the inner optimizer's state.
      structure: "irregular" or "column" (static).
      budget: the global number of active prunable weights, round(density x prunable weights) (static).
      min_units: per prunable leaf (tree order), the fewest active units prune/regrow leaves it (static).
      redistribution: "momentum" or "none" (static; see :func:`sparse_learning`).
      reset_regrown_momentum: whether regrown weights restart with zero momentum (static).
      keep_channels: whether every output channel keeps an active weight (irregular; static).
    """

    masks: Masks
    inner_state: optax.OptState
    structure: str
    budget: int
    min_units: tuple[int, ...]
    redistribution: str
    reset_regrown_momentum: bool
    keep_channels: bool = True


jax.tree_util.register_dataclass(
    SparseLearningState, data_fields=["masks", "inner_state"],
    meta_fields=["structure", "budget", "min_units", "redistribution", "reset_regrown_momentum",
                 "keep_channels"])


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of an optimizer-state node: tuple/list index, dict key, or the inner state."""
    if isinstance(node, SparseLearningState):
        yield "inner_state", node.inner_state
    elif isinstance(node, (tuple, list)):
        yield from enumerate(node)
    elif isinstance(node, dict):
        yield from node.items()


def _momentum_path(inner_state: optax.OptState, params: Params) -> tuple[tuple[Any, ...], str]:
    """Where the momentum / first-moment trace lives: (keys from the root to its node, field name).

    The first node (breadth first) with a field named as in MOMENTUM_FIELDS whose value is a tree
    parallel to ``params``.
    """
    target = jax.tree.structure(params)
    queue = [((), inner_state)]
    while queue:
        path, node = queue.pop(0)
        for field in MOMENTUM_FIELDS:
            value = getattr(node, field, None) if hasattr(node, "_fields") else None
            if value is not None and jax.tree.structure(value) == target:
                return path, field
        queue.extend((path + (k,), c) for k, c in _children(node))
    raise ValueError(
        "sparse_learning regrows weights by their momentum, but the inner optimizer keeps no momentum / "
        f"first-moment trace parallel to the parameters (no field named {MOMENTUM_FIELDS} in its "
        "state). Use one that does, e.g. optax.sgd(lr, momentum=0.9), optax.sgd(lr, momentum=0.9, "
        "nesterov=True), optax.adam(lr) or optax.adamw(lr).")


def find_momentum(inner_state: optax.OptState, params: Params) -> Params:
    """The inner optimizer's momentum / first-moment tree (a ``trace`` or ``mu`` parallel to params).

    Raises:
      ValueError: the inner optimizer keeps no such trace (e.g. plain optax.sgd without momentum).
    """
    path, field = _momentum_path(inner_state, params)
    node = inner_state
    for key in path:
        node = node.inner_state if isinstance(node, SparseLearningState) else node[key]
    return getattr(node, field)


def replace_momentum(inner_state: optax.OptState, params: Params, momentum: Params) -> optax.OptState:
    """``inner_state`` with the trace :func:`find_momentum` finds replaced by ``momentum``."""
    path, field = _momentum_path(inner_state, params)

    def rebuild(node, keys):
        if not keys:
            return node._replace(**{field: momentum})
        key, rest = keys[0], keys[1:]
        if isinstance(node, SparseLearningState):
            return dataclasses.replace(node, inner_state=rebuild(node.inner_state, rest))
        if isinstance(node, dict):
            return type(node)({k: rebuild(v, rest) if k == key else v for k, v in node.items()})
        items = [rebuild(c, rest) if i == key else c for i, c in enumerate(node)]
        return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)

    return rebuild(inner_state, path)


def find_state(state: optax.OptState) -> SparseLearningState:
    """The :class:`SparseLearningState` inside an optimizer state (e.g. one element of a chain's)."""
    stack = [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, SparseLearningState):
            return node
        stack.extend(c for _, c in _children(node))
    raise ValueError("no SparseLearningState in this optimizer state: was it built with "
                     "alite_jax.sparsity.sparse_learning?")


def replace_state(state: optax.OptState, new: SparseLearningState) -> optax.OptState:
    """``state`` with its :class:`SparseLearningState` replaced by ``new``."""
    if isinstance(state, SparseLearningState):
        return new
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(replace_state(s, new) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(replace_state(s, new) for s in state)
    if isinstance(state, dict):
        return type(state)({k: replace_state(v, new) for k, v in state.items()})
    return state


def get_masks(state: optax.OptState) -> Masks:
    """The masks of a sparse-learning state (or of any optimizer state that contains one)."""
    return find_state(state).masks


def sparse_learning(inner: optax.GradientTransformation, *, density: float,
                    structure: str = "irregular", distribution: str = "uniform",
                    is_prunable: IsPrunable | Params | None = None, seed: int = 0,
                    redistribution: str = "momentum", min_layer_fraction: float = 0.25,
                    reset_regrown_momentum: bool = True,
                    keep_channels: bool = True) -> optax.GradientTransformation:
    """Wraps ``inner`` so that training keeps a global fraction ``density`` of the prunable weights.

    The options after ``seed`` choose how :func:`alite_jax.sparsity.prune_and_regrow` moves the budget
    (docs/sparse_learning.md says why the defaults are what they are, with the measurements).

    Args:
      inner: the optimizer; it must keep a momentum / first-moment trace (sgd with momentum, nesterov,
        adam, adamw, lion, ...), which :func:`prune_and_regrow` uses to regrow weights. It may itself
        be a chain (e.g. with ``optax.add_decayed_weights``).
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
    Returns:
      A GradientTransformation. ``init(params)`` draws the masks (apply them to the parameters with
      :func:`apply_masks`); ``update(grads, state, params)`` needs ``params``.
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

    def init_fn(params: Params) -> SparseLearningState:
        inner_state = inner.init(params)
        find_momentum(inner_state, params)  # fail now, not at the end of the first epoch
        units, budget = layer_units(params, density, structure, distribution, is_prunable, keep_channels)
        masks = draw_masks(params, units, structure, is_prunable, seed, keep_channels)
        channels = [channel_units(m.shape, structure) if keep_channels else 1
                    for m in jax.tree.leaves(masks)]
        min_units = tuple(min(u, max(c, math.ceil(min_layer_fraction * u))) for u, c in zip(units, channels))
        return SparseLearningState(masks, inner_state, structure, budget, min_units, redistribution,
                                   bool(reset_regrown_momentum), bool(keep_channels))

    def update_fn(updates: Params, state: SparseLearningState,
                  params: Params | None = None) -> tuple[Params, SparseLearningState]:
        if params is None:
            raise ValueError("sparse_learning's update needs params: call update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner_state, params)
        # Inactive weights get -w: zero after optax.apply_updates even if params were never masked
        # (and exactly 0 when they were, so later linear transforms such as weight decay keep them 0).
        updates = jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                               state.masks, updates, params, is_leaf=is_none)
        return updates, dataclasses.replace(state, inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
