"""sparse_learning among optax's other pieces: in-update rounds against rounds run from outside the step,
extra arguments, compositions (chain, MultiSteps, inject_hyperparams, partition, masked), masks mapped
like the parameters, flax.nnx.Optimizer, lax.scan, a sharded jit on 8 devices and orbax.

Every check compares with a computation made another way (the rounds from outside, the inner optimizer
alone, numpy, an unsharded run). Parameters are tiny and the updates with a round are compiled once per
configuration (``in_update``) and shared by the tests, so the file runs in seconds.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alite_jax import sparsity
from alite_jax.sparsity.masks import path_name
from alite_jax.sparsity.state import find_momentum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, P0, DENSITY = 12, 3, 0.5, 0.3  # in-update rounds at updates 3, 6, 9 (and 12, at rate 0)
KERNELS = ("conv", "dense", "head")
PRUNABLE = 3 * 3 * 4 * 8 + 72 * 16 + 16 * 5


def committed(tree):
    """``tree`` placed on the first device. Arrays made outside jit (init's) are uncommitted and a jitted
    step's outputs committed, and jit compiles its function again for the other kind: committing them
    first makes the first step's program the only one."""
    return jax.device_put(tree, jax.devices()[0])


def small_params(seed=0):
    """Three prunable kernels (conv, dense, a bias-free head) and two biases that are not pruned."""
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32))
    return committed({"conv": {"kernel": f(3, 3, 4, 8), "bias": f(8)},
                      "dense": {"kernel": f(72, 16), "bias": f(16)}, "head": {"kernel": f(16, 5)}})


def sgd(lr=0.1):
    return optax.sgd(lr, momentum=0.9)


