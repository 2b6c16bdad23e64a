"""Tests for ``alite_jax.distill`` (AttentionLite eq. 2: CE + KD + attention transfer).

Values are checked three ways: small cases worked out by hand (arithmetic in the comments), an
independent float64 numpy reference written here from the spec (torch-style adaptive average pooling
with explicit windows, no jax) on random inputs of realistic shapes, and central finite differences of
that reference for the gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.distill import (MODES, attention_map, attention_transfer_loss, cross_entropy,
                               distillation_loss, kd_loss)

LN2, LN3 = math.log(2.0), math.log(3.0)


# ----------------------------------------------------------------------------
# Independent float64 numpy reference
# ----------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    lp = np_log_softmax(logits)
    return -np.mean([lp[i, int(y)] for i, y in enumerate(labels)])


def np_kd(student, teacher, temperature):
    # torch: F.kl_div(input=log q, target=p, reduction="sum") = sum p * (log p - log q); then * T^2 / B.
    s = np.asarray(student, np.float64) / temperature
    t = np.asarray(teacher, np.float64) / temperature
    log_q = np_log_softmax(s)
    p = np.exp(np_log_softmax(t))
    total = 0.0
    for i in range(s.shape[0]):
        for k in range(s.shape[1]):
            if p[i, k] > 0:
                total += p[i, k] * (math.log(p[i, k]) - log_q[i, k])
    return total * temperature**2 / s.shape[0]


def np_adaptive_avg_pool(f, out_h, out_w):
    """torch.nn.functional.adaptive_avg_pool2d on NHWC: window [floor(i*H/h), ceil((i+1)*H/h))."""
    b, big_h, big_w, c = f.shape
    out = np.empty((b, out_h, out_w, c))
    for i in range(out_h):
        h0, h1 = (i * big_h) // out_h, -(-((i + 1) * big_h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * big_w) // out_w, -(-((j + 1) * big_w) // out_w)
            out[:, i, j, :] = f[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
    return out


def np_attention_map(f, p=2.0):
    f = np.asarray(f, np.float64)
    b = f.shape[0]
    a = (np.abs(f) ** p).mean(axis=3).reshape(b, -1)
    norms = np.sqrt((a**2).sum(axis=1, keepdims=True))
    return a / np.maximum(norms, 1e-12)


def np_at(student_features, teacher_features, p=2.0):
    total = 0.0
    for fs, ft in zip(student_features, teacher_features):
        fs, ft = np.asarray(fs, np.float64), np.asarray(ft, np.float64)
        if fs.shape[1] * fs.shape[2] > ft.shape[1] * ft.shape[2]:
            fs = np_adaptive_avg_pool(fs, ft.shape[1], ft.shape[2])
        elif fs.shape[1] * fs.shape[2] < ft.shape[1] * ft.shape[2]:
            ft = np_adaptive_avg_pool(ft, fs.shape[1], fs.shape[2])
        total += np.mean((np_attention_map(fs, p) - np_attention_map(ft, p)) ** 2)
    return total


def np_total(mode, sl, tl, labels, sf, tf, alpha=0.1, beta=1000.0, temperature=4.0, p=2.0):
    terms = {"ce": np_ce(sl, labels)}
    if mode == "ce":
        terms["total"] = terms["ce"]
        return terms
    terms["kd"] = np_kd(sl, tl, temperature)
    terms["total"] = alpha * terms["ce"] + (1 - alpha) * terms["kd"]
    if mode == "kd+at":
        terms["at"] = np_at(sf, tf, p)
        terms["total"] += beta / 2 * terms["at"]
    return terms


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

# (student, teacher) stage shapes, NHWC (random_inputs replaces the batch 4 by its own): channels differ;
# pair 1 pools the student 8x8 -> 4x4, pair 3 pools the teacher 4x4 -> 2x2.
PAIR_SHAPES = (((4, 8, 8, 16), (4, 8, 8, 64)),
               ((4, 8, 8, 32), (4, 4, 4, 128)),
               ((4, 4, 4, 32), (4, 4, 4, 128)),
               ((4, 2, 2, 64), (4, 4, 4, 256)))


@functools.lru_cache(maxsize=None)
def random_inputs(seed=0, batch=4, classes=10):
    rng = np.random.default_rng(seed)
    sl = (2.0 * rng.standard_normal((batch, classes))).astype(np.float32)
    tl = (3.0 * rng.standard_normal((batch, classes))).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    # Normal noise plus a per-position offset in [0, 2), so that the maps are far from uniform.
    def features(shape):
        shape = (batch,) + shape[1:]
        return (rng.standard_normal(shape) + rng.uniform(0, 2, shape[:3] + (1,))).astype(np.float32)

    sf = [features(s) for s, _ in PAIR_SHAPES]
    tf = [features(t) for _, t in PAIR_SHAPES]
    return sl, tl, labels, sf, tf


def as_jax(sl, tl, labels, sf, tf, dtype=jnp.float32):
    return (jnp.asarray(sl, dtype), jnp.asarray(tl, dtype), jnp.asarray(labels),
            [jnp.asarray(f, dtype) for f in sf], [jnp.asarray(f, dtype) for f in tf])


# The tiny attention-transfer case used by several hand-computed tests:
# student f = (2, -2, 2, 1) on a 1x2x2x1 grid -> |f|^2 = (4, 4, 4, 1), ||.|| = sqrt(16+16+16+1) = 7,
#   map_S = (4, 4, 4, 1) / 7;
# teacher f = 1 everywhere (1x2x2x3) -> channel mean of f^2 = (1, 1, 1, 1), ||.|| = 2,
#   map_T = (1, 1, 1, 1) / 2.
# map_S - map_T = (1/14, 1/14, 1/14, -5/14); squares sum to (1 + 1 + 1 + 25) / 196 = 1/7;
# mean over the 4 positions (batch 1) = 1/28.
F_S = np.array([2.0, -2.0, 2.0, 1.0], np.float32).reshape(1, 2, 2, 1)
F_T = np.ones((1, 2, 2, 3), np.float32)
AT_HAND = 1.0 / 28.0


# ----------------------------------------------------------------------------
# 1. Hand-computed values
# ----------------------------------------------------------------------------


def test_cross_entropy_by_hand():
    # softmax([0, ln 3]) = (1, 3) / (1 + 3) = (1/4, 3/4).
    # label 1: -ln(3/4) = ln(4/3); label 0: -ln(1/4) = ln 4; mean = (ln(4/3) + ln 4) / 2 = ln(16/3) / 2.
    logits = jnp.array([[0.0, LN3], [0.0, LN3]])
    assert float(cross_entropy(logits[:1], jnp.array([1]))) == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert float(cross_entropy(logits, jnp.array([1, 0]))) == pytest.approx(math.log(16 / 3) / 2, rel=1e-6)


def test_kd_by_hand_t1():
    # Teacher [0, ln 3] -> p = (1/4, 3/4); student [0, 0] -> q = (1/2, 1/2).
    # KL(p || q) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)) = -ln2/4 + 3/4 (ln3 - ln2) = 3/4 ln3 - ln2
    #            ~= 0.1308120.
    expected = 0.75 * LN3 - LN2
    s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, LN3]])
    assert float(kd_loss(s, t, temperature=1.0)) == pytest.approx(expected, rel=1e-6)
    # Mean over the batch, not the sum: a second row with equal distributions (KL 0) halves it.
    s2, t2 = jnp.array([[0.0, 0.0], [5.0, 5.0]]), jnp.array([[0.0, LN3], [1.0, 1.0]])
    assert float(kd_loss(s2, t2, temperature=1.0)) == pytest.approx(expected / 2, rel=1e-6)
    # Direction of the KL: KL(q || p) = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = ln(4/3)/2 ~= 0.1438
    # differs.
    assert float(kd_loss(t, s, temperature=1.0)) == pytest.approx(math.log(4 / 3) / 2, rel=1e-6)


def test_kd_identical_logits_is_zero():
    z = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.5, 7.0]])
    assert float(kd_loss(z, z, temperature=4.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_scales_as_t_squared(temperature):
    # Teacher [0, T ln 3] at temperature T is softmax([0, ln 3]) = (1/4, 3/4); student [0, 0] stays
    # (1/2, 1/2), so the KL is the T = 1 value (3/4 ln3 - ln2) and the loss is T^2 times it.
    s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, temperature * LN3]])
    expected = temperature**2 * (0.75 * LN3 - LN2)
    assert float(kd_loss(s, t, temperature=temperature)) == pytest.approx(expected, rel=1e-6)


def test_kd_default_temperature_is_4():
    s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 4.0 * LN3]])
    assert float(kd_loss(s, t)) == pytest.approx(16.0 * (0.75 * LN3 - LN2), rel=1e-6)


def test_attention_map_by_hand():
    # See F_S above: map = (4, 4, 4, 1) / 7, in row-major (H, W) order.
    m = attention_map(jnp.asarray(F_S))
    assert m.shape == (1, 4) and m.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(m), [[4 / 7, 4 / 7, 4 / 7, 1 / 7]], rtol=1e-6)
    # Channel mean: 1x1x2x2 with positions (3, 1) and (4, -2): (9+1)/2 = 5, (16+4)/2 = 10;
    # ||(5, 10)|| = sqrt(125) = 5 sqrt 5 -> (1/sqrt5, 2/sqrt5).
    m = attention_map(jnp.array([[[[3.0, 1.0], [4.0, -2.0]]]]))
    np.testing.assert_allclose(np.asarray(m), [[1 / math.sqrt(5), 2 / math.sqrt(5)]], rtol=1e-6)
    # p = 1: |(3, -4, 0, 0)| = (3, 4, 0, 0), norm 5 -> (0.6, 0.8, 0, 0).
    m = attention_map(jnp.array([3.0, -4.0, 0.0, 0.0]).reshape(1, 2, 2, 1), p=1.0)
    np.testing.assert_allclose(np.asarray(m), [[0.6, 0.8, 0.0, 0.0]], rtol=1e-6, atol=1e-7)


def test_attention_map_of_zeros_is_zero_with_finite_gradient():
    # max(||x||, 1e-12): an all-zero map stays 0 (no 0/0), and its gradient is 0 rather than NaN.
    f = jnp.zeros((2, 3, 3, 4))
    assert np.all(np.asarray(attention_map(f)) == 0.0)
    g = jax.jit(jax.grad(lambda x: attention_transfer_loss([x], [jnp.ones((2, 3, 3, 4))])))(f)
    assert np.all(np.isfinite(np.asarray(g)))


def test_at_loss_by_hand():
    at = attention_transfer_loss([jnp.asarray(F_S)], [jnp.asarray(F_T)])
    assert at.dtype == jnp.float32
    assert float(at) == pytest.approx(AT_HAND, rel=1e-6)
    # Summed (not averaged) over pairs; an identical pair adds 0.
    two = attention_transfer_loss([jnp.asarray(F_S)] * 2 + [jnp.asarray(F_T)], [jnp.asarray(F_T)] * 3)
    assert float(two) == pytest.approx(2 * AT_HAND, rel=1e-6)


# 4x4 feature whose 2x2 block means are (2, -2, 2, 1) = F_S, while the blocks are not constant, so
# pooling the features (CRD) differs from pooling the squared features: block means of f^2 would be
# (5, 5, 4, 1) instead of (4, 4, 4, 1).
F_S_BIG = np.array([[1, 3, -1, -3],
                    [3, 1, -3, -1],
                    [2, 2, 1, 1],
                    [2, 2, 1, 1]], np.float32).reshape(1, 4, 4, 1)


def test_at_loss_pools_the_larger_map_by_hand():
    # Student 4x4 pooled to 2x2 is F_S -> 1/28, as above.
    at = attention_transfer_loss([jnp.asarray(F_S_BIG)], [jnp.asarray(F_T)])
    assert float(at) == pytest.approx(AT_HAND, rel=1e-6)
    # Teacher the larger one: pooled instead; the loss is symmetric in the maps, so again 1/28.
    at = attention_transfer_loss([jnp.asarray(F_T)], [jnp.asarray(F_S_BIG)])
    assert float(at) == pytest.approx(AT_HAND, rel=1e-6)
    # Non-square ratios: 4x2 student vs 2x1 teacher, 2x2 blocks. Student blocks (rows): (1,3,3,1) -> 2,
    # (0,0,0,0) -> 0; maps (4, 0)/4 = (1, 0) vs teacher (1, 1)/sqrt2; squared diffs
    # (1 - 1/sqrt2)^2 + (1/sqrt2)^2 = 2 - sqrt2; mean over 2 positions = (2 - sqrt2) / 2.
    fs = jnp.array([[1.0, 3.0], [3.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 4, 2, 1)
    ft = jnp.ones((1, 2, 1, 1))
    assert float(attention_transfer_loss([fs], [ft])) == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-6)


def hand_case():
    # Student logits [0, ln 3], label 1: CE = ln(4/3) (test_cross_entropy_by_hand).
    # Teacher logits [0, 0], T = 1: KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = ln(4/3) / 2.
    # Features: AT = 1/28 (F_S, F_T).
    return (jnp.array([[0.0, LN3]]), jnp.array([[0.0, 0.0]]), jnp.array([1]),
            [jnp.asarray(F_S)], [jnp.asarray(F_T)])


def test_totals_by_hand():
    ce, kd = math.log(4 / 3), math.log(4 / 3) / 2
    args = hand_case()
    kw = dict(alpha=0.1, beta=1000.0, temperature=1.0)

    total, terms = distillation_loss(*args, mode="ce", **kw)
    assert set(terms) == {"ce", "total"}
    assert float(total) == pytest.approx(ce, rel=1e-6)

    # 0.1 ln(4/3) + 0.9 ln(4/3) / 2 = 0.55 ln(4/3) ~= 0.158225
    total, terms = distillation_loss(*args, mode="kd", **kw)
    assert set(terms) == {"ce", "kd", "total"}
    assert float(terms["kd"]) == pytest.approx(kd, rel=1e-6)
    assert float(total) == pytest.approx(0.55 * ce, rel=1e-6)

    # + (1000 / 2) * (1/28) = 17.857142...
    total, terms = distillation_loss(*args, mode="kd+at", **kw)
    assert set(terms) == {"ce", "kd", "at", "total"}
    assert float(terms["at"]) == pytest.approx(AT_HAND, rel=1e-6)
    assert float(total) == pytest.approx(0.55 * ce + 500.0 / 28.0, rel=1e-6)
    assert float(terms["total"]) == float(total)
    for value in terms.values():
        assert value.shape == () and value.dtype == jnp.float32

    # Other weights: alpha 0.5, beta 2 (CRD's beta=1 setting): 0.5 ln(4/3) + 0.5 ln(4/3)/2 + 1/28.
    total, _ = distillation_loss(*args, mode="kd+at", alpha=0.5, beta=2.0, temperature=1.0)
    assert float(total) == pytest.approx(0.75 * ce + AT_HAND, rel=1e-6)


def test_ce_mode_ignores_the_teacher():
    sl, _, labels, _, _ = hand_case()
    total, terms = distillation_loss(sl, None, labels, None, None, mode="ce")
    assert set(terms) == {"ce", "total"} and float(total) == pytest.approx(math.log(4 / 3), rel=1e-6)


def test_defaults_are_eq2_with_the_papers_constants():
    # mode "kd+at", alpha 0.1, beta 1000, T 4, p 2, on the hand case. At T = 4 the student's soft
    # distribution is (1, r) / (1 + r) with r = 3^(1/4) and the teacher's (1/2, 1/2), so
    # KL = -ln 2 - ln(s0 s1) / 2 = -ln 2 - ln(r / (1 + r)^2) / 2, and the KD term is T^2 = 16 times it.
    r = 3.0 ** 0.25
    kd = 16.0 * (-LN2 - 0.5 * math.log(r / (1.0 + r) ** 2))
    total, terms = distillation_loss(*hand_case())
    assert set(terms) == {"ce", "kd", "at", "total"}
    assert float(terms["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(total) == pytest.approx(0.1 * math.log(4 / 3) + 0.9 * kd + 500.0 / 28.0, rel=1e-5)


# ----------------------------------------------------------------------------
# 2. Against the numpy reference on random inputs of realistic shapes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_matches_numpy_reference(mode):
    inputs = random_inputs()
    total, terms = distillation_loss(*as_jax(*inputs), mode=mode)
    expected = np_total(mode, *inputs)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(terms[key]), value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(total), expected["total"], rtol=1e-5)
    if mode == "kd+at":  # the AT term must matter at this scale, or this comparison proves little
        assert 500.0 * expected["at"] > 0.05 * expected["total"]


@pytest.mark.parametrize("temperature,p,alpha,beta",
                         [(1.0, 2.0, 0.3, 2.0), (2.5, 1.0, 0.9, 50.0), (4.0, 3.0, 0.0, 1e4)])
@pytest.mark.slow
def test_matches_numpy_reference_other_settings(temperature, p, alpha, beta):
    inputs = random_inputs(seed=1, batch=3, classes=7)
    kw = dict(alpha=alpha, beta=beta, temperature=temperature, p=p)
    total, terms = distillation_loss(*as_jax(*inputs), mode="kd+at", **kw)
    expected = np_total("kd+at", *inputs, **kw)
    for key, value in expected.items():
        np.testing.assert_allclose(float(terms[key]), value, rtol=1e-5, err_msg=key)


def test_attention_map_matches_numpy_reference():
    f = random_inputs()[3][1]
    np.testing.assert_allclose(np.asarray(attention_map(jnp.asarray(f))), np_attention_map(f),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# 3. jit and gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_eager_and_jit_agree(mode):
    args = as_jax(*random_inputs())
    eager_total, eager_terms = distillation_loss(*args, mode=mode)
    jit_total, jit_terms = jax.jit(functools.partial(distillation_loss, mode=mode))(*args)
    assert set(jit_terms) == set(eager_terms)
    for key in eager_terms:
        np.testing.assert_allclose(float(jit_terms[key]), float(eager_terms[key]), rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(jit_total), float(eager_total), rtol=1e-6)


def test_jit_with_traced_hyperparameters():
    sl, tl, _, sf, tf = as_jax(*random_inputs())
    np.testing.assert_allclose(float(jax.jit(kd_loss)(sl, tl, 2.0)), float(kd_loss(sl, tl, 2.0)), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(attention_transfer_loss)(sf, tf, 2.0)),
                               float(attention_transfer_loss(sf, tf, 2.0)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(attention_map)(sf[0], 2.0)),
                               np.asarray(attention_map(sf[0])), rtol=1e-6)


@pytest.mark.parametrize("mode", ["kd", "kd+at"])
def test_gradients_reach_student_only(mode):
    sl, tl, labels, sf, tf = as_jax(*random_inputs())

    def loss(sl, tl, sf, tf):
        return distillation_loss(sl, tl, labels, sf, tf, mode=mode)[0]

    g_sl, g_tl, g_sf, g_tf = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(sl, tl, sf, tf)
    student_grads = [g_sl] + (g_sf if mode == "kd+at" else [])
    for g in student_grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.any(g != 0.0)
    for g in [g_tl] + g_tf:
        assert np.all(np.asarray(g) == 0.0)


def test_teacher_gradients_zero_in_each_loss():
    sl, tl, _, sf, tf = as_jax(*random_inputs())
    g_s, g_t = jax.jit(jax.grad(kd_loss, argnums=(0, 1)))(sl, tl)
    assert np.any(np.asarray(g_s) != 0) and np.all(np.asarray(g_t) == 0)
    g_s, g_t = jax.jit(jax.grad(attention_transfer_loss, argnums=(0, 1)))(sf, tf)
    assert all(np.any(np.asarray(g) != 0) for g in g_s)
    assert all(np.all(np.asarray(g) == 0) for g in g_t)


# ----------------------------------------------------------------------------
# 4. Gradients against central finite differences of the float64 reference
# ----------------------------------------------------------------------------


def central_differences(fn, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


def test_kd_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((3, 5)).astype(np.float32)
    t = (2 * rng.standard_normal((3, 5))).astype(np.float32)
    temperature = 2.0
    got = np.asarray(jax.jit(jax.grad(kd_loss))(jnp.asarray(s), jnp.asarray(t), temperature))
    want = central_differences(lambda x: np_kd(x, t, temperature), s)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_at_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    shapes = (((2, 4, 4, 3), (2, 2, 2, 5)), ((2, 2, 2, 3), (2, 2, 2, 2)))  # the first pools the student
    sf = [(rng.standard_normal(s) + 1.0).astype(np.float32) for s, _ in shapes]
    tf = [rng.standard_normal(t).astype(np.float32) for _, t in shapes]
    got = jax.jit(jax.grad(attention_transfer_loss))([jnp.asarray(f) for f in sf],
                                                     [jnp.asarray(f) for f in tf])
    for i in range(len(sf)):
        def fn(x, i=i):
            return np_at([x if j == i else f for j, f in enumerate(sf)], tf)
        want = central_differences(fn, sf[i])
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------
# 5. Errors
# ----------------------------------------------------------------------------


def test_unknown_mode():
    with pytest.raises(ValueError) as info:
        distillation_loss(*hand_case(), mode="at")
    message = str(info.value)
    assert "'at'" in message and all(repr(m) in message for m in MODES)


def test_feature_batch_must_match_logits():
    sl, tl, labels, sf, tf = hand_case()
    with pytest.raises(AssertionError):
        distillation_loss(sl, tl, labels, [jnp.ones((2, 2, 2, 1))], [jnp.ones((2, 2, 2, 3))], mode="kd+at")


def test_mismatched_pair_counts():
    sl, tl, labels, sf, tf = hand_case()
    with pytest.raises(ValueError, match=r"2 student and 1 teacher"):
        attention_transfer_loss(sf * 2, tf)
    with pytest.raises(ValueError, match=r"1 student and 2 teacher"):
        distillation_loss(sl, tl, labels, sf, tf * 2, mode="kd+at")


@pytest.mark.parametrize("student_shape,teacher_shape,reason", [
    ((1, 6, 6, 2), (1, 4, 4, 3), "not an integer multiple"),
    ((1, 3, 3, 2), (1, 8, 8, 3), "not an integer multiple"),
    ((1, 8, 8, 2), (1, 4, 3, 3), "not an integer multiple"),
    ((1, 8, 4, 2), (1, 4, 8, 3), "neither map"),
])
def test_non_integer_pooling_ratio(student_shape, teacher_shape, reason):
    fs, ft = jnp.ones(student_shape), jnp.ones(teacher_shape)
    with pytest.raises(ValueError) as info:
        attention_transfer_loss([fs, fs], [fs, ft])
    message = str(info.value)
    assert str(student_shape) in message and str(teacher_shape) in message and reason in message
    assert "pair 1" in message


# ----------------------------------------------------------------------------
# 6. bfloat16 inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs_give_float32_loss(mode):
    f32_args = as_jax(*random_inputs())
    bf16_args = as_jax(*random_inputs(), dtype=jnp.bfloat16)
    assert bf16_args[0].dtype == jnp.bfloat16 and bf16_args[3][0].dtype == jnp.bfloat16
    total, terms = distillation_loss(*bf16_args, mode=mode)
    assert all(v.dtype == jnp.float32 for v in terms.values()) and total.dtype == jnp.float32
    ref_total, ref_terms = distillation_loss(*f32_args, mode=mode)
    for key in ref_terms:
        np.testing.assert_allclose(float(terms[key]), float(ref_terms[key]), rtol=2e-2, err_msg=key)
    # The arithmetic itself is float32: identical to float32 on the bfloat16-rounded values.
    upcast = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, bf16_args)
    up_total, _ = distillation_loss(*upcast, mode=mode)
    np.testing.assert_allclose(float(total), float(up_total), rtol=1e-6)
