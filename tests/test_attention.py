"""Tests for ``alite_jax.models.LocalSelfAttention`` (AttentionLite eq. 1).

The layer is checked against two independent, deliberately naive references
written directly from the specification:

* ``reference_numpy``: float64 numpy, explicit loops over pixels, heads and
  in-image neighbours; the relative embedding of each channel is looked up
  channel by channel exactly as the spec words it.
* ``reference_jax``: the same per-pixel loop in plain ``jnp`` ops (vectorised
  over batch, heads and neighbours, the neighbour set still built from
  explicit per-pixel bounds), run in float64 so ``jax.grad`` gives reference
  gradients.

Neither reference pads or masks: out-of-image neighbours are simply never put
in the neighbour list.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import LocalSelfAttention
from alite_jax.models import local_attention as attention_module
from alite_jax.models.local_attention import register_impl
from alite_jax.models.local_attention.fused import fused_forward, fused_local_attention

# The fused kernels' TPU family, which "fused" runs only on a TPU: on the CPU it is interpreted like the
# GPU family, and both take every test here (registered through the public extension point).
FUSED_TPU = "fused[tpu]"
if jax.default_backend() == "cpu":
    register_impl(FUSED_TPU)(functools.partial(fused_local_attention, platform="tpu"))

# Every implementation that runs on the default backend. "auto" only dispatches to one of them
# (tested in tests/test_attention_impls.py); on the CPU "pallas" runs in Pallas' interpret mode (~10 s a
# call), so there it has its own, smaller set of cases; on GPU and TPU it compiles and joins every test.
# The fused kernels run interpreted on the CPU too, and take every test everywhere.
# "blocked_unchunked" is "blocked"'s forward without the batch loop (tests/test_attention_impls.py).
IMPLS = tuple(name for name in attention_module.IMPLS
              if name not in ("auto", "blocked_unchunked")
              and not (name == "pallas" and jax.default_backend() == "cpu"))
# "blocked", the export's inference implementation, takes the value, bfloat16 and (jit) gradient tests;
# its eager path, locality and equivariance follow from computing what "patches" computes there.
TRAINING_IMPLS = tuple(name for name in IMPLS if name != "blocked")


# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def make_layer(c_out, heads, k, stride, scaling, layout, impl, dtype_name=None):
    dtype = None if dtype_name is None else getattr(jnp, dtype_name)
    return LocalSelfAttention(
        features=c_out,
        num_heads=heads,
        kernel_size=k,
        stride=stride,
        scaling=scaling,
        rel_layout=layout,
        impl=impl,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


@functools.lru_cache(maxsize=None)
def jitted_apply(layer):
    return jax.jit(layer.apply)


def make_input(seed, b, h, w, c):
    # numpy RNG: no eager XLA compilations for test data.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((b, h, w, c)).astype(np.float32))


def randomize_params(params, seed, rel_std=1.0):
    """Replace every parameter by a random, non-trivial draw of the same shape.

    Kernels get std 1/sqrt(fan_in) (so q, k, v have unit-ish scale); relative
    embeddings get std ``rel_std`` so the position term is as large as the
    content term.  Independent of whatever the layer's initialisers do.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        names = [getattr(p, "key", str(p)) for p in path]
        z = jnp.asarray(rng.standard_normal(leaf.shape).astype(np.float32))
        if "kernel" in names:
            z = z / math.sqrt(leaf.shape[0])
        else:
            z = z * rel_std
        new.append(z.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


@functools.lru_cache(maxsize=None)
def setup_case(c_in, c_out, heads, k, stride, scaling, layout, impl, hw, seed=0,
               dtype_name=None):
    """Layer, variables (random params) and input for one configuration."""
    layer = make_layer(c_out, heads, k, stride, scaling, layout, impl, dtype_name)
    x = make_input(seed, 2, hw[0], hw[1], c_in)
    # Only the structure/shapes of init are needed: every value is replaced.
    variables = jax.eval_shape(layer.init, jax.random.key(seed + 1), x)
    variables = dict(variables)
    variables["params"] = randomize_params(variables["params"], seed + 2)
    return layer, variables, x


def scales(scaling, c_out, heads):
    d = c_out // heads
    if scaling == "paper":
        return 1.0 / math.sqrt(c_out), c_out ** -0.25
    if scaling == "none":
        return 1.0, 1.0
    if scaling == "dim_head":
        return 1.0 / math.sqrt(d), 1.0 / math.sqrt(d)
    raise AssertionError(scaling)


# ----------------------------------------------------------------------------
# Reference (a): numpy float64, literal per-pixel / per-head / per-neighbour
# ----------------------------------------------------------------------------


def _np_params(params):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    return (p["query"]["kernel"], p["key"]["kernel"], p["value"]["kernel"],
            p["rel_rows"], p["rel_cols"])


def _rel_vector_literal(rel_rows, rel_cols, da, db, heads, k, layout):
    """r_{da,db} as a length-C_out vector, built channel by channel per spec."""
    c_out = 2 * rel_rows.shape[1]
    d = c_out // heads
    half = k // 2
    r = np.full(c_out, np.nan)
    if layout == "per_head":
        for n in range(heads):
            for m in range(d // 2):
                r[n * d + m] = rel_rows[da + half, n * (d // 2) + m]
                r[n * d + d // 2 + m] = rel_cols[db + half, n * (d // 2) + m]
    elif layout == "across_heads":
        for c in range(c_out // 2):
            r[c] = rel_rows[da + half, c]
            r[c_out // 2 + c] = rel_cols[db + half, c]
    else:
        raise AssertionError(layout)
    assert not np.isnan(r).any()
    return r


def reference_numpy(params, x, *, heads, k, stride, scaling, layout):
    wq, wk, wv, rel_rows, rel_cols = _np_params(params)
    x = np.asarray(x, np.float64)
    b, hh, ww, _ = x.shape
    c_out = wq.shape[1]
    d = c_out // heads
    half = k // 2
    s_qk, s_qr = scales(scaling, c_out, heads)
    q = x @ wq
    kk = x @ wk
    v = x @ wv
    rel_cache = {}
    y = np.zeros((b, hh, ww, c_out))
    for i in range(hh):
        for j in range(ww):
            neigh = [(a, bb)
                     for a in range(hh) for bb in range(ww)
                     if abs(a - i) <= half and abs(bb - j) <= half]
            assert (i, j) in neigh
            for n in range(heads):
                sl = slice(n * d, (n + 1) * d)
                logits = []
                for (a, bb) in neigh:
                    off = (a - i, bb - j)
                    if off not in rel_cache:
                        rel_cache[off] = _rel_vector_literal(
                            rel_rows, rel_cols, off[0], off[1], heads, k, layout)
                    r = rel_cache[off]
                    logit = (s_qk * np.sum(q[:, i, j, sl] * kk[:, a, bb, sl], -1)
                             + s_qr * np.sum(q[:, i, j, sl] * r[sl], -1))
                    logits.append(logit)
                logits = np.stack(logits, axis=1)  # (B, M)
                logits = logits - logits.max(axis=1, keepdims=True)
                wts = np.exp(logits)
                wts = wts / wts.sum(axis=1, keepdims=True)
                out = np.zeros((b, d))
                for m, (a, bb) in enumerate(neigh):
                    out += wts[:, m:m + 1] * v[:, a, bb, sl]
                y[:, i, j, sl] = out
    if stride == 2:
        h2, w2 = hh // 2, ww // 2
        y = y[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c_out).mean(axis=(2, 4))
    else:
        assert stride == 1
    return y


# ----------------------------------------------------------------------------
# Reference (b): the same loop in jnp (differentiable), run in float64
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("ma", "mb", "heads", "layout", "s_qk", "s_qr"))
def _pixel_attention(q, kk, v, rel_rows, rel_cols, i, j, a0, b0, ra0, rb0, *,
                     ma, mb, heads, layout, s_qk, s_qr):
    """Output of one query pixel (i, j) over the neighbour rectangle
    [a0, a0 + ma) x [b0, b0 + mb), whose offsets index rel_rows from ra0 and
    rel_cols from rb0.  Jitted only so that the per-pixel Python loop below does
    not dispatch (and compile) hundreds of tiny eager ops; the bounds are
    computed explicitly per pixel by the caller."""
    b, _, _, c_out = q.shape
    d = c_out // heads
    hp = jax.lax.Precision.HIGHEST
    ds = jax.lax.dynamic_slice
    r_rows = ds(rel_rows, (ra0, 0), (ma, c_out // 2))  # (ma, C/2)
    r_cols = ds(rel_cols, (rb0, 0), (mb, c_out // 2))  # (mb, C/2)
    if layout == "per_head":
        r_rows = r_rows.reshape(ma, 1, heads, d // 2)
        r_cols = r_cols.reshape(1, mb, heads, d // 2)
    else:
        r_rows = r_rows.reshape(ma, 1, c_out // 2)
        r_cols = r_cols.reshape(1, mb, c_out // 2)
    r = jnp.concatenate([jnp.broadcast_to(r_rows, (ma, mb) + r_rows.shape[2:]),
                         jnp.broadcast_to(r_cols, (ma, mb) + r_cols.shape[2:])],
                        axis=-1).reshape(ma * mb, heads, d)
    k_nb = ds(kk, (0, a0, b0, 0), (b, ma, mb, c_out)).reshape(b, ma * mb, heads, d)
    v_nb = ds(v, (0, a0, b0, 0), (b, ma, mb, c_out)).reshape(b, ma * mb, heads, d)
    q_ij = ds(q, (0, i, j, 0), (b, 1, 1, c_out)).reshape(b, heads, d)
    logits = (s_qk * jnp.einsum("bnd,bmnd->bmn", q_ij, k_nb, precision=hp)
              + s_qr * jnp.einsum("bnd,mnd->bmn", q_ij, r, precision=hp))
    wts = jax.nn.softmax(logits, axis=1)  # over the ma * mb in-image neighbours
    out = jnp.einsum("bmn,bmnd->bnd", wts, v_nb, precision=hp)
    return out.reshape(b, c_out)


@jax.jit
def _projections(x, wq, wk, wv):
    hp = jax.lax.Precision.HIGHEST
    return tuple(jnp.einsum("bhwi,io->bhwo", x, w, precision=hp) for w in (wq, wk, wv))


@functools.partial(jax.jit, static_argnames=("stride",))
def _assemble(rows, stride):
    """Stacks the per-pixel outputs rows[i][j] into (B, H, W, C), then pools."""
    y = jnp.stack([jnp.stack(row, axis=1) for row in rows], axis=1)
    if stride == 2:
        b, hh, ww, c_out = y.shape
        h2, w2 = hh // 2, ww // 2
        y = y[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c_out).mean(axis=(2, 4))
    else:
        assert stride == 1
    return y


def reference_jax(params, x, *, heads, k, stride, scaling, layout):
    wq = params["query"]["kernel"]
    wk = params["key"]["kernel"]
    wv = params["value"]["kernel"]
    rel_rows, rel_cols = params["rel_rows"], params["rel_cols"]
    b, hh, ww, _ = x.shape
    c_out = wq.shape[1]
    half = k // 2
    s_qk, s_qr = scales(scaling, c_out, heads)
    q, kk, v = _projections(x, wq, wk, wv)
    rows = []
    for i in range(hh):
        row = []
        for j in range(ww):
            # In-image neighbours of (i, j): the rectangle [a0, a1) x [b0, b1).
            a0, a1 = max(0, i - half), min(hh, i + half + 1)
            b0, b1 = max(0, j - half), min(ww, j + half + 1)
            # Row offsets a - i for a in [a0, a1) index rel_rows at a - i + half.
            row.append(_pixel_attention(
                q, kk, v, rel_rows, rel_cols, i, j, a0, b0, a0 - i + half, b0 - j + half,
                ma=a1 - a0, mb=b1 - b0, heads=heads, layout=layout, s_qk=s_qk, s_qr=s_qr))
        rows.append(row)
    return _assemble(rows, stride)


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def reference_jax_grads(params, x, ct, **cfg):
    """float64 reference output y and gradients of sum(y * ct) w.r.t. params, x."""
    with jax.enable_x64(True):
        p64, x64, ct64 = _to64(params), _to64(x), _to64(ct)
        assert x64.dtype == jnp.float64

        y, vjp = jax.vjp(lambda p, xx: reference_jax(p, xx, **cfg), p64, x64)
        gp, gx = vjp(ct64)
        return (np.asarray(y), jax.tree_util.tree_map(np.asarray, gp), np.asarray(gx))


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def assert_close(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (elementwise, global scale)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = np.max(np.abs(expected))
    assert scale > 0, f"{what}: reference is identically zero (test would be trivial)"
    err = np.max(np.abs(actual - expected))
    assert err <= rel * scale, (
        f"{what}: max abs err {err:.3e} > {rel:.1e} * scale {scale:.3e} "
        f"(rel err {err / scale:.3e})")


# (H, W), c_in, c_out, heads, k, stride, scaling, layout
VALUE_CASES = [
    ((5, 7), 8, 8, 1, 3, 1, "paper", "per_head"),
    ((5, 7), 8, 16, 8, 7, 1, "paper", "per_head"),
    ((5, 7), 12, 8, 2, 7, 1, "none", "across_heads"),
    ((6, 5), 8, 16, 8, 3, 1, "dim_head", "across_heads"),
    ((6, 5), 16, 8, 2, 7, 1, "dim_head", "per_head"),
    ((6, 5), 8, 8, 1, 5, 1, "none", "across_heads"),
    ((5, 7), 8, 16, 2, 9, 1, "paper", "across_heads"),   # window larger than image
    ((5, 7), 8, 8, 2, 1, 1, "paper", "per_head"),        # k=1: y = x @ Wv
    ((6, 8), 8, 16, 2, 3, 2, "paper", "per_head"),
    ((6, 8), 12, 16, 8, 7, 2, "none", "across_heads"),
    ((6, 8), 8, 8, 2, 5, 2, "dim_head", "across_heads"),
]
VALUE_IDS = [
    "hw{}x{}-cin{}-cout{}-h{}-k{}-s{}-{}-{}".format(c[0][0], c[0][1], *c[1:])
    for c in VALUE_CASES
]


def _cfg(c):
    (hw, c_in, c_out, heads, k, stride, scaling, layout) = c
    return dict(heads=heads, k=k, stride=stride, scaling=scaling, layout=layout)


def _setup(c, impl, seed=0, dtype_name=None):
    (hw, c_in, c_out, heads, k, stride, scaling, layout) = c
    return setup_case(c_in, c_out, heads, k, stride, scaling, layout, impl, hw,
                      seed=seed, dtype_name=dtype_name)


@functools.lru_cache(maxsize=None)
def cached_numpy_reference(c, seed=0, bf16_inputs=False):
    layer, variables, x = _setup(c, IMPLS[0], seed)
    params = variables["params"]
    if bf16_inputs:
        rnd = lambda a: jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)
        params = jax.tree_util.tree_map(rnd, params)
        x = rnd(x)
    return reference_numpy(params, x, **_cfg(c))


# ----------------------------------------------------------------------------
# 0. sanity of the test's own references
# ----------------------------------------------------------------------------


def test_reference_sanity():
    """k=1: attention over the centre pixel only, so y = x @ Wv; and the jnp
    reference equals the numpy one (the gradient tests also check this)."""
    c = VALUE_CASES[2]
    _, variables, x = _setup(c, IMPLS[0])
    p = variables["params"]
    k1 = reference_numpy(
        {"query": p["query"], "key": p["key"], "value": p["value"],
         "rel_rows": p["rel_rows"][:1], "rel_cols": p["rel_cols"][:1]},
        x, heads=c[3], k=1, stride=1, scaling=c[6], layout=c[7])
    assert_close(k1, np.asarray(x, np.float64) @ np.asarray(p["value"]["kernel"], np.float64),
                 1e-12, "k=1 reference")


# ----------------------------------------------------------------------------
# 2. values (float32)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", VALUE_CASES, ids=VALUE_IDS)
def test_values_float32(c, impl):
    layer, variables, x = _setup(c, impl)
    y = jitted_apply(layer)(variables, x)
    ref = cached_numpy_reference(c)
    hh, ww = c[0]
    s = c[5]
    assert y.shape == (2, hh // s, ww // s, c[2])
    assert y.dtype == jnp.float32
    assert_close(y, ref, 1e-5, "output")


def test_position_term_matters():
    """Guard: with the test's random params, the relative term changes outputs
    (so row/col and offset-index mix-ups would be caught by the value tests)."""
    c = VALUE_CASES[1]
    _, variables, x = _setup(c, IMPLS[0])
    p = dict(variables["params"])
    ref = cached_numpy_reference(c)
    p_swapped = dict(p, rel_rows=p["rel_cols"], rel_cols=p["rel_rows"])
    p_flipped = dict(p, rel_rows=p["rel_rows"][::-1], rel_cols=p["rel_cols"][::-1])
    p_zero = dict(p, rel_rows=0 * p["rel_rows"], rel_cols=0 * p["rel_cols"])
    for alt in (p_swapped, p_flipped, p_zero):
        other = reference_numpy(alt, x, **_cfg(c))
        assert np.max(np.abs(other - ref)) > 1e-2 * np.max(np.abs(ref))


BF16_CASES = [VALUE_CASES[1], VALUE_CASES[9]]
BF16_IDS = [VALUE_IDS[1], VALUE_IDS[9]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", BF16_CASES, ids=BF16_IDS)
def test_values_bfloat16(c, impl):
    layer, variables, x = _setup(c, impl, dtype_name="bfloat16")
    y = jitted_apply(layer)(variables, x)
    assert y.dtype == jnp.bfloat16
    # Reference in float64 from the same params/input, rounded to bf16 first
    # (the layer computes in bf16, so that rounding is part of its contract).
    ref = cached_numpy_reference(c, bf16_inputs=True)
    assert_close(np.asarray(y.astype(jnp.float32)), ref, 2e-2, "bf16 output")


# ----------------------------------------------------------------------------
# 3./4. gradients (eager and jit) and eager/jit agreement
# ----------------------------------------------------------------------------

GRAD_CASES = {
    # every pixel near a border
    "hw5x7-cin8-cout8-h2-k7-s1-paper-per_head":
        ((5, 7), 8, 8, 2, 7, 1, "paper", "per_head"),
    "hw5x7-cin12-cout16-h8-k3-s1-dim_head-across_heads":
        ((5, 7), 12, 16, 8, 3, 1, "dim_head", "across_heads"),
    "hw6x8-cin8-cout16-h2-k3-s2-none-across_heads":
        ((6, 8), 8, 16, 2, 3, 2, "none", "across_heads"),
}
GRAD_RUNS = [  # (case id, mode): a covering set, not the full product
    ("hw5x7-cin8-cout8-h2-k7-s1-paper-per_head", "eager"),
    ("hw5x7-cin8-cout8-h2-k7-s1-paper-per_head", "jit"),
    ("hw5x7-cin12-cout16-h8-k3-s1-dim_head-across_heads", "eager"),
    ("hw5x7-cin12-cout16-h8-k3-s1-dim_head-across_heads", "jit"),
    ("hw6x8-cin8-cout16-h2-k3-s2-none-across_heads", "jit"),
]


def _cotangent(layer, variables, x):
    shape = jax.eval_shape(layer.apply, variables, x).shape
    rng = np.random.default_rng(123)
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


@functools.lru_cache(maxsize=None)
def cached_reference_grads(name):
    c = GRAD_CASES[name]
    layer, variables, x = _setup(c, IMPLS[0])
    ct = _cotangent(layer, variables, x)
    return reference_jax_grads(variables["params"], x, ct, **_cfg(c))


def _layer_grad_fn(layer):
    def loss(params, x, ct):
        return jnp.sum(layer.apply({"params": params}, x).astype(jnp.float32) * ct)
    return jax.grad(loss, argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _jitted_grad(layer):
    return jax.jit(_layer_grad_fn(layer))


def _flatten(tree):
    return {"/".join(getattr(q, "key", str(q)) for q in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,mode", GRAD_RUNS, ids=[f"{n}-{m}" for n, m in GRAD_RUNS])
@pytest.mark.slow
def test_gradients(name, mode, impl):
    if impl == "blocked" and mode == "eager":
        pytest.skip("blocked is for inference: its gradients are checked under jit; op by op they take 12 s")
    c = GRAD_CASES[name]
    layer, variables, x = _setup(c, impl)
    assert set(variables) == {"params"}
    ct = _cotangent(layer, variables, x)
    params = variables["params"]
    if mode == "eager":
        with jax.disable_jit():
            gp, gx = _layer_grad_fn(layer)(params, x, ct)
    else:
        gp, gx = _jitted_grad(layer)(params, x, ct)
    ref_y, ref_gp, ref_gx = cached_reference_grads(name)
    # the jnp reference agrees with the literal numpy reference
    assert_close(ref_y, cached_numpy_reference(c), 1e-12, "jnp reference vs numpy reference")
    assert_close(gx, ref_gx, 1e-5, "d/dx")
    names = {"query/kernel", "key/kernel", "value/kernel", "rel_rows", "rel_cols"}
    flat, flat_ref = _flatten(gp), _flatten(ref_gp)
    assert set(flat) == names and set(flat_ref) == names
    for pname in sorted(names):
        assert_close(flat[pname], flat_ref[pname], 1e-5, f"d/d{pname}")


@pytest.mark.parametrize("impl", TRAINING_IMPLS)
@pytest.mark.parametrize("c", [VALUE_CASES[1], VALUE_CASES[9]],
                         ids=[VALUE_IDS[1], VALUE_IDS[9]])
@pytest.mark.slow
def test_eager_matches_jit(c, impl):
    layer, variables, x = _setup(c, impl)
    y_jit = jitted_apply(layer)(variables, x)
    with jax.disable_jit():
        y_eager = layer.apply(variables, x)
    assert y_eager.shape == y_jit.shape and y_eager.dtype == y_jit.dtype
    assert_close(y_eager, y_jit, 1e-6, "eager vs jit")


# ----------------------------------------------------------------------------
# 5. locality of the receptive field
# ----------------------------------------------------------------------------

LOCALITY_CASES = [
    # hw, c_in, c_out, heads, k, stride, scaling, layout, output pixels probed
    ((8, 9), 8, 16, 8, 5, 1, "none", "across_heads",
     [(0, 0), (0, 8), (2, 2), (4, 5), (7, 3), (5, 0), (7, 8)]),
    ((8, 10), 8, 8, 2, 3, 2, "dim_head", "per_head",
     [(0, 0), (1, 2), (3, 4)]),
]


@pytest.mark.parametrize("impl", TRAINING_IMPLS)
@pytest.mark.parametrize("c", LOCALITY_CASES, ids=[
    "hw{}x{}-h{}-k{}-s{}-{}".format(c[0][0], c[0][1], c[3], c[4], c[5], c[7])
    for c in LOCALITY_CASES])
@pytest.mark.slow
def test_gradient_is_local_to_window(c, impl):
    (hw, c_in, c_out, heads, k, stride, scaling, layout, pixels) = c
    layer, variables, x = setup_case(c_in, c_out, heads, k, stride, scaling, layout,
                                     impl, hw, seed=3)
    half = k // 2
    hh, ww = hw

    @jax.jit
    def input_grad(x, ct):
        _, vjp = jax.vjp(lambda xx: layer.apply(variables, xx), x)
        return vjp(ct)[0]

    out_shape = jax.eval_shape(layer.apply, variables, x).shape
    rng = np.random.default_rng(0)
    for (i, j) in pixels:
        ct = np.zeros(out_shape, np.float32)
        ct[0, i, j, :] = rng.normal(size=out_shape[-1])
        g = np.asarray(input_grad(x, jnp.asarray(ct)))
        # stride-1 pixels feeding output (i, j)
        rows = range(stride * i, stride * i + stride)
        cols = range(stride * j, stride * j + stride)
        inside = np.zeros((hh, ww), bool)
        inside[max(0, rows[0] - half):min(hh, rows[-1] + half + 1),
               max(0, cols[0] - half):min(ww, cols[-1] + half + 1)] = True
        gnorm = np.abs(g).sum(-1)  # (B, H, W)
        assert np.all(gnorm[1] == 0), "gradient leaks into another batch element"
        assert np.all(gnorm[0][~inside] == 0), (
            f"pixel {(i, j)}: nonzero gradient outside window at "
            f"{np.argwhere(gnorm[0] * ~inside != 0).tolist()}")
        # every in-image pixel of the window is used (as key/value)
        assert np.all(gnorm[0][inside] > 0), (
            f"pixel {(i, j)}: zero gradient inside window at "
            f"{np.argwhere((gnorm[0] == 0) & inside).tolist()}")


# ----------------------------------------------------------------------------
# 6. translation equivariance away from the borders
# ----------------------------------------------------------------------------

EQUIV_CASES = [
    (8, 16, 2, 3, "paper", "per_head"),
    (8, 16, 8, 5, "none", "across_heads"),
]


@pytest.mark.parametrize("impl", TRAINING_IMPLS)
@pytest.mark.parametrize("c", EQUIV_CASES, ids=[
    "cin{}-cout{}-h{}-k{}-{}-{}".format(*c) for c in EQUIV_CASES])
@pytest.mark.slow
def test_translation_equivariance(c, impl):
    c_in, c_out, heads, k, scaling, layout = c
    hw = (16, 16)
    layer, variables, x = setup_case(c_in, c_out, heads, k, 1, scaling, layout,
                                     impl, hw, seed=5)
    f = jitted_apply(layer)
    y = np.asarray(f(variables, x))
    half = k // 2
    n = hw[0]
    checked = 0
    for dy, dx in [(2, 3), (-3, 1), (0, -2), (1, 0)]:
        xs = jnp.roll(x, (dy, dx), axis=(1, 2))
        ys = np.asarray(f(variables, xs))
        for i in range(n):
            for j in range(n):
                i0, j0 = i - dy, j - dx
                ok = all(half <= t <= n - 1 - half for t in (i, j, i0, j0))
                if ok:
                    np.testing.assert_allclose(
                        ys[:, i, j], y[:, i0, j0], rtol=1e-5,
                        atol=1e-5 * np.abs(y).max(), err_msg=f"shift {(dy, dx)} at {(i, j)}")
                    checked += 1
        # non-triviality: the shifted output really differs from the unshifted one
        assert np.abs(ys - y).max() > 1e-2 * np.abs(y).max()
    assert checked > 100


# ----------------------------------------------------------------------------
# 7./8. parameters, dtypes, configuration errors
# ----------------------------------------------------------------------------

PARAM_CASES = [
    (8, 16, 8, 7, "per_head"),
    (12, 8, 2, 3, "across_heads"),
    (16, 32, 4, 5, "per_head"),
    (6, 4, 1, 1, "across_heads"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", PARAM_CASES, ids=[
    "cin{}-cout{}-h{}-k{}-{}".format(*c) for c in PARAM_CASES])
def test_param_shapes_and_count(c, impl):
    c_in, c_out, heads, k, layout = c
    layer = make_layer(c_out, heads, k, 1, "paper", layout, impl)
    x = jnp.ones((1, 5, 6, c_in), jnp.float32)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert set(params) == {"query", "key", "value", "rel_rows", "rel_cols"}
    for name in ("query", "key", "value"):
        assert set(params[name]) == {"kernel"}, f"{name} must have no bias"
        assert params[name]["kernel"].shape == (c_in, c_out)
    assert params["rel_rows"].shape == (k, c_out // 2)
    assert params["rel_cols"].shape == (k, c_out // 2)
    count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    assert count == 3 * c_in * c_out + k * c_out
    for a in jax.tree_util.tree_leaves(params):
        assert a.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_bfloat16_dtypes(impl):
    c = VALUE_CASES[8]  # stride 2
    layer, variables, x = _setup(c, impl, dtype_name="bfloat16")
    fresh = jax.eval_shape(layer.init, jax.random.key(0), x)
    for a in jax.tree_util.tree_leaves(fresh["params"]):
        assert a.dtype == jnp.float32
    y = jitted_apply(layer)(variables, x)
    assert y.dtype == jnp.bfloat16
    assert y.shape == (2, 3, 4, 16)
    # bf16 input as well
    y2 = jitted_apply(layer)(variables, x.astype(jnp.bfloat16))
    assert y2.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y2.astype(jnp.float32))))


BAD_CONFIGS = [
    pytest.param(dict(features=12, num_heads=8), r"(?i)divisib|head",
                 id="features-not-divisible-by-heads"),
    pytest.param(dict(features=24, num_heads=8, rel_layout="per_head"),
                 r"(?i)even|per_head|head", id="per_head-odd-head-dim"),
    pytest.param(dict(kernel_size=4), r"(?i)kernel|odd", id="even-kernel"),
    pytest.param(dict(impl="no_such_impl"), r"(?i)impl", id="unknown-impl"),
    pytest.param(dict(scaling="bogus"), r"(?i)scaling", id="unknown-scaling"),
    pytest.param(dict(rel_layout="diagonal"), r"(?i)rel_layout|layout",
                 id="unknown-rel_layout"),
]


@pytest.mark.parametrize("overrides,match", BAD_CONFIGS)
def test_bad_configuration_raises(overrides, match):
    kwargs = dict(features=16, num_heads=8, kernel_size=3, stride=1,
                  scaling="paper", rel_layout="per_head", impl=IMPLS[0])
    kwargs.update(overrides)
    x = jnp.ones((1, 5, 5, 8), jnp.float32)
    with pytest.raises(ValueError, match=match):
        layer = LocalSelfAttention(**kwargs)
        jax.eval_shape(layer.init, jax.random.key(0), x)


def test_good_configurations_do_not_raise():
    """Counterpart of the error tests: the boundary cases that are legal."""
    x = jnp.ones((1, 5, 5, 8), jnp.float32)
    for kw in (dict(features=24, num_heads=8, rel_layout="across_heads"),  # odd d ok
               dict(features=16, num_heads=8, kernel_size=1),
               dict(features=8, num_heads=1, kernel_size=5)):
        layer = LocalSelfAttention(**dict(dict(stride=1, scaling="paper",
                                               rel_layout="per_head", impl=IMPLS[0]),
                                          **kw))
        variables = jax.eval_shape(layer.init, jax.random.key(0), x)
        y = jax.eval_shape(layer.apply, variables, x)
        assert y.shape == (1, 5, 5, kw["features"])


# ----------------------------------------------------------------------------
# 9. the fused kernels at the maps SA-ResNet26 has (sides 8, 16 in bfloat16, 32) and a non-square one,
# against a dense float64 reference; and a whole student's training step against halo's
# ----------------------------------------------------------------------------


def reference_dense(q, k, v, rel_rows, rel_cols, *, kernel_size, qk_scale, qr_scale):
    """Every query against every key of the map, keys outside the k x k window masked out; (B, H, W, N,
    d) maps and (k, N, d) tables as the implementations take them. Returns the output, the log-sum-exp
    of the masked logits (B, H, W, N) and the largest |logit| in a window. No blocking, no neighbour
    lists: the definition (eq. 1) over the whole map."""
    b, h, w, n, d = q.shape
    half, length = kernel_size // 2, h * w
    rows, cols = np.divmod(np.arange(length), w)
    d_row = rows[None, :] - rows[:, None]  # (query, key): the key's row offset
    d_col = cols[None, :] - cols[:, None]
    inside = (np.abs(d_row) <= half) & (np.abs(d_col) <= half)
    qf, kf, vf = (t.reshape(b, length, n, d) for t in (q, k, v))

    def relative(table, offset):  # q . table[offset + half] for every (query, key)
        per_offset = jnp.einsum("bpnd,and->bnpa", qf, table)
        index = np.broadcast_to(np.clip(offset + half, 0, kernel_size - 1), (b, n, length, length))
        return jnp.take_along_axis(per_offset, jnp.asarray(index), axis=-1)

    s = (qk_scale * jnp.einsum("bpnd,btnd->bnpt", qf, kf)
         + qr_scale * (relative(rel_rows, d_row) + relative(rel_cols, d_col)))
    biggest = jnp.max(jnp.abs(jnp.where(inside, s, 0.0)))
    s = jnp.where(inside, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bnpt,btnd->bpnd", jnp.exp(s - lse[..., None]), vf)
    return out.reshape(q.shape), lse.transpose(0, 2, 1).reshape(b, h, w, n), biggest


FUSED_FAMILIES = ("gpu", "tpu") if jax.default_backend() == "cpu" else (
    ("tpu",) if jax.default_backend() == "tpu" else ("gpu",))
FUSED_MAPS = [(8, 8), (32, 32), (12, 20)]  # 16x16: test_fused_kernels_bfloat16


def _fused_case(hw, dtype=np.float32, k=7, heads=2, d=8, seed=0):
    """Random maps and tables (rounded to ``dtype``) as float64 numpy arrays, a cotangent, the scales."""
    rng = np.random.default_rng(seed)
    shape = (1,) + hw + (heads, d)
    args = [rng.standard_normal(shape) for _ in range(3)] + [rng.standard_normal((k, heads, d))
                                                             for _ in range(2)]
    args = [np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in args]
    return args, rng.standard_normal(shape), dict(kernel_size=k, qk_scale=0.4, qr_scale=0.6)


def _dense_reference_grads(args, ct, kw):
    """float64: output, lse, the largest window logit, and the gradients of sum(out * ct)."""
    with jax.enable_x64(True):
        a64 = [jnp.asarray(a) for a in args]
        (out, lse, biggest), vjp = jax.vjp(lambda *a: reference_dense(*a, **kw), *a64)
        grads = vjp((jnp.asarray(ct), jnp.zeros_like(lse), jnp.zeros_like(biggest)))
        return np.asarray(out), np.asarray(lse), float(biggest), [np.asarray(g) for g in grads]


def _fused_outputs(family, args, ct, kw, dtype):
    """The fused impl's (jit) output, lse and gradients of sum(out * ct) for q, k, v and both tables."""
    xs = [jnp.asarray(a, dtype) for a in args]
    fn = functools.partial(fused_local_attention, platform=family, **kw)
    out, lse = jax.jit(functools.partial(fused_forward, platform=family, **kw))(*xs)
    grads = jax.jit(lambda *a: jax.vjp(fn, *a)[1](jnp.asarray(ct, out.dtype)))(*xs)
    return out, lse, grads


GRAD_NAMES = ("q", "k", "v", "rel_rows", "rel_cols")


@pytest.mark.parametrize("hw", FUSED_MAPS, ids=[f"{h}x{w}" for h, w in FUSED_MAPS])
@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.slow
def test_fused_kernels_match_the_dense_reference(family, hw):
    args, ct, kw = _fused_case(hw)
    ref_out, ref_lse, biggest, ref_grads = _dense_reference_grads(args, ct, kw)
    out, lse, grads = _fused_outputs(family, args, ct, kw, jnp.float32)
    # float32 rounding: a logit is a sum of d + 2 products (relative error <= (d + 4) u, u = 2^-24, of
    # its largest magnitude, which moves a softmax weight by as much relative to itself); the output and
    # each gradient then sum up to k*k such terms (k*k u more). Hence, of each quantity's scale:
    k, d = kw["kernel_size"], args[0].shape[-1]
    bound = (k * k + d + 4) * 2.0 ** -24 * (1.0 + biggest)
    assert_close(out, ref_out, bound, "output")
    assert_close(lse, ref_lse, bound, "log-sum-exp")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, bound, f"d{name}")


@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.slow
def test_fused_kernels_bfloat16(family):
    # bfloat16 in and out, float32 inside: against the float64 reference on the same bf16-rounded inputs,
    # the error is the final rounding of each output and gradient to bfloat16 (2^-9 of its own size)
    # plus the float32 part above, both well under 2^-7 of the scale.
    args, ct, kw = _fused_case((16, 16), dtype=jnp.bfloat16, seed=1)
    ct = np.asarray(jnp.asarray(ct, jnp.bfloat16).astype(jnp.float32), np.float64)
    ref_out, ref_lse, _, ref_grads = _dense_reference_grads(args, ct, kw)
    out, lse, grads = _fused_outputs(family, args, ct, kw, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert {g.dtype for g in grads} == {jnp.dtype(jnp.bfloat16)}
    assert_close(out.astype(jnp.float32), ref_out, 2.0 ** -7, "output")
    assert_close(lse, ref_lse, 2.0 ** -16, "log-sum-exp")  # float32, from bf16 inputs
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g.astype(jnp.float32), r, 2.0 ** -7, f"d{name}")


@pytest.mark.slow  # two whole students compile (about 30 s on 2 cores, the fused one interpreted)
def test_fused_student_training_step_equals_halos():
    # A whole SA-ResNet (one bottleneck per stage: every attention shape and stride of the student, the
    # stem, BatchNorm in train mode) gives the same loss and parameter gradients with "fused" as with
    # "halo". The two differ by float32 rounding, amplified through the network: measured 2e-5 of each
    # leaf's gradient norm; halo and patches differ by as much. A kernel error (a wrong mask, offset or
    # scale) moves the attention leaves' gradients by O(1) of their norm.
    from alite_jax.models.resnet import ResNet, attention_spatial

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    labels = jnp.arange(2)

    def loss_and_grads(impl):
        spatial = functools.partial(attention_spatial, num_heads=8, kernel_size=7, impl=impl)
        model = ResNet((1, 1, 1, 1), 10, width=0.25, spatial=spatial)
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:1])

        def loss(params):
            (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                         train=True, mutable=["batch_stats"])
            picked = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (loss_halo, grads_halo), (loss_fused, grads_fused) = loss_and_grads("halo"), loss_and_grads("fused")
    assert abs(float(loss_fused) - float(loss_halo)) <= 1e-5 * abs(float(loss_halo))
    flat_halo, flat_fused = _flatten(grads_halo), _flatten(grads_fused)
    assert set(flat_halo) == set(flat_fused) and sum("attention" in n for n in flat_halo) == 4 * 5
    for name, g in flat_fused.items():
        ref = flat_halo[name]
        err = float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))
        assert err <= 1e-3, f"{name}: gradient differs from halo's by {err:.2e} of its norm"
