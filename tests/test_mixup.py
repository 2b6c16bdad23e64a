"""Batch Mixup/CutMix inside jit (alite_jax/data/mixup.py): timm's batch mode, its statistics and exact
CutMix boxes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.data.mixup import mix_batch, mix_params, smooth_one_hot

B, H, W, C, K = 6, 16, 20, 3, 10
# The hyperparameters are traced: one compiled program per shape serves every setting below, provided
# every call passes all of them (a call with other keyword arguments would compile another program).
FULL = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, correct_lam=True)
_jit_mix = jax.jit(mix_batch, static_argnums=3)
_jit_params = jax.jit(lambda k, kw: mix_params(k, H, W, **kw))
_vmap_params = jax.jit(jax.vmap(lambda k, kw: mix_params(k, H, W, **kw), in_axes=(0, None)))


def _full(kw, **extra):
    """Every hyperparameter, the floats as floats (the same traced types in every call)."""
    kw = {**FULL, **extra, **kw}
    return {k: v if isinstance(v, bool) else float(v) for k, v in kw.items()}


def jit_mix(key, x, y, num_classes, **kw):
    """mix_batch under jit (one compiled program per shape and dtype, whatever the settings)."""
    return _jit_mix(key, x, y, num_classes, **_full(kw, label_smoothing=0.1))


def jit_params(key, **kw):
    """mix_params for an H x W image under jit (one compiled program for every setting)."""
    return _jit_params(key, _full(kw))


def _batch(dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (B, H, W, C)) * 50 + 100
    return x.astype(dtype), jnp.array([0, 1, 2, 3, 4, 5])


def _params(n, **kw):
    keys = jax.random.split(jax.random.key(1), n)
    return _vmap_params(keys, _full(kw))


def test_smooth_one_hot():
    y = smooth_one_hot(jnp.array([2, 0]), 5, 0.1)
    np.testing.assert_allclose(y, [[0.02, 0.02, 0.92, 0.02, 0.02], [0.92, 0.02, 0.02, 0.02, 0.02]], rtol=1e-6)
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(smooth_one_hot(jnp.array([1]), 3, 0.0), [[0, 1, 0]])


@pytest.mark.slow
def test_targets_are_distributions_within_off_and_on():
    x, y = _batch()
    off, on = 0.1 / K, 1 - 0.1 + 0.1 / K
    for seed in range(20):
        _, t = jit_mix(jax.random.key(seed), x, y, K)
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        assert float(t.min()) >= off - 1e-7 and float(t.max()) <= on + 1e-6


@pytest.mark.slow
def test_mixup_lam_is_beta_and_images_are_the_convex_combination():
    p = _params(4000, cutmix_alpha=0.0)
    lam = np.asarray(p.lam)
    assert not np.asarray(p.use_cutmix).any()
    var = 0.8 * 0.8 / (1.6 ** 2 * 2.6)  # Beta(0.8, 0.8)
    assert abs(lam.mean() - 0.5) < 4 * math.sqrt(var / len(lam))
    assert abs(lam.var() - var) < 0.01
    x, y = _batch()
    key = jax.random.key(3)
    mixed, t = jit_mix(key, x, y, K, cutmix_alpha=0.0, label_smoothing=0.0)
    lam = jit_params(key, cutmix_alpha=0.0).lam
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(t[0, 0], lam, rtol=1e-6)
    np.testing.assert_allclose(t[0, 5], 1 - lam, rtol=1e-5, atol=1e-6)


def test_cutmix_box_area_is_one_minus_lam_and_the_box_holds_the_flipped_batch():
    x, y = _batch()
    for seed in range(30):
        key = jax.random.key(seed)
        p = jit_params(key, mixup_alpha=0.0)
        assert bool(p.use_cutmix)
        yl, yh, xl, xh = (int(v) for v in p.box)
        assert 0 <= yl <= yh <= H and 0 <= xl <= xh <= W
        assert float(p.lam) == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W), abs=1e-7)
        mixed, t = jit_mix(key, x, y, K, mixup_alpha=0.0, label_smoothing=0.0)
        inside = np.zeros((H, W), bool)
        inside[yl:yh, xl:xh] = True
        np.testing.assert_array_equal(np.asarray(mixed)[:, inside], np.asarray(x)[::-1][:, inside])
        np.testing.assert_array_equal(np.asarray(mixed)[:, ~inside], np.asarray(x)[:, ~inside])
        np.testing.assert_allclose(t[0, 0], p.lam, rtol=1e-6)


def test_cutmix_box_follows_rand_bbox():
    """Without lam correction the box has timm's rand_bbox sides before clipping: int(side * sqrt(1-lam))."""
    p = _params(4000, mixup_alpha=0.0, correct_lam=False)  # 4000 as elsewhere: one program
    yl, yh, xl, xh = (np.asarray(v) for v in p.box)
    cut_h = np.floor(H * np.sqrt(1 - np.asarray(p.lam))).astype(int)
    cut_w = np.floor(W * np.sqrt(1 - np.asarray(p.lam))).astype(int)
    assert np.all(yh - yl <= cut_h) and np.all(xh - xl <= cut_w)
    interior = (yl > 0) & (yh < H) & (xl > 0) & (xh < W)
    assert interior.mean() > 0.05
    assert np.all((yh - yl)[interior] == cut_h[interior]) and np.all((xh - xl)[interior] == cut_w[interior])
    lam = np.asarray(p.lam)
    assert abs(lam.mean() - 0.5) < 4 * math.sqrt(1 / 12 / len(lam))  # Beta(1, 1) before correction
    corrected = np.asarray(_params(4000, mixup_alpha=0.0).lam)
    assert corrected.mean() > lam.mean()  # clipping only shrinks the box