def noise_grads(params, k):
    """The gradient at step k of sum(|p|^2 / 4 - <n_k, p>): 0.5 p - n_k, n_k drawn from key(k) and the
    leaf's path, so a sub-tree of the parameters gets the same gradient as in the whole tree."""
    def leaf(path, p):
        key = jax.random.fold_in(jax.random.key(k), zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31)
        return 0.5 * p - jax.random.normal(key, p.shape, p.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


grads_at = jax.jit(noise_grads)
apply_updates = jax.jit(optax.apply_updates)


def in_update_tx(structure):
    return sparsity.sparse_learning(sgd(), density=DENSITY, structure=structure, round_every=EVERY,
                                    prune_rate=sparsity.round_prune_rate(P0, STEPS, EVERY))


@functools.cache
def in_update(structure):
    """The transformation with in-update rounds and its jitted update: compiled once for the file."""
    tx = in_update_tx(structure)
    return tx, jax.jit(tx.update)


def start(tx, params=None):
    params = small_params() if params is None else params
    state = tx.init(params)
    return committed((sparsity.apply_masks(params, sparsity.get_masks(state, params)), state))


def step_with(update, params, state, k, grads=None, **extra_args):
    grads = grads_at(params, k) if grads is None else grads
    updates, state = update(grads, state, params, **extra_args)
    return apply_updates(params, updates), state


def assert_trees_equal(a, b, what=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, f"{what}{jax.tree_util.keystr(path)}"
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def assert_trees_match(a, b, what="", updates=1):
    """Two runs of the same arithmetic in different programs (the round inside the update or outside it,
    under a wrapper or alone, scanned or looped): booleans and integers equal, floats within the rounding
    the two programs may differ by. XLA fuses each program its own way, and the CPU's vector code may
    contract a multiply and an add into one rounding or not (compilers and CPUs differ), so each float
    operation may round differently by half a unit in the last place (ulp). An update of momentum SGD
    rounds about 4 operations per weight, and the momentum carries every earlier difference into later
    updates scaled by at most sum(0.9^j) = 10: after n updates at most 4 * 10 * n ulps of the leaf's
    largest magnitude. A wrong mean, count, mask or round moves weights by a fraction of an update,
    about 1e-2 of their magnitude, or more, 1e3 times this bound at n = 12."""
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert x.dtype == y.dtype, name
        if not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=name)
            continue
        bound = 40 * updates * np.finfo(x.dtype).eps * max(float(np.max(np.abs(x), initial=0.0)), 1e-30)
        np.testing.assert_allclose(x, y, rtol=0, atol=bound, err_msg=name)


def assert_trees_close(a, b, what=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def trees_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def by_name(tree):
    """{'l1/kernel': leaf, ...}: trees of different node types (an nnx.State, dicts) compared by path."""
    return {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def momentum_of(state, params):
    return find_momentum(sparsity.find_state(state).inner_state, params)


def assert_inactive_zero(params, masks):
    pruned = 0
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params)):
        if sparsity.is_pruned(m):
            pruned += 1
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    assert pruned > 0


def assert_at_budget(state, structure="irregular"):
    """Irregular masks hold exactly the budget; column masks come within a column of it."""
    sparse = sparsity.find_state(state)
    masks = [m for m in jax.tree.leaves(sparse.masks) if sparsity.is_pruned(m)]
    short = int(sparse.budget) - sum(int(np.sum(m)) for m in masks)
    assert short == 0 if structure == "irregular" else 0 <= short < min(m.shape[-1] for m in masks), short


# ---------------------------------------------------------------------------------------------
# In-update rounds against the trainer's rounds from outside the step; lax.scan; orbax.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("structure", sparsity.STRUCTURES)
def test_in_update_rounds_equal_rounds_from_outside(structure):
    """(A) rounds inside update every EVERY updates; (B) no rounds inside, prune_and_regrow after every
    "epoch" of EVERY steps but the last, at the trainer's per-epoch rate. The same gradients: masks,
    parameters and momentum agree after every step (to the rounding two programs may differ by:
    :func:`assert_trees_match`; measured: bit for bit on AMD EPYC with XLA's default code)."""
    tx_a, update_a = in_update(structure)
    tx_b = sparsity.sparse_learning(sgd(), density=DENSITY, structure=structure)
    update_b = jax.jit(tx_b.update)
    epochs = STEPS // EVERY
    rate = sparsity.prune_rate_schedule(P0, epochs, steps_per_epoch=EVERY)
    (pa, sa), (pb, sb) = start(tx_a), start(tx_b)
    assert_trees_equal(sparsity.get_masks(sa), sparsity.get_masks(sb))
    moved_at = []
    for k in range(STEPS):
        before = sparsity.get_masks(sa)
        grads = grads_at(pa, k)
        pa, sa = step_with(update_a, pa, sa, k, grads)
        pb, sb = step_with(update_b, pb, sb, k, grads)
        epoch, into_epoch = divmod(k + 1, EVERY)
        if into_epoch == 0 and epoch < epochs:  # the round after epoch e = epoch - 1, for e < E - 1
            pb, sb = sparsity.prune_and_regrow(pb, sb, rate(epoch - 1))
        assert_trees_equal(sparsity.get_masks(sa), sparsity.get_masks(sb), f"masks, step {k + 1}: ")
        assert_trees_match(pa, pb, f"params, step {k + 1}: ", k + 1)
        assert_trees_match(momentum_of(sa, pa), momentum_of(sb, pb), f"momentum, step {k + 1}: ", k + 1)
        assert int(sa.count) == int(sb.count) == k + 1
        assert_at_budget(sa, structure)
        assert_inactive_zero(pa, sparsity.get_masks(sa))
        if not trees_equal(before, sparsity.get_masks(sa)):
            moved_at.append(k + 1)
    # Every round moved the masks, and nothing else did (the last, at update 12, has rate 0).
    assert moved_at == [3, 6, 9]


@pytest.mark.slow
def test_scan_over_steps_equals_the_loop_of_jitted_steps():
    tx, update = in_update("irregular")
    params, state = start(tx)
    loop = (params, state)
    for k in range(STEPS):
        loop = step_with(update, *loop, k)

    def body(carry, k):
        p, s = carry
        u, s = tx.update(noise_grads(p, k), s, p)
        return (optax.apply_updates(p, u), s), None

    scanned = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), jnp.arange(STEPS))[0])(params, state)
    assert not trees_equal(sparsity.get_masks(state), sparsity.get_masks(loop[1]))  # rounds ran
    assert_trees_match(loop, scanned, updates=STEPS)


@pytest.mark.slow
def test_orbax_round_trip_mid_training_continues_identically(tmp_path):
    import orbax.checkpoint as ocp

    tx, update = in_update("irregular")
    params, state = start(tx)
    masks0 = sparsity.get_masks(state)
    for k in range(7):  # the rounds at updates 3 and 6 have run
        params, state = step_with(update, params, state, k)
    assert not trees_equal(masks0, sparsity.get_masks(state))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        checkpointer.wait_until_finished()
        target = jax.eval_shape(lambda: {"params": params, "opt_state": state})
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert isinstance(restored["opt_state"], sparsity.SparseLearningState)
    assert restored["opt_state"].structure == "irregular"
    assert_trees_equal(restored, {"params": params, "opt_state": state})
    original, resumed = (params, state), (restored["params"], restored["opt_state"])
    for k in range(7, STEPS):  # the round at update 9 and the rate-0 one at 12
        original = step_with(update, *original, k)
        resumed = step_with(update, *resumed, k)
    assert_trees_equal(original, resumed)
    assert int(resumed[1].count) == STEPS


