"""Sparse learning: masks, the optax wrapper, prune/regrow, the schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alite_jax import sparsity
from alite_jax.models import create_model, init_model
from alite_jax.sparsity.masks import allocate, count_nonzero_masked


def small_params(seed=0):
    """A conv, a dense layer, biases and a BN-like scale: prunable and non-prunable leaves."""
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32))
    return {"conv": {"kernel": f(3, 3, 4, 8), "bias": f(8)},
            "bn": {"scale": f(8), "bias": f(8)},
            "dense": {"kernel": f(72, 16), "bias": f(16)},
            "head": {"kernel": f(16, 5)},
            "rel_rows": f(7, 4)}


def sgd():
    return optax.sgd(0.1, momentum=0.9)


def nnz(masks):
    return count_nonzero_masked(masks)[0]


def min_unit(masks, structure):
    if structure == "irregular":
        return 1
    return min(m.shape[-1] for m in jax.tree.leaves(masks) if sparsity.is_pruned(m))


# ---------------------------------------------------------------------------------------------
# Allocation (hand-computed).
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_allocate_proportional_and_exact():
    g = allocate(jnp.array([0.5, 0.3, 0.2]), jnp.array([100, 100, 100]), jnp.array([1, 1, 1]),
                 jnp.int32(10))
    np.testing.assert_array_equal(g, [5, 3, 2])
    # 7 over shares 1/3 each: floors give 2, 2, 2 and the last one goes to the first in share order.
    g = allocate(jnp.array([1.0, 1.0, 1.0]), jnp.array([9, 9, 9]), jnp.array([1, 1, 1]), jnp.int32(7))
    np.testing.assert_array_equal(g, [3, 2, 2])


def test_allocate_full_layer_passes_excess_on():
    # The first layer wants 9 of 10 but has room for 3: its excess goes to the other.
    g = allocate(jnp.array([0.9, 0.1]), jnp.array([3, 100]), jnp.array([1, 1]), jnp.int32(10))
    np.testing.assert_array_equal(g, [3, 7])


def test_allocate_columns_fall_short_by_less_than_a_unit():
    # Units of 4 and 6 weights; 17 weights: 2 x 4 + 1 x 6 = 14 or 1 x 4 + 2 x 6 = 16; 17 is unreachable.
    g = np.asarray(allocate(jnp.array([0.5, 0.5]), jnp.array([10, 10]), jnp.array([4, 6]),
                            jnp.int32(17)))
    total = int(g @ np.array([4, 6]))
    assert 17 - 4 < total <= 17


# ---------------------------------------------------------------------------------------------
# init.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", sparsity.STRUCTURES)
@pytest.mark.parametrize("distribution", sparsity.DISTRIBUTIONS)
@pytest.mark.slow
def test_init_meets_budget(structure, distribution):
    params = small_params()
    state = sparsity.sparse_learning(sgd(), density=0.3, structure=structure,
                                     distribution=distribution).init(params)
    masks = sparsity.get_masks(state)
    prunable = 3 * 3 * 4 * 8 + 72 * 16 + 16 * 5
    assert state.budget == round(0.3 * prunable)
    if structure == "irregular":
        assert nnz(masks) == state.budget
    else:
        assert 0 <= state.budget - nnz(masks) < min_unit(masks, structure)
    # Non-prunable leaves are a scalar True; prunable ones are boolean arrays of the parameter's shape.
    for m in (masks["conv"]["bias"], masks["bn"]["scale"], masks["rel_rows"], masks["dense"]["bias"]):
        assert m.shape == () and m.dtype == jnp.bool_ and bool(m)
    for name in ("conv", "dense", "head"):
        assert masks[name]["kernel"].dtype == jnp.bool_
        assert masks[name]["kernel"].shape == params[name]["kernel"].shape


@pytest.mark.slow
def test_column_masks_are_constant_along_cout():
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.4, structure="column")
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    for _ in range(3):
        state = _set_momentum(state, jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape),
                                                  params))
        params, state = sparsity.prune_and_regrow(params, state, 0.5)
        for m in filter(sparsity.is_pruned, jax.tree.leaves(sparsity.get_masks(state))):
            assert np.all(m == m[..., :1]), "column mask varies along C_out"


def test_erk_gives_small_layers_higher_density():
    dens = sparsity.layer_densities(sparsity.init_masks(small_params(), 0.3, distribution="erk")[0])
    uni = sparsity.layer_densities(sparsity.init_masks(small_params(), 0.3)[0])
    # ERK density ~ sum(shape)/prod(shape): head 21/80 = 0.26, dense 88/1152 = 0.076, conv
    # 18/288 = 0.0625. Shares of the 456-weight budget: 456 * (21, 88, 18) / 127 = 75.4, 316, 64.6.
    assert dens["head/kernel"] > dens["dense/kernel"] > dens["conv/kernel"]
    assert dens["conv/kernel"] == pytest.approx(64 / 288, abs=1.5 / 288)
    assert all(abs(d - 0.3) < 0.01 for d in uni.values())


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="density"):
        sparsity.sparse_learning(sgd(), density=0.0)
    with pytest.raises(ValueError, match="density"):
        sparsity.sparse_learning(sgd(), density=1.5)
    with pytest.raises(ValueError, match="structure"):
        sparsity.sparse_learning(sgd(), density=0.5, structure="filter")
    with pytest.raises(ValueError, match="distribution"):
        sparsity.sparse_learning(sgd(), density=0.5, distribution="normal")
    with pytest.raises(ValueError, match="redistribution"):
        sparsity.sparse_learning(sgd(), density=0.5, redistribution="magnitude")
    with pytest.raises(ValueError, match="min_layer_fraction"):
        sparsity.sparse_learning(sgd(), density=0.5, min_layer_fraction=1.5)
    with pytest.raises(ValueError, match="1 counts for 3 prunable leaves"):
        sparsity.draw_masks(small_params(), (1,))
    with pytest.raises(ValueError, match="momentum"):
        sparsity.sparse_learning(optax.sgd(0.1), density=0.5).init(small_params())
    with pytest.raises(ValueError, match="no parameter is prunable"):
        sparsity.sparse_learning(sgd(), density=0.5, is_prunable=lambda p, x: False).init(small_params())
    tx = sparsity.sparse_learning(sgd(), density=0.5)
    state = tx.init(small_params())
    with pytest.raises(ValueError, match="needs params"):
        tx.update(small_params(), state)


@pytest.mark.slow
def test_custom_is_prunable_tree():
    params = small_params()
    flags = jax.tree.map(lambda _: False, params)
    flags["head"]["kernel"] = True
    masks = sparsity.get_masks(sparsity.sparse_learning(sgd(), density=0.5, is_prunable=flags)
                               .init(params))
    assert not sparsity.is_pruned(masks["conv"]["kernel"]) and int(jnp.sum(masks["head"]["kernel"])) == 40


# ---------------------------------------------------------------------------------------------
# update.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,make", [
    ("sgd+wd inside", lambda: optax.chain(optax.add_decayed_weights(1e-2), sgd())),
    ("nesterov, clip and wd outside", lambda: None),
    ("adamw", lambda: optax.adamw(1e-2, weight_decay=1e-2)),
])
def test_inactive_weights_stay_exactly_zero(name, make):
    inner = make()
    if inner is None:
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         sparsity.sparse_learning(optax.sgd(0.1, momentum=0.9, nesterov=True),
                                                  density=0.2),
                         optax.add_decayed_weights(1e-2), optax.scale(1.0))
    else:
        tx = sparsity.sparse_learning(inner, density=0.2)
    params = small_params()
    state = tx.init(params)
    masks = sparsity.get_masks(state)
    params = sparsity.apply_masks(params, masks)
    start = params
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for i in range(5):
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    for m, p, p0 in zip(jax.tree.leaves(masks), jax.tree.leaves(params), jax.tree.leaves(start)):
        if not sparsity.is_pruned(m):
            assert not np.allclose(p, p0)  # dense leaves train normally
        else:
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
            assert not np.allclose(np.asarray(p)[np.asarray(m)], np.asarray(p0)[np.asarray(m)])
    # The inner optimizer saw the dense gradient: momentum is non-zero on inactive weights too.
    momentum = sparsity.state.find_momentum(sparsity.find_state(state).inner_state, params)
    inactive = ~np.asarray(masks["dense"]["kernel"])
    assert np.all(np.asarray(momentum["dense"]["kernel"])[inactive] != 0.0)


def test_update_zeroes_weights_that_were_never_masked():
    tx = sparsity.sparse_learning(sgd(), density=0.2)
    params = small_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    m = np.asarray(sparsity.get_masks(state)["dense"]["kernel"])
    assert np.all(np.asarray(params["dense"]["kernel"])[~m] == 0.0)


# ---------------------------------------------------------------------------------------------
# prune_and_regrow (hand-computed).
# ---------------------------------------------------------------------------------------------


def _set_momentum(state, momentum):
    sparse = sparsity.find_state(state)
    trace, rest = sparse.inner_state[0], sparse.inner_state[1:]
    new = dataclasses.replace(sparse, inner_state=(trace._replace(trace=momentum),) + rest)
    return sparsity.state.replace_state(state, new)


def _hand_state(weights, masks, momentum, budget):
    # The paper's round by hand: no channel floor (its own test is below).
    tx = sparsity.sparse_learning(sgd(), density=0.5, keep_channels=False)
    state = tx.init(weights)
    state = dataclasses.replace(state, masks=masks, budget=jnp.int32(budget))
    return _set_momentum(state, momentum)


def _layers(a, b, shape=(2, 4)):  # two (2, 4) kernels from flat lists
    return {"a": {"kernel": jnp.asarray(a, jnp.float32).reshape(shape)},
            "b": {"kernel": jnp.asarray(b, jnp.float32).reshape(shape)}}


@pytest.mark.slow
def test_prune_and_regrow_hand_computed():
    weights = _layers([1, 2, 3, 4, 0, 0, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0])
    masks = jax.tree.map(lambda w: w != 0, weights)
    momentum = _layers([1, 1, 1, 1, 9, 8, 7, 6], [0.5, 0.5, 3, 3, 1, 2, 3, 4])
    state = _hand_state(weights, masks, momentum, budget=8)
    params, state = sparsity.prune_and_regrow(weights, state, 0.5)
    m = sparsity.get_masks(state)
    # Each layer prunes ceil(0.5 * 4) = 2 smallest |w| (positions 0, 1). Importance: mean |m| over the
    # active weights: a 1, b 1.75, so shares 0.364 / 0.636 of the 4 freed: floors 1 / 2 and the last
    # one to b (the larger share). a regrows its top-|m| inactive weight (position 4, m = 9); b its
    # top 3 (positions 7, 6, 5 with m = 4, 3, 2), all at zero.
    np.testing.assert_array_equal(m["a"]["kernel"].ravel(), [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m["b"]["kernel"].ravel(), [0, 0, 1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(params["a"]["kernel"].ravel(), [0, 0, 3, 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(params["b"]["kernel"].ravel(), [0, 0, 7, 8, 0, 0, 0, 0])


def test_full_layer_passes_its_regrowth_on():
    # a: 4 weights, 3 active, all the momentum; b: 16 weights, 8 active, no momentum. Rate 0.5 prunes
    # ceil(1.5) = 2 from a and 4 from b: 6 freed. a wants all 6 but has room for 3; b takes the rest.
    weights = {"a": {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]])},
               "b": {"kernel": jnp.array([1, 2, 3, 4, 5, 6, 7, 8] + [0] * 8, jnp.float32).reshape(4, 4)}}
    masks = jax.tree.map(lambda w: w != 0, weights)
    momentum = {"a": {"kernel": jnp.full((2, 2), 5.0)}, "b": {"kernel": jnp.zeros((4, 4))}}
    state = _hand_state(weights, masks, momentum, budget=11)
    params, state = sparsity.prune_and_regrow(weights, state, 0.5)
    m = sparsity.get_masks(state)
    assert int(m["a"]["kernel"].sum()) == 4 and int(m["b"]["kernel"].sum()) == 7
    # b kept its 4 largest (5..8) and regrew 3 at zero (ties at momentum 0 broken by index: 0, 1, 2).
    np.testing.assert_array_equal(params["b"]["kernel"].ravel(), [0, 0, 0, 0, 5, 6, 7, 8] + [0] * 8)
    np.testing.assert_array_equal(m["b"]["kernel"].ravel(), [1, 1, 1, 0, 1, 1, 1, 1] + [0] * 8)


def test_column_prune_and_regrow_hand_computed():
    # Dense kernels (C_in, C_out): columns are rows here. a: 4 columns of 2; b: 4 columns of 2.
    wa = jnp.array([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    wb = jnp.array([[3.0, 4.0], [0.1, 0.1], [0.0, 0.0], [0.0, 0.0]])
    weights = {"a": {"kernel": wa}, "b": {"kernel": wb}}
    masks = jax.tree.map(lambda w: w != 0, weights)
    ma = jnp.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])  # all of a's momentum: inactive
    mb = jnp.array([[1.0, 1.0], [1.0, 1.0], [0.0, 6.0], [6.0, 8.0]])
    state = _hand_state(weights, masks, {"a": {"kernel": ma}, "b": {"kernel": mb}}, budget=8)
    state = dataclasses.replace(state, structure="column")
    params, state = sparsity.prune_and_regrow(weights, state, 0.5)
    m = sparsity.get_masks(state)
    # Each layer prunes ceil(0.5 * 2) = 1 column: a's [1, 1] (norm 1.41), b's [0.1, 0.1]. Importance:
    # a 0 (no momentum on its active weights), b 1, so b regrows both freed columns: its largest
    # momentum norms among its 3 free columns are column 3 (10) and column 2 (6).
    np.testing.assert_array_equal(m["a"]["kernel"][:, 0], [0, 1, 0, 0])
    np.testing.assert_array_equal(m["b"]["kernel"][:, 0], [1, 0, 1, 1])
    np.testing.assert_array_equal(params["b"]["kernel"], [[3, 4], [0, 0], [0, 0], [0, 0]])
    assert np.all(m["b"]["kernel"] == m["b"]["kernel"][:, :1])


@pytest.mark.parametrize("structure", sparsity.STRUCTURES)
def test_prune_rate_zero_changes_nothing(structure):
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.3, structure=structure)
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    state = _set_momentum(state, jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape),
                                              params))
    new_params, new_state = sparsity.prune_and_regrow(params, state, 0.0)
    for a, b in zip(jax.tree.leaves((params, sparsity.get_masks(state))),
                    jax.tree.leaves((new_params, sparsity.get_masks(new_state)))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("structure", sparsity.STRUCTURES)
@pytest.mark.parametrize("distribution", sparsity.DISTRIBUTIONS)
@pytest.mark.slow
def test_budget_holds_over_many_rounds_and_compiles_once(structure, distribution):
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.25, structure=structure, distribution=distribution)
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    start = nnz(sparsity.get_masks(state))
    schedule = sparsity.prune_rate_schedule(0.5, 12)
    traced = []  # jaxprs traced after the first round: a retraced round would add one

    def on_event(event: str, _duration: float, **_) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced.append(event)

    for epoch in range(11):
        if epoch == 1:  # every program of the loop has run once by now
            jax.monitoring.register_event_duration_secs_listener(on_event)
        key = jax.random.key(epoch)
        state = _set_momentum(state, jax.tree.map(lambda x: jax.random.normal(key, x.shape), params))
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), params)
        params = sparsity.apply_masks(params, sparsity.get_masks(state))
        old = sparsity.get_masks(state)
        params, state = sparsity.prune_and_regrow(params, state, schedule(epoch))
        masks = sparsity.get_masks(state)
        if structure == "irregular":
            assert nnz(masks) == state.budget == start
        else:
            assert 0 <= state.budget - nnz(masks) < min_unit(masks, structure)
        # Regrown weights start at zero; inactive weights are zero.
        for m0, m1, p in zip(jax.tree.leaves(old), jax.tree.leaves(masks), jax.tree.leaves(
                [params[k]["kernel"] for k in ("conv", "dense", "head")])):
            assert np.all(np.asarray(p)[np.asarray(m1 & ~m0)] == 0)
            assert np.all(np.asarray(p)[~np.asarray(m1)] == 0)
    jax.monitoring.unregister_event_duration_listener(on_event)
    # One compilation for all 11 rounds, whatever the rate and the masks: nothing traced after round 1.
    assert traced == []


def test_layer_with_more_momentum_gets_more_regrowth():
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.3)
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    before = sparsity.layer_densities(sparsity.get_masks(state))
    # Momentum only on the dense layer: it must gain weights, the other layers lose theirs.
    momentum = jax.tree.map(jnp.zeros_like, params)
    momentum["dense"]["kernel"] = jnp.ones_like(params["dense"]["kernel"])
    params, state = sparsity.prune_and_regrow(params, _set_momentum(state, momentum), 0.5)
    after = sparsity.layer_densities(sparsity.get_masks(state))
    assert after["dense/kernel"] > before["dense/kernel"]
    assert after["conv/kernel"] < before["conv/kernel"] and after["head/kernel"] < before["head/kernel"]


@pytest.mark.slow
def test_floor_holds_a_starved_layer_and_regrows_it_to_its_floor():
    # a: 16 weights, 8 active, no momentum; b: 16 weights, 8 active, all the momentum. min_layer_fraction
    # 0.5 gives a floor of ceil(0.5 * 8) = 4 units. Rate 0.75 prunes 6 of a's 8 (2 kept) and 6 of b's 8:
    # a is owed 2 back to its floor, b gets the other 10 by momentum. Without a floor, a keeps 2 and
    # its owed weights go to b too.
    weights = {"a": {"kernel": jnp.arange(1, 17, dtype=jnp.float32).reshape(4, 4) * (jnp.arange(16) % 2)
                     .reshape(4, 4)},
               "b": {"kernel": jnp.arange(1, 17, dtype=jnp.float32).reshape(4, 4) * (jnp.arange(16) % 2)
                     .reshape(4, 4)}}
    masks = jax.tree.map(lambda w: w != 0, weights)
    momentum = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    for fraction, expected_a in ((0.5, 4), (0.0, 2)):
        tx = sparsity.sparse_learning(sgd(), density=0.5, min_layer_fraction=fraction, keep_channels=False)
        state = _set_momentum(dataclasses.replace(tx.init(weights), masks=masks), momentum)
        assert tuple(state.min_units) == ((4, 4) if fraction else (1, 1))
        params, new = sparsity.prune_and_regrow(weights, state, 0.75)
        m = sparsity.get_masks(new)
        assert int(m["a"]["kernel"].sum()) == expected_a and nnz(m) == 16
        # a kept its 2 largest (14, 16) and regrew the rest at zero.
        np.testing.assert_array_equal(np.sort(np.asarray(params["a"]["kernel"]).ravel())[-3:], [0, 14, 16])


@pytest.mark.parametrize("structure", sparsity.STRUCTURES)
@pytest.mark.slow
def test_budget_exact_and_floors_hold_over_hundreds_of_rounds_with_skewed_momentum(structure):
    """300 rounds; one layer's momentum is 100x smaller than the others', so momentum redistribution
    starves it round after round: the floor, not luck, must hold it, and the budget never moves."""
    r = np.random.default_rng(0)
    params = {name: {"kernel": jnp.asarray(r.standard_normal(shape), jnp.float32)}
              for name, shape in (("stem", (3, 3, 3, 16)), ("big", (3, 3, 16, 64)), ("proj", (64, 64)),
                                  ("starved", (64, 64)), ("head", (64, 10)))}
    tx = sparsity.sparse_learning(sgd(), density=0.1, structure=structure, min_layer_fraction=0.25)
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    names = sorted(params)  # tree order, as min_units
    floors = dict(zip(names, state.min_units.tolist()))
    unit = {n: (params[n]["kernel"].shape[-1] if structure == "column" else 1) for n in names}
    scale = {n: (0.01 if n == "starved" else 1.0) for n in names}

    @jax.jit
    def perturb(params, masks, key):
        keys = dict(zip(names, jax.random.split(key, 2 * len(names)).reshape(len(names), 2)))
        momentum = {n: {"kernel": scale[n] * jax.random.normal(keys[n][0], params[n]["kernel"].shape)}
                    for n in names}
        params = {n: {"kernel": params[n]["kernel"] + 0.1 * jax.random.normal(keys[n][1], params[n]
                                                                              ["kernel"].shape)}
                  for n in names}
        return sparsity.apply_masks(params, masks), momentum

    budget, lowest = int(state.budget), {n: np.inf for n in names}
    for round_ in range(300):
        params, momentum = perturb(params, sparsity.get_masks(state), jax.random.key(round_))
        params, state = sparsity.prune_and_regrow(params, _set_momentum(state, momentum),
                                                  0.5 * (1 - round_ / 300))
        masks = sparsity.get_masks(state)
        count = nnz(masks)
        if structure == "irregular":
            assert count == budget, round_
        else:
            assert 0 <= budget - count < min_unit(masks, structure), round_
        for n in names:
            units = int(np.asarray(masks[n]["kernel"]).sum()) // unit[n]
            assert units >= floors[n] >= 1, (round_, n, units, floors[n])
            lowest[n] = min(lowest[n], units)
            channels = np.asarray(masks[n]["kernel"]).reshape(-1, unit[n] if structure == "column" else
                                                              masks[n]["kernel"].shape[-1]).any(axis=0)
            assert channels.all(), (round_, n, "an output channel emptied")
    assert lowest["starved"] == floors["starved"]  # it was driven to its floor and held there


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.slow
def test_regrown_weights_restart_with_zero_momentum(inner, reset):
    params = small_params()
    opt = sgd() if inner == "sgd" else optax.adamw(1e-2, weight_decay=1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     sparsity.sparse_learning(opt, density=0.3, reset_regrown_momentum=reset))
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    for i in range(3):  # dense gradients: every weight's momentum is non-zero
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    find = lambda s: sparsity.state.find_momentum(sparsity.find_state(s).inner_state, params)
    before, old_masks = find(state), sparsity.get_masks(state)
    new_params, new_state = sparsity.prune_and_regrow(params, state, 0.5)
    after, new_masks = find(new_state), sparsity.get_masks(new_state)
    grown_any = False
    for name in ("conv", "dense", "head"):
        m0, m1 = np.asarray(old_masks[name]["kernel"]), np.asarray(new_masks[name]["kernel"])
        b, a = np.asarray(before[name]["kernel"]), np.asarray(after[name]["kernel"])
        # Regrown: active now at value zero (new, or pruned and chosen again in the same round).
        grown = m1 & (np.asarray(new_params[name]["kernel"]) == 0)
        assert np.all(np.asarray(params[name]["kernel"])[m0] != 0) and (grown & ~m0).any()
        grown_any |= grown.any()
        assert np.all(b != 0)
        np.testing.assert_array_equal(a[~grown], b[~grown])  # kept and inactive weights keep theirs
        np.testing.assert_array_equal(a[grown], 0.0 if reset else b[grown])
    assert grown_any
    # Nothing else in the optimizer state changed (adam's second moment, counts, the clip's state).
    rest = lambda s: [x for x in jax.tree.leaves(sparsity.find_state(s).inner_state)
                      if not any(x is y for y in jax.tree.leaves(find(s)))]
    for x, y in zip(rest(state), rest(new_state), strict=True):
        np.testing.assert_array_equal(x, y)


def test_no_redistribution_keeps_every_layers_count():
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.3, redistribution="none")
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    counts = {k: int(v.sum()) for k, v in jax.tree_util.tree_leaves_with_path(sparsity.get_masks(state))
              for k in [sparsity.masks.path_name(k)]}
    momentum = jax.tree.map(jnp.zeros_like, params)
    momentum["dense"]["kernel"] = jnp.ones_like(params["dense"]["kernel"])  # would pull every weight
    new_params, new_state = sparsity.prune_and_regrow(params, _set_momentum(state, momentum), 0.5)
    masks = sparsity.get_masks(new_state)
    assert {k: int(v.sum()) for k, v in jax.tree_util.tree_leaves_with_path(masks)
            for k in [sparsity.masks.path_name(k)]} == counts
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sparsity.get_masks(state)),
                                                         jax.tree.leaves(masks)))  # masks did move


@pytest.mark.slow
def test_eager_equals_jit():
    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.3, structure="irregular", distribution="erk")
    state = tx.init(params)
    params = sparsity.apply_masks(params, sparsity.get_masks(state))
    state = _set_momentum(state, jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape),
                                              params))
    jit_out = sparsity.prune_and_regrow(params, state, 0.3)
    with jax.disable_jit():
        eager_out = sparsity.prune_and_regrow(params, state, 0.3)
    for a, b in zip(jax.tree.leaves(jit_out), jax.tree.leaves(eager_out)):
        np.testing.assert_array_equal(a, b)


def test_works_inside_a_chain_state():
    params = small_params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), sparsity.sparse_learning(sgd(), density=0.3))
    state = tx.init(params)
    params, new_state = sparsity.prune_and_regrow(params, state, 0.3)
    assert isinstance(new_state, tuple) and len(new_state) == 2
    assert isinstance(new_state[1], sparsity.SparseLearningState)
    assert nnz(sparsity.get_masks(new_state)) == new_state[1].budget


# ---------------------------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------------------------


def test_prune_rate_schedule():
    linear = sparsity.prune_rate_schedule(0.5, 5)
    np.testing.assert_allclose([linear(e) for e in range(5)], [0.5, 0.375, 0.25, 0.125, 0.0])
    cosine = sparsity.prune_rate_schedule(0.5, 5, kind="cosine")
    # p0/2 (1 + cos(pi e / 4)) by hand: cos(pi/4) = 0.70710678, cos(pi/2) = 0, cos(3 pi/4) = -0.70710678.
    np.testing.assert_allclose([cosine(e) for e in range(5)], [0.5, 0.42677670, 0.25, 0.07322330, 0.0],
                               rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="kind"):
        sparsity.prune_rate_schedule(0.5, 5, kind="step")
    # Rounds fewer than full_rate_steps apart prune proportionally less; long epochs keep the rate.
    short = sparsity.prune_rate_schedule(0.5, 5, steps_per_epoch=5, full_rate_steps=20)
    np.testing.assert_allclose([short(e) for e in range(5)], [0.125, 0.09375, 0.0625, 0.03125, 0.0])
    for steps in (20, 500):
        long = sparsity.prune_rate_schedule(0.5, 5, steps_per_epoch=steps, full_rate_steps=20)
        assert [long(e) for e in range(5)] == [linear(e) for e in range(5)]
    off = sparsity.prune_rate_schedule(0.5, 5, steps_per_epoch=5, full_rate_steps=0)
    assert [off(e) for e in range(5)] == [linear(e) for e in range(5)]
    with pytest.raises(ValueError, match="full_rate_steps"):
        sparsity.prune_rate_schedule(0.5, 5, steps_per_epoch=5, full_rate_steps=-1)


# ---------------------------------------------------------------------------------------------
# Real models.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # SA-ResNet26 at full width
def test_sa_resnet26_parameters():
    model = create_model("sa_resnet26", 10)
    shapes = jax.eval_shape(lambda k: init_model(model, k), jax.random.key(0))["params"]
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    params["head"]["kernel"] = jax.random.normal(jax.random.key(0), shapes["head"]["kernel"].shape)
    tx = sparsity.sparse_learning(sgd(), density=0.1)
    state = tx.init(params)
    masks = sparsity.get_masks(state)
    # Prunable: every conv and dense kernel (attention projections and the classifier included);
    # not the relative embeddings, BN parameters or the head bias.
    stage1 = masks["stage1_block1"]
    pruned = sparsity.is_pruned
    assert pruned(stage1["attention"]["query"]["kernel"]) and pruned(stage1["conv1"]["kernel"])
    assert not pruned(stage1["attention"]["rel_rows"]) and not pruned(stage1["bn1"]["scale"])
    assert pruned(masks["head"]["kernel"]) and not pruned(masks["head"]["bias"])
    active, total = count_nonzero_masked(masks)
    assert total == 8_263_360 and active == state.budget == round(0.1 * 8_263_360)
    params = sparsity.apply_masks(params, masks)
    rng = np.random.default_rng(1)  # numpy draws: one jax.random kernel per leaf shape compiles for 18 s
    momentum = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32)), params)
    params, state = sparsity.prune_and_regrow(params, _set_momentum(state, momentum), 0.5)
    assert count_nonzero_masked(sparsity.get_masks(state))[0] == state.budget


@pytest.mark.slow
def test_mlp_trains_sparse_to_known_accuracy():
    """A 3-layer MLP on 4 Gaussian classes in 16-D at 20% density, prune/regrow after every epoch."""
    r = np.random.default_rng(0)
    centres = r.standard_normal((4, 16)) * 0.7
    labels = r.integers(0, 4, 2400)
    x = (centres[labels] + r.standard_normal((2400, 16))).astype(np.float32)
    xtr, ytr, xte, yte = x[:2000], labels[:2000], x[2000:], labels[2000:]

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        he = lambda k, i, o: jax.random.normal(k, (i, o)) * np.sqrt(2.0 / i)
        return {"l1": {"kernel": he(k1, 16, 128), "bias": jnp.zeros(128)},
                "l2": {"kernel": he(k2, 128, 128), "bias": jnp.zeros(128)},
                "out": {"kernel": he(k3, 128, 4), "bias": jnp.zeros(4)}}

    def apply(p, x):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        h = jax.nn.relu(h @ p["l2"]["kernel"] + p["l2"]["bias"])
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    def train(tx, sparse):
        params = init(jax.random.key(0))
        state = tx.init(params)
        if sparse:
            params = sparsity.apply_masks(params, sparsity.get_masks(state))

        @jax.jit
        def step(p, s, x, y):
            u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
            return optax.apply_updates(p, u), s

        schedule = sparsity.prune_rate_schedule(0.3, 6)
        for epoch in range(6):
            for i in range(0, 2000, 40):
                params, state = step(params, state, xtr[i:i + 40], ytr[i:i + 40])
            if sparse and epoch < 5:
                params, state = sparsity.prune_and_regrow(params, state, schedule(epoch))
        return params, state, float(jnp.mean(jnp.argmax(apply(params, xte), -1) == yte))

    inner = optax.chain(optax.add_decayed_weights(1e-4), sgd())
    params, state, accuracy = train(sparsity.sparse_learning(inner, density=0.2), sparse=True)
    _, _, dense_accuracy = train(inner, sparse=False)
    masks = sparsity.get_masks(state)
    assert sparsity.global_density(masks) == pytest.approx(0.2, abs=1e-4)
    for k in ("l1", "l2", "out"):
        assert np.all(np.asarray(params[k]["kernel"])[~np.asarray(masks[k]["kernel"])] == 0)
    # Chance is 0.25; the Bayes-optimal rule (nearest true centre) reaches 0.905 on this test set and
    # the same MLP trained dense 0.86. At 20% density it must stay within 3 points of dense.
    bayes = float(np.mean(np.argmin(((xte[:, None] - centres[None]) ** 2).sum(-1), -1) == yte))
    print(f"sparse MLP {accuracy:.3f}, dense MLP {dense_accuracy:.3f}, Bayes {bayes:.3f}")
    assert bayes == pytest.approx(0.905, abs=0.005)
    assert accuracy > 0.8 and accuracy > dense_accuracy - 0.03, (accuracy, dense_accuracy)


def test_state_checkpoints_with_orbax(tmp_path):
    import orbax.checkpoint as ocp

    params = small_params()
    tx = sparsity.sparse_learning(sgd(), density=0.3, structure="column")
    state = tx.init(params)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params, "opt_state": state})
        checkpointer.wait_until_finished()
        target = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
        restored = checkpointer.restore(path, target)
    new = restored["opt_state"]
    assert isinstance(new, sparsity.SparseLearningState)
    assert (new.structure, int(new.budget)) == (state.structure, int(state.budget))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# keep_channels: no output channel of an irregularly pruned kernel is ever empty; fan-in rescaling.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_channel_starts_with_a_weight_and_the_budget_stays_exact():
    # At d = 0.1 a (3, 3, 1, 16) stem would get round(14.4) = 14 weights for 16 channels: it is raised to
    # 16 and the 2 come from the largest layer. Without keep_channels the draw leaves channels empty.
    r = np.random.default_rng(0)
    params = {"stem": {"kernel": jnp.asarray(r.standard_normal((3, 3, 1, 16)), jnp.float32)},
              "conv": {"kernel": jnp.asarray(r.standard_normal((3, 3, 16, 32)), jnp.float32)},
              "head": {"kernel": jnp.asarray(r.standard_normal((32, 10)), jnp.float32)}}
    total = 144 + 4608 + 320
    # tree order: conv, head, stem
    assert sparsity.layer_units(params, 0.1, keep_channels=False) == ((462, 31, 14), 507)
    counts, budget = sparsity.layer_units(params, 0.1)
    assert budget == round(0.1 * total) and counts == (460, 31, 16)
    for keep in (True, False):
        state = sparsity.sparse_learning(sgd(), density=0.1, keep_channels=keep).init(params)
        empty = {n: int((~np.asarray(m["kernel"]).reshape(-1, m["kernel"].shape[-1]).any(axis=0)).sum())
                 for n, m in sparsity.get_masks(state).items()}
        assert nnz(sparsity.get_masks(state)) == budget
        assert (set(empty.values()) == {0}) == keep, empty
    with pytest.raises(ValueError, match="fewer than the 58 that keep one weight in every output channel"):
        sparsity.layer_units(params, 0.01)


@pytest.mark.slow
def test_a_channels_last_weight_is_never_pruned():
    # Two channels: channel 0 holds 1 and 2, channel 1 holds 5 alone. Rate 1 prunes ceil(3) = 3 by
    # magnitude under the paper's rule, emptying both channels; with keep_channels each channel's
    # strongest (2 and 5) stays and only the 1 goes.
    weights = {"a": {"kernel": jnp.array([[1.0, 5.0], [2.0, 0.0]])},
               "b": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
    masks = jax.tree.map(lambda w: w != 0, weights)
    momentum = {"a": {"kernel": jnp.array([[0.0, 0.0], [0.0, 3.0]])}, "b": {"kernel": jnp.zeros((2, 2))}}
    for keep, kept_a in ((True, [[0, 5], [2, 0]]), (False, [[0, 0], [0, 0]])):
        tx = sparsity.sparse_learning(sgd(), density=0.5, keep_channels=keep, min_layer_fraction=0.0)
        state = _set_momentum(dataclasses.replace(tx.init(weights), masks=masks, budget=jnp.int32(5)),
                              momentum)
        params, _ = sparsity.prune_and_regrow(weights, state, 1.0)
        np.testing.assert_array_equal(params["a"]["kernel"], kept_a)


def test_fan_in_scaling_restores_each_channels_expected_norm():
    # A (3, 3, 8, 64) kernel masked to d = 0.1: each channel's squared norm is the dense draw's sum over
    # its active weights; scaled by fan_in / active per channel, its expectation is the dense one's.
    r = np.random.default_rng(1)
    dense = jnp.asarray(r.standard_normal((3, 3, 8, 64)), jnp.float32)
    masks = {"k": {"kernel": jnp.asarray(r.uniform(size=dense.shape) < 0.1)}}
    scaled = sparsity.scale_to_fan_in({"k": {"kernel": dense}}, masks)["k"]["kernel"]
    m = np.asarray(masks["k"]["kernel"]).reshape(72, 64)
    factor = np.sqrt(72 / np.maximum(m.sum(0), 1))
    np.testing.assert_allclose(np.asarray(scaled).reshape(72, 64),
                               np.where(m, np.asarray(dense).reshape(72, 64) * factor, 0), rtol=1e-6)
    sq = (np.asarray(scaled) ** 2).reshape(72, 64).sum(0)
    assert abs(sq.mean() / 72 - 1) < 0.15  # the dense draw's expected squared norm per channel is 72
    assert np.asarray(masks["k"]["kernel"]).reshape(72, 64).sum(0).min() > 0
