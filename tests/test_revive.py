"""Dormant channels: the probe (:mod:`alite_jax.activity`) against numpy, the revival rule
(:func:`alite_jax.sparsity.revive_dormant`) against a numpy reading of its docstring, and the trainer's
round (:func:`alite_jax.methods.sparse.sparse_round`) with and without a probe.

The end-to-end effect (a layer's weights at the dense run's scale after the rounds) is the regression of
tests/test_training_health.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alite_jax import activity, sparsity
from alite_jax.config import base_config
from alite_jax.methods.sparse import sparse_optimizer, sparse_round


class Net(nn.Module):
    """A 3x3 convolution, BatchNorm, ReLU, global average and a dense head."""

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(6, (3, 3), padding="SAME", use_bias=False, name="conv")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(y))
        return nn.Dense(4, name="head")(jnp.mean(y, axis=(1, 2)))


def conv_same_3x3(x, w):
    """A naive 'SAME' 3x3 convolution in float64: x (N, H, W, C), w (3, 3, C, F)."""
    n, h, wd, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[-1]))
    for i in range(h):
        for j in range(wd):
            out[:, i, j] = np.einsum("nabc,abcf->nf", padded[:, i:i + 3, j:j + 3], w)
    return out


def test_output_variance_is_each_channels_variance_over_the_batch():
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    variables = Net().init(jax.random.key(1), x)
    kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
    kernel[..., 2] = 0.0  # a channel constant over the batch: its variance is exactly 0
    variables = {**variables, "params": {**variables["params"], "conv": {"kernel": jnp.asarray(kernel,
                                                                                              jnp.float32)}}}
    conv = conv_same_3x3(np.asarray(x, np.float64), kernel)
    flat = conv.reshape(-1, 6)
    normed = np.maximum((conv - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), 0.0)  # train-mode BN, init
    head = normed.mean(axis=(1, 2)) @ np.asarray(variables["params"]["head"]["kernel"], np.float64)

    got = activity.output_variance(Net(), variables, x)
    jitted = activity.make_output_variance(Net())(variables, x, jax.random.key(0))
    assert jax.tree.structure(got) == jax.tree.structure({"conv": {"kernel": 0}, "head": {"kernel": 0}})
    for tree in (got, jitted):
        # float32 sums of 27 products and of 100 squares: a few ulps of relative error each
        np.testing.assert_allclose(tree["conv"]["kernel"], flat.var(0), rtol=1e-4)
        np.testing.assert_allclose(tree["head"]["kernel"], head.var(0), rtol=1e-4, atol=1e-7)
        assert tree["conv"]["kernel"][2] == 0.0


def naive_revival(params, before, after, variance, threshold):
    """Which weights are drawn and at what scale, read from the docstring with numpy: regrown (after and
    not before) in a channel whose variance is below the threshold; the scale the root-mean-square of
    the weights kept (before and after) in the other channels, He's sqrt(2 / fan_in) without any."""
    dormant = variance < threshold
    drawn = after & ~before & dormant
    kept_live = after & before & ~dormant
    scale = (np.sqrt(np.mean(np.square(params[kept_live]))) if kept_live.any()
             else np.sqrt(2.0 / (params.size // params.shape[-1])))
    return drawn, scale


def round_like(seed, shape, channels_dormant, all_dormant=False):
    """Params, masks before and after a round (regrown weights zero, as the round leaves them) and the
    channels' variances (dormant ones well under the threshold, one exactly at it: not dormant)."""
    r = np.random.default_rng(seed)
    before = r.random(shape) < 0.3
    after = (before & (r.random(shape) < 0.7)) | (~before & (r.random(shape) < 0.4))
    params = np.where(after & before, r.standard_normal(shape) * 0.7, 0.0).astype(np.float32)
    variance = r.uniform(0.1, 2.0, shape[-1]).astype(np.float32)
    for i, c in enumerate(channels_dormant):
        variance[c] = (0.0, 1e-9, 1e-7)[i % 3]
    variance[-1] = sparsity.DORMANT_VARIANCE
    if all_dormant:
        variance[:] = 0.0
    return params, before, after, variance


def test_revive_draws_the_regrown_weights_of_dormant_channels_at_the_layers_scale():
    conv, conv_before, conv_after, conv_var = round_like(0, (3, 3, 64, 8), (0, 3, 5))
    dense, dense_before, dense_after, dense_var = round_like(1, (256, 6), (1, 2), all_dormant=True)
    bias = np.ones(8, np.float32)
    params = {"conv": {"kernel": jnp.asarray(conv), "bias": jnp.asarray(bias)},
              "dense": {"kernel": jnp.asarray(dense)}, "other": {"kernel": jnp.asarray(dense)}}
    scalar = jnp.asarray(True)
    before = {"conv": {"kernel": jnp.asarray(conv_before), "bias": scalar},
              "dense": {"kernel": jnp.asarray(dense_before)}, "other": {"kernel": jnp.asarray(dense_before)}}
    after = {"conv": {"kernel": jnp.asarray(conv_after), "bias": scalar},
             "dense": {"kernel": jnp.asarray(dense_after)}, "other": {"kernel": jnp.asarray(dense_after)}}
    # "other" has no variance: it is left as it is
    variance = {"conv": {"kernel": jnp.asarray(conv_var)}, "dense": {"kernel": jnp.asarray(dense_var)}}
    key = jax.random.key(7)
    eager = sparsity.revive_dormant(params, before, after, variance, key)
    jitted = jax.jit(sparsity.revive_dormant)(params, before, after, variance, key)
    for new, revived in (eager, jitted):
        np.testing.assert_array_equal(new["conv"]["bias"], bias)
        np.testing.assert_array_equal(new["other"]["kernel"], dense)
        assert set(revived) == {"conv/kernel", "dense/kernel"}
        for name, p, b, a, v in (("conv", conv, conv_before, conv_after, conv_var),
                                 ("dense", dense, dense_before, dense_after, dense_var)):
            drawn, scale = naive_revival(p, b, a, v, sparsity.DORMANT_VARIANCE)
            got = np.asarray(new[name]["kernel"])
            np.testing.assert_array_equal(got[~drawn], p[~drawn])  # nothing else moves
            assert np.all(got[drawn] != 0.0) and int(revived[f"{name}/kernel"]) == drawn.sum() > 100
            # the draws' RMS: relative standard error 1 / sqrt(2 n), n > 100 draws; 25% is > 3.5 of them
            rms = np.sqrt(np.mean(np.square(got[drawn])))
            assert abs(rms / scale - 1.0) < 0.25, (name, rms, scale)
        # "dense" has no live channel: He's sqrt(2 / 256) = 0.088, not its kept weights' RMS (about 0.7)
        kept = dense[dense_after & dense_before]
        he_rms = np.sqrt(np.mean(np.square(np.asarray(new["dense"]["kernel"])[dense_after & ~dense_before])))
        assert he_rms < 0.5 * np.sqrt(np.mean(np.square(kept))), (he_rms, kept.std())
    np.testing.assert_allclose(jitted[0]["conv"]["kernel"], eager[0]["conv"]["kernel"], rtol=1e-6)


def test_revive_reads_the_masks_of_optimizer_states():
    params = {"conv": {"kernel": jnp.ones((3, 3, 4, 8)) * 0.1}}
    tx = sparsity.sparse_learning(optax.sgd(0.1, momentum=0.9), density=0.3, seed=0)
    state = tx.init(params)
    params = sparsity.apply_masks(params, state)
    masks = sparsity.get_masks(state)
    grads = {"conv": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 4, 8))}}
    _, later = sparsity.prune_and_regrow(params, tx.update(grads, state, params)[1], 0.5)
    variance = {"conv": {"kernel": jnp.zeros(8)}}
    from_states = sparsity.revive_dormant(params, state, later, variance, jax.random.key(0))
    from_masks = sparsity.revive_dormant(params, masks, sparsity.get_masks(later), variance,
                                         jax.random.key(0))
    np.testing.assert_array_equal(from_states[0]["conv"]["kernel"], from_masks[0]["conv"]["kernel"])
    assert int(from_states[1]["conv/kernel"]) > 0