# ---------------------------------------------------------------------------------------------
# Extra arguments.
# ---------------------------------------------------------------------------------------------


class ReceivedState(NamedTuple):
    factor: jax.Array


def scale_by_factor():
    """Multiplies the updates by ``update``'s keyword ``factor`` (required) and keeps the last one."""
    def update(updates, state, params=None, *, factor, **extra_args):
        del state, params, extra_args
        return jax.tree.map(lambda u: u * factor, updates), ReceivedState(jnp.asarray(factor, jnp.float32))

    return optax.GradientTransformationExtraArgs(lambda params: ReceivedState(jnp.zeros(())), update)


def test_extra_arguments_reach_the_inner_optimizer():
    inner = optax.chain(sgd(), scale_by_factor())
    tx = sparsity.sparse_learning(inner, density=DENSITY)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    # Inside an outer chain too: the chain passes it to the wrapper, the wrapper to its inner chain.
    outer = optax.chain(optax.clip_by_global_norm(1e9), tx)  # clips nothing
    params, state = start(outer)
    masks = sparsity.get_masks(state)
    grads = grads_at(params, 0)
    updates, new_state = jax.jit(outer.update)(grads, state, params, factor=0.5)
    assert float(sparsity.find_state(new_state).inner_state[1].factor) == 0.5
    # Momentum SGD's first step by hand, times the factor where active; -w (0 here) elsewhere.
    for m, u, g, p in zip(*(jax.tree.leaves(x) for x in (masks, updates, grads, params))):
        expected = np.asarray(g) * np.float32(-0.1) * np.float32(0.5)
        np.testing.assert_array_equal(u, np.where(m, expected, -np.asarray(p)))
    assert not np.all(np.asarray(updates["dense"]["kernel"]) == 0)
    with pytest.raises(TypeError, match="factor"):  # without it the inner transformation misses it
        jax.eval_shape(tx.update, grads, sparsity.find_state(state), params)


def test_value_reaches_reduce_on_plateau_inside():
    # optax's own extra-args transformation: the loss as ``value=``. The same values fed to it alone
    # must give the same learning-rate scale (1 -> 0.5 -> 0.25 on a flat loss with patience 1).
    plateau = lambda: optax.contrib.reduce_on_plateau(factor=0.5, patience=1)
    tx = sparsity.sparse_learning(optax.chain(sgd(), plateau()), density=DENSITY)
    params, state = start(tx)
    alone = plateau()
    alone_state = alone.init(params)
    update, alone_update = jax.jit(tx.update), jax.jit(alone.update)
    for k in range(3):
        params, state = step_with(update, params, state, k, value=jnp.float32(1.0))
        _, alone_state = alone_update(params, alone_state, params, value=jnp.float32(1.0))
    scale = sparsity.find_state(state).inner_state[1].scale
    assert float(scale) == float(alone_state.scale) == 0.25


# ---------------------------------------------------------------------------------------------
# Compositions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chain_with_clipping_equals_clipping_first():
    """chain(clip, sparse_learning with in-update rounds): the same as the sparse transformation fed the
    clipped gradients."""
    tx_s, update_s = in_update("irregular")
    tx = optax.chain(optax.clip_by_global_norm(1.0), tx_s)
    clip = optax.clip_by_global_norm(1.0)
    clipped = jax.jit(lambda g: clip.update(g, clip.init(g))[0])
    update = jax.jit(tx.update)
    (params, state), (ref_params, ref_state) = start(tx), start(tx_s)
    for k in range(7):
        params, state = step_with(update, params, state, k)
        grads = clipped(grads_at(ref_params, k))
        ref_params, ref_state = step_with(update_s, ref_params, ref_state, k, grads)
        masks = sparsity.get_masks(state)
        assert_trees_equal(masks, sparsity.get_masks(ref_state))
        # The global norm is a sum whose order differs between the two programs: the clipped gradients
        # (and so the weights) may differ by an ulp of float32 (measured: 2.3e-10 on one weight).
        assert_trees_close(params, ref_params)
        assert_inactive_zero(params, masks)
    assert not trees_equal(sparsity.get_masks(start(tx_s)[1]), masks)
    assert sparsity.global_density(state) == pytest.approx(round(DENSITY * PRUNABLE) / PRUNABLE)


