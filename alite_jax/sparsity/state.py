"""The state of :func:`alite_jax.sparsity.sparse_learning`, and finding it (and the inner optimizer's
momentum) inside the state of any optax composition: a chain, ``MultiSteps``, ``inject_hyperparams``,
``multi_transform`` / ``partition``, ``masked``.

Everything a round reads is an array of the state except ``structure``, which decides the shapes the
round works on: two states that differ in density, seed, floor or any switch of the round have the same
tree structure (and one compiled step serves them); only irregular and column states differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import optax

Params = Any
Masks = Any

MOMENTUM_FIELDS = ("trace", "mu")  # optax.TraceState.trace; ScaleByAdamState.mu, ScaleByLionState.mu, ...


@dataclasses.dataclass(frozen=True)
class SparseLearningState:
    """State of :func:`alite_jax.sparsity.sparse_learning`.

    Attributes:
      masks: booleans parallel to params: for a pruned leaf an array of its shape (True: active), for
        every other leaf a scalar True (it broadcasts: ``jnp.where(m, p, 0)`` and ``p * m`` keep it).
      inner_state: the inner optimizer's state.
      count: int32, the updates made so far (in-update rounds run when it reaches a multiple of
        ``round_every``).
      budget: int32, the global number of active prunable weights, round(density x prunable weights).
      min_units: int32 (pruned leaves,), in tree order: the fewest active units a round leaves a layer.
      redistribute: bool, regrowth follows the layers' momentum (True) or refills what each pruned.
      reset_regrown_momentum: bool, regrown weights restart with zero momentum.
      keep_channels: bool, (irregular) a round never prunes an output channel's last active weight.
      structure: "irregular" or "column" (static: it decides the shapes of a round's units).
    """

    masks: Masks
    inner_state: optax.OptState
    count: jax.Array
    budget: jax.Array
    min_units: jax.Array
    redistribute: jax.Array
    reset_regrown_momentum: jax.Array
    keep_channels: jax.Array
    structure: str = "irregular"


jax.tree_util.register_dataclass(
    SparseLearningState,
    data_fields=["masks", "inner_state", "count", "budget", "min_units", "redistribute",
                 "reset_regrown_momentum", "keep_channels"],
    meta_fields=["structure"])


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


def search_state(state: Any) -> SparseLearningState | None:
    """The :class:`SparseLearningState` inside ``state``, or None.

    Raises:
      ValueError: ``state`` holds more than one (e.g. ``optax.partition`` with a ``sparse_learning`` per
        group): masks, densities and rounds are defined over one budget.
    """
    found, stack = [], [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, SparseLearningState):
            found.append(node)
        else:
            stack.extend(c for _, c in _children(node))
    if len(found) > 1:
        raise ValueError(f"this optimizer state holds {len(found)} sparse_learning states; "
                         "alite_jax.sparsity works with one (one global budget): wrap the optimizer once and "
                         "choose the pruned leaves with its is_prunable, or keep the groups' states apart")
    return found[0] if found else None


def find_state(state: optax.OptState) -> SparseLearningState:
    """The :class:`SparseLearningState` inside an optimizer state (e.g. one element of a chain's)."""
    found = search_state(state)
    if found is None:
        raise ValueError("no SparseLearningState in this optimizer state: was it built with "
                         "alite_jax.sparsity.sparse_learning?")
    return found


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


def is_masked_node(x: Any) -> bool:
    """``is_leaf`` for optax's ``MaskedNode``: what ``optax.masked`` and ``optax.multi_transform`` put in
    place of the parameters a transformation does not see."""
    return isinstance(x, optax.MaskedNode)


def fill_masked(masks: Masks, params: Params) -> Masks:
    """``masks`` with every ``MaskedNode`` replaced by True masks for the parameters it stands for."""
    true = lambda p: jax.tree.map(lambda _: jax.numpy.ones((), bool), p)  # noqa: E731
    return jax.tree.map(lambda m, p: true(p) if is_masked_node(m) else m, masks, params,
                        is_leaf=is_masked_node)


def restrict(params: Params, masks: Masks) -> Params:
    """``params`` as the sparse transformation saw them: ``MaskedNode`` where its masks have one."""
    return jax.tree.map(lambda m, p: m if is_masked_node(m) else p, masks, params, is_leaf=is_masked_node)


def merge(view: Params, params: Params, masks: Masks) -> Params:
    """The inverse of :func:`restrict`: ``view``'s leaves, and ``params``' where the masks have a
    ``MaskedNode``."""
    return jax.tree.map(lambda m, v, p: p if is_masked_node(m) else v, masks, view, params,
                        is_leaf=is_masked_node)


def masks_of(tree: Any, params: Params | None = None) -> Masks:
    """The masks of an optimizer state that contains a :class:`SparseLearningState`; any other tree is
    taken to be a mask tree. Given ``params``, the ``MaskedNode`` places (``optax.masked``,
    ``optax.multi_transform``) become True, so the masks match ``params``."""
    found = search_state(tree)
    masks = tree if found is None else found.masks
    return masks if params is None else fill_masked(masks, params)


def get_masks(state: optax.OptState, params: Params | None = None) -> Masks:
    """The masks of a sparse-learning state, or of any optimizer state that contains one.

    Under ``optax.masked`` or ``optax.multi_transform`` the sparse transformation sees only its own
    group, and its masks hold optax's ``MaskedNode`` where the other groups' parameters are. Given
    ``params`` (the whole tree), those places become True (not pruned), so the masks match ``params``.
    """
    return masks_of(find_state(state), params)
