"""``sparse_learning``: sparse training as an optax wrapper whose state carries the masks.

The wrapper (jaxpruner style) feeds the DENSE gradient to the inner optimizer, so its momentum keeps
accumulating for inactive weights (the regrowth signal of sparse momentum, Dettmers & Zettlemoyer 2019),
and returns updates that keep inactive weights exactly zero. Masks live in the optimizer state, so they
are checkpointed and sharded with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import optax

from alite_jax.sparsity.masks import (DISTRIBUTIONS, STRUCTURES, IsPrunable, Masks, Params, _is_none,
                                      init_masks)

MOMENTUM_FIELDS = ("trace", "mu")  # optax.TraceState.trace; ScaleByAdamState.mu, ScaleByLionState.mu, ...


@dataclasses.dataclass(frozen=True)
class SparseLearningState:
    """State of :func:`sparse_learning`.

    Attributes:
      masks: booleans parallel to params (None for leaves that are not pruned).
      inner_state: the inner optimizer's state.
      structure: "irregular" or "column" (static).
      budget: the global number of active prunable weights, round(density x prunable weights) (static).
    """

    masks: Masks
    inner_state: optax.OptState
    structure: str
    budget: int


jax.tree_util.register_dataclass(SparseLearningState, data_fields=["masks", "inner_state"],
                                 meta_fields=["structure", "budget"])


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, SparseLearningState):
        yield node.inner_state
    elif isinstance(node, (tuple, list)):
        yield from node
    elif isinstance(node, dict):
        yield from node.values()


def find_momentum(inner_state: optax.OptState, params: Params) -> Params:
    """The inner optimizer's momentum / first-moment tree (a ``trace`` or ``mu`` parallel to params).

    Raises:
      ValueError: the inner optimizer keeps no such trace (e.g. plain optax.sgd without momentum).
    """
    target = jax.tree.structure(params)
    stack = [inner_state]
    while stack:
        node = stack.pop(0)
        for field in MOMENTUM_FIELDS:
            value = getattr(node, field, None) if hasattr(node, "_fields") else None
            if value is not None and jax.tree.structure(value) == target:
                return value
        stack.extend(_children(node))
    raise ValueError(
        "sparse_learning regrows weights by their momentum, but the inner optimizer keeps no momentum / "
        f"first-moment trace parallel to the parameters (no field named {MOMENTUM_FIELDS} in its "
        "state). Use one that does, e.g. optax.sgd(lr, momentum=0.9), optax.sgd(lr, momentum=0.9, "
        "nesterov=True), optax.adam(lr) or optax.adamw(lr).")


def find_state(state: optax.OptState) -> SparseLearningState:
    """The :class:`SparseLearningState` inside an optimizer state (e.g. one element of a chain's)."""
    stack = [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, SparseLearningState):
            return node
        stack.extend(_children(node))
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
                    is_prunable: IsPrunable | Params | None = None,
                    seed: int = 0) -> optax.GradientTransformation:
    """Wraps ``inner`` so that training keeps a global fraction ``density`` of the prunable weights.

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

    def init_fn(params: Params) -> SparseLearningState:
        inner_state = inner.init(params)
        find_momentum(inner_state, params)  # fail now, not at the end of the first epoch
        masks, budget = init_masks(params, density, structure, distribution, is_prunable, seed)
        return SparseLearningState(masks, inner_state, structure, budget)

    def update_fn(updates: Params, state: SparseLearningState,
                  params: Params | None = None) -> tuple[Params, SparseLearningState]:
        if params is None:
            raise ValueError("sparse_learning's update needs params: call update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner_state, params)
        # Inactive weights get -w: zero after optax.apply_updates even if params were never masked
        # (and exactly 0 when they were, so later linear transforms such as weight decay keep them 0).
        updates = jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
                               state.masks, updates, params, is_leaf=_is_none)
        return updates, dataclasses.replace(state, inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