@jax.jit
def welford_mean(a, b):
    """MultiSteps' running mean of two gradients (Welford's update): a + (b - a) / 2."""
    return jax.tree.map(lambda x, y: x + (y - x) / 2, a, b)


@pytest.mark.slow
def test_multi_steps_rounds_count_real_updates():
    """MultiSteps(k=2): the inner update runs on the mean of two gradients every second call, and the
    rounds come every EVERY real updates (2 x EVERY calls): the same as the sparse transformation alone
    fed the mean gradients."""
    tx_s, update_s = in_update("irregular")
    tx = optax.MultiSteps(tx_s, every_k_schedule=2)
    update = jax.jit(tx.update)
    (params, state), (ref_params, ref_state) = start(tx), start(tx_s)
    first = sparsity.get_masks(state)
    moved_at = []
    for call in range(14):
        before = (params, sparsity.get_masks(state))
        params, state = step_with(update, params, state, call)
        real = (call + 1) // 2
        assert int(sparsity.find_state(state).count) == real
        if call % 2 == 0:  # accumulating: nothing moves
            assert_trees_equal(params, before[0])
            assert_trees_equal(sparsity.get_masks(state), before[1])
            continue
        mean = welford_mean(grads_at(ref_params, call - 1), grads_at(ref_params, call))
        ref_params, ref_state = step_with(update_s, ref_params, ref_state, real - 1, mean)
        assert_trees_equal(sparsity.get_masks(state), sparsity.get_masks(ref_state))
        assert_trees_match(params, ref_params, updates=real)
        assert_inactive_zero(params, sparsity.get_masks(state))
        if not trees_equal(before[1], sparsity.get_masks(state)):
            moved_at.append(real)
    assert moved_at == [3, 6] and not trees_equal(first, sparsity.get_masks(state))


def test_inject_hyperparams_learning_rate_changed_mid_run():
    tx = sparsity.sparse_learning(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
                                  density=DENSITY)
    update = jax.jit(tx.update)
    params, state = start(tx)
    for k in range(3):
        params, state = step_with(update, params, state, k)
    sparse = sparsity.find_state(state)
    inject = sparse.inner_state
    trace = momentum_of(state, params)
    lowered = inject._replace(hyperparams={**inject.hyperparams, "learning_rate": jnp.float32(0.02)})
    state = committed(dataclasses.replace(sparse, inner_state=lowered))
    grads = grads_at(params, 3)
    new_params, state = step_with(update, params, state, 3, grads)
    assert update._cache_size() == 1  # the rate is an array of the state: the same program
    masks = sparsity.get_masks(state)
    # Momentum SGD by hand at the new rate: u = -0.02 (g + 0.9 trace) on active weights.
    for m, p, q, g, t in zip(*(jax.tree.leaves(x) for x in (masks, params, new_params, grads, trace))):
        expected = np.asarray(p) - np.float32(0.02) * (np.asarray(g) + np.float32(0.9) * np.asarray(t))
        active = np.broadcast_to(np.asarray(m), q.shape)
        np.testing.assert_allclose(np.asarray(q)[active], expected[active], rtol=1e-6, atol=1e-7)
    assert_inactive_zero(new_params, masks)
    assert float(sparsity.find_state(state).inner_state.hyperparams["learning_rate"]) == np.float32(0.02)


LABELS = {"conv": {"kernel": "sparse", "bias": "dense"}, "dense": {"kernel": "sparse", "bias": "dense"},
          "head": {"kernel": "dense"}}


def kernels_only(tree):
    return {name: {"kernel": tree[name]["kernel"]} for name in ("conv", "dense")}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["partition", "masked"])