@pytest.mark.parametrize("revive", [True, False])
def test_the_trainers_round_revives_dormant_channels_through_its_probe(revive):
    config = base_config()
    config.num_epochs, config.seed = 3, 0
    config.sparsity.density, config.sparsity.revive_dormant = 0.3, revive
    r = np.random.default_rng(0)
    params = {"conv": {"kernel": jnp.asarray(r.standard_normal((3, 3, 16, 8)), jnp.float32)}}
    tx = sparse_optimizer(config, optax.sgd(0.1, momentum=0.9), steps_per_epoch=30)
    opt_state = tx.init(params)
    params = sparsity.apply_masks(params, opt_state)
    for k in range(3):  # momentum for the round to read
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(k), p.shape), params)  # noqa: B023
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = dict(params=params, batch_stats={}, opt_state=opt_state)
    before = np.asarray(sparsity.get_masks(opt_state)["conv"]["kernel"])
    variance = np.ones(8, np.float32)
    variance[[1, 6]] = 0.0
    seen = []

    def probe(s):
        seen.append(s)
        return {"conv": {"kernel": jnp.asarray(variance)}}

    new, row = sparse_round(config, state, 0, 30, probe)
    plain, plain_row = sparse_round(config, state, 0, 30)
    after = np.asarray(sparsity.get_masks(new["opt_state"])["conv"]["kernel"])
    drawn = after & ~before & (variance < sparsity.DORMANT_VARIANCE)
    got, zeroed = np.asarray(new["params"]["conv"]["kernel"]), np.asarray(plain["params"]["conv"]["kernel"])
    assert "revived" not in plain_row and drawn.sum() > 0
    if revive:
        assert row["revived"] == drawn.sum()
        # the probe saw the round's weights: regrown weights at zero
        np.testing.assert_array_equal(seen[0]["params"]["conv"]["kernel"], zeroed)
        assert np.all(got[drawn] != 0.0)
        np.testing.assert_array_equal(got[~drawn], zeroed[~drawn])
    else:
        assert "revived" not in row and not seen
        np.testing.assert_array_equal(got, zeroed)
    # the last epoch has no round, so no revival
    _, last = sparse_round(config, state, config.num_epochs - 1, 30, probe)
    assert "revived" not in last
