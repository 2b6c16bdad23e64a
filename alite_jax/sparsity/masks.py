"""Masks: which tensors are prunable, how a global budget is split over layers, and mask helpers.

A mask tree is parallel to the parameter tree, a boolean array at every leaf: of the parameter's shape for
a pruned leaf (True: active), a scalar True for every other leaf (biases, normalisation parameters,
relative embeddings). A scalar broadcasts, so ``jax.tree.map(lambda p, m: p * m, params, masks)`` or
``jnp.where(m, g, 0)`` need no special case, and the tree says by itself which leaves are pruned
(:func:`is_pruned`) at no memory cost. Masks are plain arrays, so they jit, shard and checkpoint like the
parameters.

Pruning works on *units*: a single weight (``structure="irregular"``) or a column
(``structure="column"``). A conv kernel (kh, kw, C_in, C_out) has kh*kw*C_in columns and a dense kernel
(C_in, C_out) has C_in, each spanning all C_out outputs (the paper's column of the C_out x (C_in k k)
weight matrix); a column mask is constant along the last axis.
"""

from __future__ import annotations

import functools

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.sparsity.state import Masks, Params, masks_of

STRUCTURES = ("irregular", "column")
DISTRIBUTIONS = ("uniform", "erk")
MASK_STREAM = 0x6D61736B  # "mask": the initial masks' random stream, apart from any key(seed) a model uses

IsPrunable = Callable[[tuple, Any], bool]


def is_pruned(mask: Any) -> bool:
    """Whether a mask leaf belongs to a pruned parameter (an array of its shape; the others are a scalar
    True)."""
    return jnp.ndim(mask) > 0


def not_pruned() -> jax.Array:
    """The mask of a leaf that is not pruned: a scalar True."""
    return jnp.ones((), bool)