def test_sparse_on_some_groups_only(how):
    """The conv and dense kernels sparse (rounds inside), the head kernel and the biases dense. The
    kernels follow the sparse transformation run on a tree of those two kernels alone; the rest follows
    plain SGD (partition) or, as optax.masked passes the other leaves' updates through, the raw
    gradient."""
    sparse = lambda: sparsity.sparse_learning(sgd(), density=DENSITY, round_every=2, prune_rate=0.3)
    if how == "partition":
        tx = optax.partition({"sparse": sparse(), "dense": optax.sgd(0.1)}, LABELS)
        rest_update = lambda g: -np.float32(0.1) * g
    else:
        tx = optax.masked(sparse(), jax.tree.map(lambda label: label == "sparse", LABELS))
        rest_update = lambda g: g
    ref = _kernels_reference()
    update = jax.jit(tx.update)
    params = small_params()
    state = committed(tx.init(params))
    masks = sparsity.get_masks(state, params)
    assert jax.tree.structure(masks) == jax.tree.structure(params)
    assert [path_name(p) for p, m in jax.tree_util.tree_leaves_with_path(masks) if sparsity.is_pruned(m)] \
        == ["conv/kernel", "dense/kernel"]
    masked = sparsity.apply_masks(params, masks)
    for m, p, q in zip(*(jax.tree.leaves(x) for x in (masks, params, masked))):
        np.testing.assert_array_equal(q, np.where(m, p, 0))
    params = committed(masked)
    ref_params, ref_state = start(ref[0], kernels_only(params))
    first = sparsity.get_masks(ref_state)
    for k in range(5):
        grads = grads_at(params, k)
        new_params, state = step_with(update, params, state, k, grads)
        ref_params, ref_state = step_with(ref[1], ref_params, ref_state, k)
        masks = sparsity.get_masks(state, params)
        assert_trees_equal(kernels_only(masks), sparsity.get_masks(ref_state))
        assert_trees_match(kernels_only(new_params), ref_params, updates=k + 1)
        for name, leaf in (("conv", "bias"), ("dense", "bias"), ("head", "kernel")):
            assert not sparsity.is_pruned(masks[name][leaf])
            expected = np.asarray(params[name][leaf]) + rest_update(np.asarray(grads[name][leaf]))
            assert_trees_match(new_params[name][leaf], expected, f"{name}/{leaf}")
        assert_inactive_zero(new_params, masks)
        params = new_params
    assert not trees_equal(kernels_only(masks), first)  # the rounds moved the masks
    assert set(sparsity.layer_densities(state)) == {"conv/kernel", "dense/kernel"}


@pytest.mark.slow
def test_rounds_from_outside_cover_the_sparse_group_only():
    """prune_and_regrow on a partitioned state: the round runs on the sparse group's kernels (as it would
    on a tree of those alone) and leaves the dense group's parameters as they are; the state passed where
    masks are expected (apply_masks, global_density) reads the same masks."""
    tx = optax.partition({"sparse": sparsity.sparse_learning(sgd(), density=DENSITY),
                          "dense": optax.sgd(0.1)}, LABELS)
    ref = sparsity.sparse_learning(sgd(), density=DENSITY)
    params = small_params()
    state = tx.init(params)
    params = sparsity.apply_masks(params, state)
    assert_trees_equal(params, sparsity.apply_masks(params, sparsity.get_masks(state, params)))
    ref_params, ref_state = kernels_only(params), ref.init(kernels_only(small_params()))
    for k in range(3):
        grads = grads_at(params, k)
        params, state = step_with(jax.jit(tx.update), params, state, k, grads)
        ref_params, ref_state = step_with(jax.jit(ref.update), ref_params, ref_state, k, kernels_only(grads))
    new_params, new_state = sparsity.prune_and_regrow(params, state, 0.3)
    ref_params, ref_state = sparsity.prune_and_regrow(ref_params, ref_state, 0.3)
    assert_trees_match(kernels_only(new_params), ref_params, updates=3)
    assert_trees_equal(kernels_only(sparsity.get_masks(new_state, params)), sparsity.get_masks(ref_state))
    assert_trees_match(kernels_only(momentum_of(new_state, restrict_to_sparse(params))),
                       momentum_of(ref_state, ref_params), updates=3)
    for name, leaf in (("conv", "bias"), ("dense", "bias"), ("head", "kernel")):
        np.testing.assert_array_equal(new_params[name][leaf], params[name][leaf])
    assert not trees_equal(sparsity.get_masks(new_state, params), sparsity.get_masks(state, params))
    assert sparsity.global_density(new_state) == sparsity.global_density(ref_state)
    assert_inactive_zero(new_params, sparsity.get_masks(new_state, params))


def restrict_to_sparse(params):
    """The parameters as the partition's sparse transformation sees them (MaskedNode elsewhere)."""
    return jax.tree.map(lambda label, p: p if label == "sparse" else optax.MaskedNode(), LABELS, params)


@functools.cache
def _kernels_reference():
    tx = sparsity.sparse_learning(sgd(), density=DENSITY, round_every=2, prune_rate=0.3)
    return tx, jax.jit(tx.update)