def test_switch_and_prob():
    p = _params(4000)
    cut = np.asarray(p.use_cutmix)
    assert abs(cut.mean() - 0.5) < 4 * math.sqrt(0.25 / len(cut))
    p = _params(4000, prob=0.3)
    cut = np.asarray(p.use_cutmix)
    mixed = cut | (np.asarray(p.lam) < 1)  # a CutMix box can round to empty (lam 1 after correction)
    assert abs(mixed.mean() - 0.3) < 4 * math.sqrt(0.21 / len(mixed))
    assert abs(cut.mean() - 0.15) < 4 * math.sqrt(0.15 * 0.85 / len(cut))


def test_no_mixing_when_prob_is_zero():
    x, y = _batch()
    mixed, t = jit_mix(jax.random.key(0), x, y, K, prob=0.0)
    np.testing.assert_array_equal(mixed, x)
    np.testing.assert_allclose(t, smooth_one_hot(y, K, 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        mix_batch(jax.random.key(0), x, y, K, mixup_alpha=0.0, cutmix_alpha=0.0)


@pytest.mark.slow
def test_eager_equals_jit_and_dtype_is_kept():
    x, y = _batch()
    for seed, kw in ((0, {}), (3, {"mixup_alpha": 0.0}), (1, {"cutmix_alpha": 0.0})):  # both, CutMix, Mixup
        key = jax.random.key(seed)
        for a, b in zip(mix_batch(key, x, y, K, **kw), jit_mix(key, x, y, K, **kw)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
    # other dtypes (eagerly: the Beta sampler is already compiled)
    xb = x.astype(jnp.bfloat16)
    assert mix_batch(jax.random.key(0), xb, y, K)[0].dtype == jnp.bfloat16
    xu = jnp.clip(x, 0, 255).astype(jnp.uint8)
    mixed_u = mix_batch(jax.random.key(2), xu, y, K, cutmix_alpha=0.0)[0]
    assert mixed_u.dtype == jnp.uint8


@pytest.mark.slow
def test_gradient_flows_through_mixing():
    x, y = _batch()

    def loss(images, key):
        mixed, t = mix_batch(key, images, y, K)
        logits = mixed.mean(axis=(1, 2)) @ jnp.ones((C, K))
        return -(t * jax.nn.log_softmax(logits)).sum()

    grad = jax.jit(jax.grad(loss))
    for seed in range(4):
        g = grad(x, jax.random.key(seed))
        assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_the_trainer_mixes_as_the_data_config_asks():
    """train.batch_mixing: nothing by default, smoothing alone keeps the images, DeiT's recipe mixes."""
    from alite_jax import train
    from alite_jax.config import base_config

    config = base_config()
    assert train.batch_mixing(config, 10) is None
    config.data.label_smoothing = 0.1
    images, labels = jnp.ones((4, 8, 8, 3)), jnp.array([0, 1, 2, 3])
    same, targets = train.batch_mixing(config, 10)(jax.random.key(0), images, labels)
    assert same is images
    np.testing.assert_allclose(targets, smooth_one_hot(labels, 10, 0.1))
    config.data.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    mix = train.batch_mixing(config, 10)
    assert mix.func is mix_batch and mix.keywords == dict(
        num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