def named_keys(path: tuple) -> tuple:
    """A key path without the ``.value`` attribute keys of ``flax.nnx`` variables (``nnx.state`` trees
    hold each array inside a Variable), so 'l1/kernel/value' reads as 'l1/kernel'."""
    return tuple(k for k in path if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def default_is_prunable(path: tuple, leaf: Any) -> bool:
    """Every conv and dense kernel: leaves named ``kernel`` with at least 2 dimensions (Linen's and
    nnx's parameter trees alike).

    That covers the convolutions, the attention projections (query/key/value) and the classifier, and
    leaves out biases, BatchNorm scales and biases and the relative position embeddings (sparse
    momentum's code leaves out only biases and BatchNorm; docs/sparse_learning.md).
    """
    keys = named_keys(path)
    last = keys[-1] if keys else None
    name = getattr(last, "key", getattr(last, "name", None))
    return name == "kernel" and getattr(leaf, "ndim", 0) >= 2


def path_name(path: tuple) -> str:
    """'stage1_block1/conv1/kernel' for a key path."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in named_keys(path))
    return "/".join(str(n) for n in names)


def prunable_tree(params: Params, is_prunable: IsPrunable | Params | None = None) -> Any:
    """A tree of Python bools parallel to ``params``: which leaves are pruned.

    ``is_prunable`` is None (:func:`default_is_prunable`), a callable ``(key_path, leaf) -> bool``, or a
    tree of bools with the structure of ``params``.
    """
    if is_prunable is None or callable(is_prunable):
        fn = is_prunable or default_is_prunable
        return jax.tree_util.tree_map_with_path(lambda p, x: bool(fn(p, x)), params)
    flags = jax.tree.map(bool, is_prunable)
    if jax.tree.structure(flags) != jax.tree.structure(params):
        raise ValueError("is_prunable must be None, a callable (key_path, leaf) -> bool, or a tree of "
                         "bools with the structure of params")
    return flags


def unit_size(shape: tuple[int, ...], structure: str) -> int:
    """Weights per pruning unit: 1 (irregular) or C_out, the last axis (column)."""
    return int(shape[-1]) if structure == "column" else 1


def unit_view(x: jax.Array, structure: str) -> jax.Array:
    """(units, weights per unit) view of a kernel."""
    return x.reshape(-1, unit_size(x.shape, structure))


def channel_units(shape: tuple[int, ...], structure: str) -> int:
    """The fewest active units a kernel of ``shape`` may hold with every output channel (the last axis)
    keeping an active weight: C_out irregular weights, or one column (a column spans every channel)."""
    return int(shape[-1]) if structure == "irregular" else 1


def explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """The sharding of ``x``'s type when it is sharded over explicit mesh axes, else None (unsharded, or
    sharded over automatic axes, where the compiler places the round's intermediates itself)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return None
    return sharding if any(axis is not None for axis in sharding.spec) else None


def gathered(x: jax.Array) -> jax.Array:
    """``x`` replicated if it is sharded over explicit axes (see :func:`explicit_sharding`)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def placed(x: jax.Array, sharding: jax.sharding.NamedSharding | None) -> jax.Array:
    """``x`` resharded to ``sharding`` (None: left as it is)."""
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def like(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``mask`` resharded like ``x`` when ``x`` is sharded over explicit axes (where an elementwise op
    needs its operands sharded alike)."""
    return placed(mask, explicit_sharding(x))


def scale_to_fan_in(params: Params, masks: Masks) -> Params:
    """Masked kernels scaled per output channel by sqrt(fan_in / active fan_in): each channel's weights
    as if drawn by the same initializer for the inputs it really has (Evci et al.'s sparse
    initialisation; docs/sparse_learning.md). A random dense draw masked to density d keeps only d of
    each channel's expected squared norm; for a channel followed by BatchNorm that multiplies its
    effective learning rate (lr / |w|^2) by 1/d. Channels with no active weight stay zero."""
    def scale(m, p):
        if not is_pruned(m):
            return p
        per_channel = m.reshape(-1, m.shape[-1])
        active = jnp.sum(per_channel, axis=0, dtype=jnp.float32)
        factor = jnp.sqrt(per_channel.shape[0] / jnp.maximum(active, 1.0))
        return jnp.where(m, p * factor.astype(p.dtype), jnp.zeros_like(p))

    return jax.tree.map(scale, masks_of(masks, params), params)


def apply_masks(params: Params, masks: Masks) -> Params:
    """Zeroes the inactive weights of ``params`` (leaves that are not pruned are returned as they are).
    ``masks`` may also be an optimizer state that contains a sparse-learning state."""
    return jax.tree.map(lambda m, p: jnp.where(like(m, p), p, jnp.zeros_like(p)) if is_pruned(m) else p,
                        masks_of(masks, params), params)


def count_nonzero_masked(masks: Masks) -> tuple[int, int]:
    """(active, total) weights over the pruned leaves of a mask tree (or of an optimizer state's)."""
    leaves = [m for m in jax.tree.leaves(masks_of(masks)) if is_pruned(m)]
    active = sum(int(jnp.sum(m)) for m in leaves)
    total = sum(int(np.prod(m.shape)) for m in leaves)
    return active, total


def global_density(masks: Masks) -> float:
    """Fraction of prunable weights that are active, from a mask tree or an optimizer state (a Python
    float: call it outside jit)."""
    active, total = count_nonzero_masked(masks)
    return active / max(total, 1)


def layer_densities(masks: Masks) -> dict[str, float]:
    """{'stage1_block1/conv1/kernel': density, ...} for every pruned leaf, in tree order, from a mask
    tree or an optimizer state."""
    flat, _ = jax.tree_util.tree_flatten_with_path(masks_of(masks))
    return {path_name(p): float(jnp.mean(m)) for p, m in flat if is_pruned(m)}


# --------------------------------------------------------------------------------------------------
# Splitting an integer budget over layers.
# --------------------------------------------------------------------------------------------------


def allocate(share: jax.Array, room: jax.Array, unit: jax.Array, deficit: jax.Array,
             rounds: int = 8) -> jax.Array:
    """Splits ``deficit`` weights over layers in whole units, in proportion to ``share``.

    Args:
      share: (L,) non-negative floats, the wanted proportions (need not sum to 1; all zero means
        proportional to room).
      room: (L,) int, units each layer can still take.
      unit: (L,) int, weights per unit of each layer.
      deficit: int, weights to hand out.
    Returns:
      (L,) int units per layer, 0 <= g <= room, with sum(g * unit) <= deficit. Layers that hit their room
      pass the excess on: a few rounds of proportional water-filling, then an exact greedy fill in
      order of share. With unit 1 everywhere (and enough room) the sum is exactly ``deficit``; with
      larger units it falls short by less than the smallest unit among layers with room left.
    """
    room = room.astype(jnp.int32)
    unit = unit.astype(jnp.int32)
    given = jnp.zeros_like(room)
    share = share.astype(jnp.float32)
    for _ in range(rounds):
        remaining = deficit - jnp.sum(given * unit)
        open_ = given < room
        s = jnp.where(open_, share, 0.0)
        s = jnp.where(jnp.sum(s) > 0, s, jnp.where(open_, (room - given).astype(jnp.float32), 0.0))
        s = s / jnp.maximum(jnp.sum(s), 1e-30)
        want = jnp.floor(s * remaining.astype(jnp.float32) / unit).astype(jnp.int32)
        given = given + jnp.clip(want, 0, room - given)
    order = jnp.argsort(-share, stable=True)

    # Float rounding can overshoot by a unit or two on large budgets: take it back from the layers of
    # smallest share first; then hand out what is left exactly, in order of share.
    def trim(over, i):
        back = jnp.clip((over + unit[i] - 1) // unit[i], 0, given[i])
        return over - back * unit[i], back

    _, back = jax.lax.scan(trim, jnp.sum(given * unit) - deficit, order[::-1])
    given = given.at[order[::-1]].add(-back)

    def fill(remaining, i):
        take = jnp.minimum(room[i] - given[i], remaining // unit[i])
        return remaining - take * unit[i], take

    _, extra = jax.lax.scan(fill, deficit - jnp.sum(given * unit), order)
    return given.at[order].add(extra)


def rank_of(score: jax.Array) -> jax.Array:
    """Position of each element in ascending order of ``score``; ties broken by index."""
    order = jnp.argsort(score, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(score.shape[0], dtype=order.dtype))


def distribution_shares(shapes: list[tuple[int, ...]], distribution: str) -> np.ndarray:
    """Per-layer proportions of the budget: uniform (by size) or Erdos-Renyi-Kernel (RigL; see the sources
    in docs/sparse_learning.md).

    Uniform gives every layer the same density. ERK makes a layer's density proportional to
    sum(shape) / prod(shape), so its share of weights is proportional to sum(shape); layers that would
    exceed density 1 are capped by :func:`allocate`'s water-filling, which passes their excess on.
    """
    if distribution == "uniform":
        return np.array([np.prod(s) for s in shapes], np.float64)
    if distribution == "erk":
        return np.array([np.sum(s) for s in shapes], np.float64)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def layer_units(params: Params, density: float, structure: str = "irregular",
                distribution: str = "uniform", is_prunable: IsPrunable | Params | None = None,
                keep_channels: bool = True) -> tuple[tuple[int, ...], int]:
    """The initial active units of every prunable leaf (in tree order), and the global budget.

    The budget is round(density x prunable weights); per-layer counts follow ``distribution``. With
    ``keep_channels`` every leaf gets at least :func:`channel_units` (one weight per output channel, for
    irregular masks): layers below that are raised to it, and the units this takes come from the layers
    with the most to spare, so the budget stays exact. Computed from the shapes alone, so the counts are
    Python ints even when called under ``jax.jit``.
    """
    flags = prunable_tree(params, is_prunable)
    shapes = [tuple(x.shape) for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(flags)) if f]
    if any(not s for s in shapes):
        raise ValueError("is_prunable selects a scalar parameter; a pruned parameter needs at least one "
                         "dimension (its mask is an array of its shape, a scalar mask means 'not pruned')")
    if not shapes:
        raise ValueError("no parameter is prunable: check is_prunable (the default prunes leaves named "
                         "'kernel' with at least 2 dimensions)")
    total = int(sum(np.prod(s) for s in shapes))
    budget = int(round(density * total))
    if budget >= 2 ** 31:
        raise ValueError(f"a budget of {budget} active weights does not fit the int32 counts of the masks' "
                         "bookkeeping: prune fewer parameters (is_prunable) or lower the density")
    units = np.array([np.prod(s) // unit_size(s, structure) for s in shapes], np.int32)
    sizes = np.array([unit_size(s, structure) for s in shapes], np.int32)
    with jax.ensure_compile_time_eval():  # shapes only: concrete even under an outer jit
        counts = allocate(jnp.asarray(distribution_shares(shapes, distribution), jnp.float32),
                          jnp.asarray(units), jnp.asarray(sizes), jnp.int32(budget))
    counts = np.asarray(counts, np.int64)
    if keep_channels:
        floors = np.array([channel_units(s, structure) for s in shapes], np.int64)
        counts = raise_to_floors(counts, floors, sizes, budget)
    return tuple(int(c) for c in counts), budget


def raise_to_floors(counts: np.ndarray, floors: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """``counts`` (units per layer) with every layer raised to its floor, the weights that takes removed
    from the layers holding the most weights above their floors (in whole units: exact for single
    weights, within a column for columns).

    Raises ValueError when the floors alone need more weights than the budget."""
    need = int(np.sum(floors * sizes))
    if need > budget:
        raise ValueError(f"the density leaves {budget} active weights, fewer than the {need} that keep one "
                         f"weight in every output channel of every pruned layer: raise the density, or "
                         f"let channels empty (keep_channels=False)")
    given = int(np.sum(counts * sizes))
    counts = np.maximum(counts, floors)
    excess = int(np.sum(counts * sizes)) - given
    spare = (counts - floors) * sizes
    while excess > 0:
        j = int(np.argmax(spare))
        take = min(int(counts[j] - floors[j]), -(-excess // int(sizes[j])))
        counts[j] -= take
        spare[j] -= take * sizes[j]
        excess -= take * int(sizes[j])
    return counts


def draw_masks(params: Params, counts: tuple[int, ...], structure: str = "irregular",
               is_prunable: IsPrunable | Params | None = None, seed: int = 0,
               keep_channels: bool = True) -> Masks:
    """Random masks with ``counts[j]`` active units in the j-th prunable leaf (tree order), drawn
    uniformly at random inside each leaf (``counts`` from :func:`layer_units`). With ``keep_channels``
    (irregular masks) every output channel gets one of them first, at random among its weights, so no
    channel starts empty (``counts`` must then be at least C_out)."""
    flags = jax.tree.leaves(prunable_tree(params, is_prunable))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    idx = [i for i, f in enumerate(flags) if f]
    if len(idx) != len(counts):
        raise ValueError(f"{len(counts)} counts for {len(idx)} prunable leaves")
    shapes = tuple(tuple(flat[i][1].shape) for i in idx)
    for i, shape, count in zip(idx, shapes, counts):
        if keep_channels and count < channel_units(shape, structure):
            raise ValueError(f"{path_name(flat[i][0])} gets {count} active units but has {shape[-1]} output "
                             f"channels, each of which keeps a weight (keep_channels): take the counts "
                             f"from layer_units(..., keep_channels=True)")
    drawn = iter(draw_leaf_masks(seed, shapes, tuple(int(c) for c in counts), structure,
                                 bool(keep_channels)))
    masks = [not_pruned() for _ in flat]
    for i in idx:
        masks[i] = next(drawn)
    return jax.tree.unflatten(treedef, masks)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def draw_leaf_masks(seed: int | jax.Array, shapes: tuple[tuple[int, ...], ...], counts: tuple[int, ...],
                    structure: str, keep_channels: bool = False) -> list[jax.Array]:
    """:func:`draw_masks`' draws, one program for all leaves (eagerly, every leaf shape compiled its own
    draw and ranking)."""
    # Folded with a constant: a model initialised from jax.random.key(seed) split the same way would
    # otherwise draw its weights from the masks' bits (normal draws are monotone in the uniform ones),
    # and every layer would keep only its most negative weights.
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), MASK_STREAM), len(shapes))
    masks = []
    for j, shape in enumerate(shapes):
        size = unit_size(shape, structure)
        units = int(np.prod(shape)) // size
        score = jax.random.uniform(keys[j], (units,))
        if keep_channels and structure == "irregular":
            # Each channel's lowest draw goes first: scores below 0 rank before every other weight.
            per_channel = score.reshape(-1, shape[-1])
            first = jnp.arange(per_channel.shape[0])[:, None] == jnp.argmin(per_channel, axis=0)[None, :]
            score = jnp.where(first, per_channel - 1.0, per_channel).reshape(-1)
        active = rank_of(score) < counts[j]
        masks.append(jnp.broadcast_to(active[:, None], (units, size)).reshape(shape))
    return masks


def init_masks(params: Params, density: float, structure: str = "irregular",
               distribution: str = "uniform", is_prunable: IsPrunable | Params | None = None,
               seed: int = 0, keep_channels: bool = True) -> tuple[Masks, int]:
    """Random masks meeting the global budget, and the budget: round(density x prunable weights).

    Per-layer counts follow ``distribution`` (:func:`layer_units`); inside a layer the active units are
    drawn uniformly at random (:func:`draw_masks`), with ``keep_channels`` one per output channel first.
    Irregular masks meet the budget exactly; column masks come as close as whole columns allow (short
    by less than the smallest column among layers with room).
    """
    counts, budget = layer_units(params, density, structure, distribution, is_prunable, keep_channels)
    return draw_masks(params, counts, structure, is_prunable, seed, keep_channels), budget