# ---------------------------------------------------------------------------------------------
# Masks map like params; one compilation serves every setting but the structure.
# ---------------------------------------------------------------------------------------------


def test_masks_map_like_params():
    params = small_params()
    masks = sparsity.get_masks(sparsity.sparse_learning(sgd(), density=DENSITY).init(params))
    grads = grads_at(params, 0)
    products = jax.tree.map(lambda p, m: p * m, params, masks)
    selected = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, masks)
    for name, leaf in (("conv", "kernel"), ("conv", "bias"), ("dense", "kernel"), ("dense", "bias"),
                       ("head", "kernel")):
        m = np.asarray(masks[name][leaf])
        keep = m if leaf == "kernel" else np.ones(params[name][leaf].shape, bool)
        assert m.shape == (params[name][leaf].shape if leaf == "kernel" else ())
        np.testing.assert_array_equal(products[name][leaf], np.where(keep, params[name][leaf], 0))
        np.testing.assert_array_equal(selected[name][leaf], np.where(keep, grads[name][leaf], 0))
        assert products[name][leaf].dtype == jnp.float32
    assert 0 < int(np.sum(masks["dense"]["kernel"])) < 72 * 16


def test_a_loop_from_init_compiles_its_step_once():
    """A training loop as users write it (parameters and state straight from init, uncommitted) runs
    its jitted step with one program: init places masks only like committed parameters."""
    r = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(r.standard_normal((8, 4)), jnp.float32)},
              "head": {"kernel": jnp.asarray(r.standard_normal((4, 3)), jnp.float32)}}
    tx = sparsity.sparse_learning(sgd(), density=DENSITY, round_every=2, prune_rate=0.3)
    state = tx.init(params)
    params = sparsity.apply_masks(params, state)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(4):
        params, state = step(params, state)
    assert step._cache_size() == 1


@pytest.mark.parametrize("inner", ["adamw", "decay inside"])
def test_weight_decay_inside_and_bfloat16_updates_keep_pruned_weights_at_zero(inner):
    """Weight decay in the inner optimizer (adamw's own, or add_decayed_weights chained before sgd) and
    a bfloat16 momentum (so bfloat16 updates for float32 weights): a weight an in-update round prunes,
    and a weight never masked, end at exactly zero."""
    make = {"adamw": lambda: optax.adamw(1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16),
            "decay inside": lambda: optax.chain(optax.add_decayed_weights(0.1),
                                                optax.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.bfloat16))}
    tx = sparsity.sparse_learning(make[inner](), density=DENSITY, round_every=2, prune_rate=0.5)
    params = small_params()  # not masked: the first update sends the inactive weights to zero
    state = tx.init(params)
    update = jax.jit(tx.update)
    first = sparsity.get_masks(state)
    for k in range(4):
        params, state = step_with(update, params, state, k)
        assert_inactive_zero(params, sparsity.get_masks(state))
    assert not trees_equal(first, sparsity.get_masks(state))


def test_two_sparse_states_in_one_optimizer_are_refused():
    tx = optax.partition({"a": sparsity.sparse_learning(sgd(), density=0.5),
                          "b": sparsity.sparse_learning(sgd(), density=0.5)},
                         {"conv": "a", "dense": "b", "head": "b"})
    state = tx.init(small_params())
    for call in (lambda: sparsity.get_masks(state), lambda: sparsity.global_density(state),
                 lambda: sparsity.prune_and_regrow(small_params(), state, 0.3)):
        with pytest.raises(ValueError, match="holds 2 sparse_learning states"):
            call()


@pytest.mark.slow
def test_settings_share_one_tree_structure_and_one_compilation():
    params = small_params()
    settings = {"base": {}, "density": {"density": 0.5}, "seed": {"seed": 3},
                "floor": {"min_layer_fraction": 0.0}, "no_redistribution": {"redistribution": "none"},
                "no_keep_channels": {"keep_channels": False}, "no_reset": {"reset_regrown_momentum": False}}
    states = {}
    for name, kwargs in settings.items():
        state = sparsity.sparse_learning(sgd(), **{"density": DENSITY, **kwargs}).init(params)
        states[name] = committed(dataclasses.replace(state, count=jnp.int32(EVERY - 1)))  # next: a round
    base = jax.tree.structure(states["base"])
    assert all(jax.tree.structure(s) == base for s in states.values())
    # The file's jitted update (jax.jit of the same function shares one cache): it may have compiled
    # already; these seven settings must not add a program.
    _, update = in_update("irregular")
    # Gradients 100x larger on the dense kernel: momentum redistribution moves weights to it.
    grads = grads_at(params, 0)
    grads["dense"]["kernel"] = 100 * grads["dense"]["kernel"]
    out = {}
    for name, state in states.items():
        p = committed(sparsity.apply_masks(params, state))
        out[name] = (state, *step_with(update, p, state, 0, grads))
        if name == "base":
            programs = update._cache_size()
    assert update._cache_size() == programs  # one compilation served all seven settings
    counts = lambda s: {k: int(np.sum(sparsity.get_masks(s)[k]["kernel"])) for k in KERNELS}
    before, after = counts(out["base"][0]), counts(out["base"][2])
    assert after["dense"] > before["dense"] and sum(after.values()) == sum(before.values())
    assert counts(out["no_redistribution"][2]) == counts(out["no_redistribution"][0])
    assert sum(counts(out["density"][2]).values()) == round(0.5 * PRUNABLE)
    assert not trees_equal(sparsity.get_masks(out["seed"][0]), sparsity.get_masks(out["base"][0]))
    assert int(np.sum(np.asarray(out["floor"][0].min_units) < np.asarray(out["base"][0].min_units))) > 0
    for name, zero in (("base", True), ("no_reset", False)):
        old, (_, new_params, new_state) = sparsity.get_masks(out[name][0]), out[name]
        regrown = np.asarray(sparsity.get_masks(new_state)["dense"]["kernel"] & ~old["dense"]["kernel"])
        trace = np.asarray(momentum_of(new_state, new_params)["dense"]["kernel"])
        assert regrown.any() and np.all((trace[regrown] == 0) == zero)
    # Only the structure is static: a column state has leaves of the same shapes and dtypes, but it is
    # another tree (so another program).
    column = sparsity.sparse_learning(sgd(), density=DENSITY, structure="column").init(params)
    assert jax.tree.structure(column) != base
    assert [jax.typeof(x) for x in jax.tree.leaves(column)] == [jax.typeof(x) for x in
                                                                jax.tree.leaves(states["base"])]


# ---------------------------------------------------------------------------------------------
# flax.nnx.Optimizer.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nnx_optimizer_trains_sparse_like_the_functional_update():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    # nnx.Optimizer calls init on nnx.state(model, nnx.Param), whose key paths end in the Variables'
    # .value ('l1/kernel/value'): the default rule and the layer names look through it.
    tx = sparsity.sparse_learning(sgd(), density=0.4, round_every=2, prune_rate=0.3)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # optimizer.opt_state holds OptVariable / OptArray wrappers (get_masks finds the state, its leaves
    # are the wrappers); nnx.as_pure turns them back into the arrays tx.update sees.
    masks = sparsity.get_masks(nnx.as_pure(optimizer.opt_state))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.update(model, sparsity.apply_masks(nnx.as_pure(nnx.state(model, nnx.Param)), masks))
    nnx.update((model, optimizer), committed(nnx.state((model, optimizer))))  # one program, see committed
    x = jax.random.normal(jax.random.key(1), (32, 6))
    y = jnp.arange(32) % 3

    @nnx.jit
    def train_step(model, optimizer):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    # The same training on plain dicts with the functional update.
    def forward(p):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    @jax.jit
    def ref_step(p, s):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p), y).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    ref_state = tx.init(params)
    ref_params, ref_state = committed((sparsity.apply_masks(params, ref_state), ref_state))
    assert_trees_equal(by_name(masks), by_name(sparsity.get_masks(ref_state)))
    for _ in range(5):
        train_step(model, optimizer)
        ref_params, ref_state = ref_step(ref_params, ref_state)
    masks = sparsity.get_masks(nnx.as_pure(optimizer.opt_state))
    assert set(by_name(masks)) == {"l1/bias", "l1/kernel", "l2/bias", "l2/kernel"}
    assert set(sparsity.layer_densities(nnx.as_pure(optimizer.opt_state))) == {"l1/kernel", "l2/kernel"}
    assert_trees_equal(by_name(masks), by_name(sparsity.get_masks(ref_state)))
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name in ("l1", "l2"):
        m = np.asarray(masks[name]["kernel"])
        assert np.all(np.asarray(trained[name]["kernel"])[~m] == 0.0) and (~m).any()
        for leaf in ("kernel", "bias"):
            # Measured: equal bit for bit. The tolerance lets the two programs' matmuls sum in another
            # order (float32: a few ulps of the 16-term sums, over 5 steps).
            np.testing.assert_allclose(trained[name][leaf], ref_params[name][leaf], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.asarray(masks["l1"]["kernel"]),
                              np.asarray(sparsity.get_masks(tx.init(params))["l1"]["kernel"]))
    assert int(sparsity.find_state(nnx.as_pure(optimizer.opt_state)).count) == 5


# ---------------------------------------------------------------------------------------------
# A sharded jit on 8 CPU devices (a subprocess: the device count is fixed when JAX starts).
# ---------------------------------------------------------------------------------------------

SHARDED = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import sys
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from alite_jax import sparsity
from test_sparsity_optax import EVERY, in_update_tx, noise_grads, small_params

assert len(jax.devices()) == 8
expected = np.load(sys.argv[1])
# jax.make_mesh's default axes are Explicit (the round gathers the kernels it reshapes and sorts, and puts
# the results back); Auto axes leave the placement to the compiler.
for axis_types in (None, (AxisType.Auto,) * 2):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=axis_types)
    specs = {"conv": {"kernel": P(None, None, None, "model"), "bias": P()},
             "dense": {"kernel": P("data", "model"), "bias": P()}, "head": {"kernel": P()}}
    layout = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    tx = in_update_tx("irregular")
    params = jax.device_put(small_params(), layout)
    state = tx.init(params)
    for name in ("conv", "dense"):  # init places a pruned leaf's mask like its parameter
        assert state.masks[name]["kernel"].sharding == params[name]["kernel"].sharding, name
    if axis_types is None:  # under jit too (in the mesh's context, as JAX wants for explicit axes)
        with jax.set_mesh(mesh):
            jitted = jax.jit(tx.init)(params)
        for name in ("conv", "dense"):
            assert jitted.masks[name]["kernel"].sharding.spec == params[name]["kernel"].sharding.spec
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(state)))
    params = sparsity.apply_masks(params, state)
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated,
                             (params, state))
    params, state = jax.device_put((params, state), shardings)

    def step(p, s, k):
        u, s = tx.update(noise_grads(p, k), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, out_shardings=shardings)
    for k in range(2 * EVERY):  # two rounds
        params, state = step(params, state, k)
    assert jax.tree.map(lambda x: x.sharding, (params, state)) == shardings
    assert state.masks["dense"]["kernel"].sharding.spec == P("data", "model")
    leaves = jax.tree_util.tree_leaves_with_path((params, state))
    assert len(leaves) == len(expected.files)
    for i, (path, got) in enumerate(leaves):
        got, want = np.asarray(got), expected[f"arr_{i}"]
        assert got.dtype == want.dtype, jax.tree_util.keystr(path)
        if got.dtype == np.float32:
            # Elementwise gradients and updates: every weight takes the same float32 operations on any
            # layout. Allow a few ulps a step (2^-23 = 1.2e-7 relative) in case the compiler reorders one.
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    print(mesh.axis_types, "sharded == unsharded")
"""


@pytest.mark.slow
def test_sharded_jit_on_eight_devices_equals_one_device(tmp_path):
    """Kernels sharded over a (2, 4) mesh of CPU devices, a jitted step with the state's shardings as
    out_shardings, two in-update rounds: masks, momentum and weights as the file's unsharded run."""
    tx, update = in_update("irregular")
    params, state = start(tx)
    first = sparsity.get_masks(state)
    for k in range(2 * EVERY):
        params, state = step_with(update, params, state, k)
    assert not trees_equal(first, sparsity.get_masks(state))
    np.savez(tmp_path / "unsharded.npz", *[np.asarray(x) for x in jax.tree.leaves((params, state))])
    result = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "unsharded.npz")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sharded == unsharded") == 2, result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_bad_round_arguments_fail_clearly():
    both = "in-update rounds need both round_every and prune_rate"
    with pytest.raises(ValueError, match=both):
        sparsity.sparse_learning(sgd(), density=0.5, round_every=10)
    with pytest.raises(ValueError, match=both):
        sparsity.sparse_learning(sgd(), density=0.5, prune_rate=0.3)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="round_every must be a whole number of updates >= 1"):
            sparsity.sparse_learning(sgd(), density=0.5, round_every=bad, prune_rate=0.3)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"prune_rate must be in \[0, 1\]"):
            sparsity.sparse_learning(sgd(), density=0.5, round_every=10, prune_rate=bad)
    with pytest.raises(ValueError, match="total_steps >= 1 and round_every >= 1"):
        sparsity.round_prune_rate(0.5, 100, 0)
