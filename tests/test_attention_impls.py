"""The fast local-attention implementations: halo plans, block and chunk choices, "auto", and Pallas.

tests/test_attention.py checks every implementation ("patches", "halo", "blocked", both families of
"fused"; "pallas" off the CPU) against independent naive references (values, gradients, eager and jit,
bf16, locality, equivariance). Here: the halo bookkeeping by hand, every block shape and chunking of
"halo" and "blocked" (and "blocked_unchunked") against "patches" (itself checked against the naive
references), "blocked"'s symbolic batch and per-platform chunking, the "auto" dispatch, the "pallas"
kernel in interpret mode, and "fused"'s other tilings, option errors and lowering for GPU and TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import LocalSelfAttention
from alite_jax.models import local_attention as A
from alite_jax.models.local_attention import blocked, fused, halo


def _inputs(b, h, w, n, d, k, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, key, v = (jnp.asarray(rng.normal(size=(b, h, w, n, d)), dtype) for _ in range(3))
    rows, cols = (jnp.asarray(rng.normal(size=(k, n, d)), dtype) for _ in range(2))
    return q, key, v, rows, cols


def _values_and_grads(fn, args, cotangent_seed=1):
    out = fn(*args)
    ct = jnp.asarray(np.random.default_rng(cotangent_seed).normal(size=out.shape), out.dtype)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2, 3, 4))(*args)
    return out, grads


def _assert_same(fn, ref, args, atol=2e-5):
    out, grads = _values_and_grads(fn, args)
    ref_out, ref_grads = _values_and_grads(ref, args)
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=1e-5)
    for name, g, r in zip(("q", "k", "v", "rel_rows", "rel_cols"), grads, ref_grads):
        scale = float(jnp.max(jnp.abs(r))) + 1e-6
        np.testing.assert_allclose(g / scale, r / scale, atol=atol, err_msg=f"d{name}")


def test_halo_plan_by_hand():
    # Size 8, blocks of 4, k = 3: windows of 4 + 2 = 6 positions, the first at 0 (clipped from -1), the
    # second at 2 (clipped from 3 so that it stays inside the image).
    plan = A.halo_plan(8, 4, 3)
    assert (plan.window, plan.starts, plan.num_blocks) == (6, (0, 2), 2)
    # Block 1, query x=0 is pixel 4; window position u is pixel 2 + u; offsets -1..1 are u = 1, 2, 3.
    np.testing.assert_array_equal(plan.bias[1, 0] == 0, [False, True, True, True, False, False])
    assert plan.onehot[1, 0, 0, 1] == plan.onehot[1, 0, 1, 2] == plan.onehot[1, 0, 2, 3] == 1
    assert plan.onehot.sum() == (plan.bias == 0).sum()  # one offset per allowed (query, key) pair
    # Block 0, query x=0 is pixel 0: offset -1 is outside the image, so only u = 0, 1 are allowed.
    np.testing.assert_array_equal(np.flatnonzero(plan.bias[0, 0] == 0), [0, 1])
    # A window never exceeds the image: size 5, k = 9 -> one window of the whole axis.
    small = A.halo_plan(5, 2, 9)
    assert (small.window, small.starts) == (5, (0, 0, 0))


@pytest.mark.parametrize("size,expected", [(32, 4), (64, 4), (16, 4), (8, 8), (4, 4), (5, 5)])
def test_default_block(size, expected):
    assert A.default_halo_block(size, 7) == expected


def test_default_chunk():
    budget = A.HALO_CHUNK_BYTES // 4  # float32 logits per chunk
    assert A.default_halo_chunk(32, budget * 4, "cpu") == 1       # one image is over the budget
    assert A.default_halo_chunk(32, budget // 3, "cpu") == 2      # 3 fit, but 3 does not divide 32
    assert A.default_halo_chunk(32, budget // 64, "cpu") == 32    # the whole batch fits
    assert A.default_halo_chunk(32, budget, "cpu") == 1
    assert A.default_halo_chunk(32, budget * 4, "gpu") == 32      # accelerators: no sequential chunks


@pytest.mark.parametrize("block", [None, (1, 1), (2, 3), (3, 2), (7, 5)])
@pytest.mark.parametrize("hw,k", [((5, 7), 3), ((6, 5), 9), ((12, 10), 5)])
@pytest.mark.slow
def test_halo_blocks_match_patches(block, hw, k):
    args = _inputs(2, *hw, 2, 4, k)
    kw = dict(kernel_size=k, qk_scale=0.3, qr_scale=0.7)
    _assert_same(jax.jit(functools.partial(A.halo_local_attention, block=block, **kw)),
                 functools.partial(A.patches_local_attention, **kw), args)


@pytest.mark.parametrize("chunk", [1, 2, 6])
@pytest.mark.slow
def test_halo_chunks_match_patches(chunk):
    args = _inputs(6, 9, 8, 2, 4, 5, seed=3)
    kw = dict(kernel_size=5, qk_scale=0.5, qr_scale=0.5)
    _assert_same(jax.jit(functools.partial(A.halo_local_attention, chunk=chunk, **kw)),
                 functools.partial(A.patches_local_attention, **kw), args)


def test_halo_rejects_chunk_not_dividing_batch():
    with pytest.raises(ValueError, match="chunk 4 must divide the batch 6"):
        A.halo_local_attention(*_inputs(6, 5, 5, 1, 2, 3), kernel_size=3, qk_scale=1.0,
                               qr_scale=1.0, chunk=4)


@pytest.mark.parametrize("impl,block,chunk,hw,k", [  # chunks of one image: the symbolic-batch test below
    ("blocked", None, None, (6, 5), 3), ("blocked", (2, 3), 2, (12, 10), 5),
    ("blocked_unchunked", (3, 2), None, (9, 7), 7)])
@pytest.mark.slow
def test_blocked_matches_patches(impl, block, chunk, hw, k):
    # eager and jit values, and gradients: "blocked" is for inference, but JAX differentiates it
    args = _inputs(4, *hw, 2, 3, k, seed=5)
    kw = dict(kernel_size=k, qk_scale=0.3, qr_scale=0.7)
    options = dict(block=block) if chunk is None else dict(block=block, chunk=chunk)
    fn = functools.partial(A.IMPLS[impl], **options, **kw)
    reference = jax.jit(functools.partial(A.patches_local_attention, **kw))
    _assert_same(jax.jit(fn), reference, args)
    np.testing.assert_allclose(fn(*args), reference(*args), atol=2e-5, rtol=1e-5)


def test_blocked_chunks_the_batch_on_the_cpu_only():
    # A concrete batch whose logits outgrow the CPU's cache budget runs in chunks there (a loop), and
    # whole elsewhere: lax.platform_dependent, so an artifact lowered for both takes the right one.
    args = _inputs(8, 32, 32, 1, 2, 7)
    kw = dict(kernel_size=7, qk_scale=0.3, qr_scale=0.7)
    per_image = 8 * 8 * 16 * 10 * 10  # blocks of 4x4, windows of 10x10
    assert blocked.cpu_chunk(8, per_image) < 8
    assert blocked.cpu_chunk(jax.export.symbolic_shape("b")[0], 1) == 1
    exported = jax.export.export(jax.jit(lambda q, k, v: A.IMPLS["blocked"](q, k, v, *args[3:], **kw)),
                                 platforms=("cpu", "cuda"))(*args[:3])
    text = exported.mlir_module()
    assert "stablehlo.while" in text and "stablehlo.case" in text
    unchunked = jax.jit(lambda q, k, v: A.IMPLS["blocked_unchunked"](q, k, v, *args[3:], **kw))
    assert "while" not in unchunked.lower(*args[:3]).as_text()


@pytest.mark.slow
def test_blocked_takes_a_symbolic_batch():
    args = _inputs(3, 9, 8, 2, 4, 5, seed=2)
    kw = dict(kernel_size=5, qk_scale=0.4, qr_scale=0.6)
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0],) + args[0].shape[1:], jnp.float32)
    for impl in ("blocked", "blocked_unchunked"):
        fn = jax.jit(lambda q, k, v, impl=impl: A.IMPLS[impl](q, k, v, *args[3:], **kw))
        exported = jax.export.export(fn)(spec, spec, spec)
        for batch in (1, 3):
            sub = tuple(a[:batch] for a in args[:3])
            np.testing.assert_allclose(exported.call(*sub), A.patches_local_attention(*sub, *args[3:], **kw),
                                       atol=2e-5, rtol=1e-5)


def test_blocked_rejects_bad_chunk_and_kernel():
    args = _inputs(6, 5, 5, 1, 2, 3)
    with pytest.raises(ValueError, match="chunk 4 must divide the batch 6"):
        A.IMPLS["blocked"](*args, kernel_size=3, qk_scale=1.0, qr_scale=1.0, chunk=4)
    with pytest.raises(ValueError, match="rel_rows has 3 offsets for kernel_size 5"):
        A.IMPLS["blocked"](*args, kernel_size=5, qk_scale=1.0, qr_scale=1.0)


def test_auto_dispatches_per_backend():
    assert A.select_impl("cpu") == "halo"
    assert set(A.AUTO_IMPLS.values()) <= set(A.IMPLS)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
    layers = {impl: LocalSelfAttention(16, num_heads=2, kernel_size=5, impl=impl)
              for impl in ("auto", A.select_impl())}
    variables = layers["auto"].init(jax.random.key(0), x)
    assert LocalSelfAttention(16).impl == "auto"  # the default
    np.testing.assert_array_equal(layers["auto"].apply(variables, x),
                                  layers[A.select_impl()].apply(variables, x))


@pytest.mark.parametrize("shape,block", [((2, 6, 5, 2, 4, 5), None), ((1, 16, 16, 8, 8, 7), (4, 8))])
@pytest.mark.slow
def test_pallas_matches_patches(shape, block):
    # The kernel runs in Pallas' interpret mode here; on GPU/TPU it compiles. Under jit, and eagerly.
    args = _inputs(*shape)
    kw = dict(kernel_size=shape[-1], qk_scale=0.4, qr_scale=0.6)
    fn = functools.partial(A.IMPLS["pallas"], block=block, **kw)
    _assert_same(jax.jit(fn), functools.partial(A.patches_local_attention, **kw), args)
    np.testing.assert_allclose(fn(*args), jax.jit(fn)(*args), atol=1e-6)


@pytest.mark.slow
def test_pallas_layer_bfloat16():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 16)), jnp.float32)
    layer = LocalSelfAttention(16, num_heads=2, kernel_size=3, impl="pallas", dtype=jnp.bfloat16)
    ref = LocalSelfAttention(16, num_heads=2, kernel_size=3, impl="patches", dtype=jnp.float32)
    variables = ref.init(jax.random.key(0), x)
    y, y_ref = layer.apply(variables, x), ref.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    # bfloat16 has an 8-bit mantissa: agreement to ~2% of the output scale.
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - y_ref))) < 0.03 * float(jnp.max(jnp.abs(y_ref)))


@pytest.mark.slow
def test_self_normalising_backward_matches_halo():
    # The pallas impl's backward renormalises its own recomputed logits (o and lse None); on the same
    # inputs it must give the halo backward's gradients, which use the forward's o and lse.
    q, k, v, rows_t, cols_t = _inputs(2, 9, 7, 2, 4, 5, seed=5)
    rows, cols = A.halo_plan(9, 4, 5), A.halo_plan(7, 4, 5)
    heads_major = lambda t: t.transpose(0, 3, 1, 2, 4)  # noqa: E731
    q, k, v = heads_major(q), heads_major(k), heads_major(v)
    o, lse = halo.halo_forward(q, k, v, rows_t, cols_t, rows, cols, 0.4, 0.6)
    do = jnp.asarray(np.random.default_rng(6).normal(size=o.shape), o.dtype)
    with_forward = halo.halo_backward(q, k, v, rows_t, cols_t, o, lse, do, rows, cols, 0.4, 0.6)
    own = halo.halo_backward(q, k, v, rows_t, cols_t, None, None, do, rows, cols, 0.4, 0.6)
    for name, a, b in zip(("q", "k", "v", "rel_rows", "rel_cols"), own, with_forward):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.max(jnp.abs(b))), err_msg=f"d{name}")
    # A normaliser from a forward that rounded its logits differently skews the old form, not the new.
    skewed = halo.halo_backward(q, k, v, rows_t, cols_t, o, lse - 0.5, do, rows, cols, 0.4, 0.6)
    scale = float(jnp.max(jnp.abs(with_forward[2])))
    assert float(jnp.max(jnp.abs(skewed[2] - with_forward[2]))) > 0.1 * scale


# --------------------------------------------------------------------------------------------------
# impl="fused": tilings, padded head dims, options, and the lowering for GPUs and TPUs (run here on the
# CPU: the Triton and Mosaic lowerings need no device; only their compilation does)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform,options,shape", [
    ("gpu", dict(block_tokens=16), (2, 12, 10, 2, 4, 5)),   # blocks that end mid-row; the last is partial
    ("gpu", dict(block_tokens=64, num_warps=2), (1, 9, 11, 1, 6, 7)),  # d = 6 padded to 8
    ("tpu", dict(head_group=2), (1, 7, 9, 4, 6, 3)),         # two programs of 2 heads; d = 6 padded to 8
])
@pytest.mark.slow
def test_fused_tilings_match_patches(platform, options, shape):
    args = _inputs(*shape, seed=7)
    kw = dict(kernel_size=shape[-1], qk_scale=0.35, qr_scale=0.5)
    _assert_same(jax.jit(functools.partial(fused.fused_local_attention, platform=platform, **options, **kw)),
                 functools.partial(A.patches_local_attention, **kw), args)


def test_fused_rejects_bad_options():
    args = _inputs(1, 6, 6, 2, 4, 3)
    kw = dict(kernel_size=3, qk_scale=1.0, qr_scale=1.0)
    with pytest.raises(ValueError, match="block_tokens must be a power of two"):
        fused.fused_local_attention(*args, block_tokens=48, **kw)
    with pytest.raises(ValueError, match="unknown platform 'cuda'"):
        fused.fused_local_attention(*args, platform="cuda", **kw)
    with pytest.raises(ValueError, match="rel_rows has shape .3, 2, 4.; kernel_size 5"):
        fused.fused_local_attention(*args, kernel_size=5, qk_scale=1.0, qr_scale=1.0)
    with pytest.raises(ValueError, match="head_group 3 must divide the 2 heads"):
        fused.fused_local_attention(*args, platform="tpu", head_group=3, **kw)
    # A map too large for one TPU program's VMEM names the implementation to use instead.
    with pytest.raises(ValueError, match="use impl='halo'"):
        fused.fused_geometry((1, 512, 512, 1, 8), 7, 1.0, 1.0, platform="tpu")


def _tensor_sizes(module_text):
    """Element counts of every tensor type in a StableHLO module's text (the kernels' own IR is inside
    their custom calls as bytes, so this sees what XLA allocates)."""
    import re

    sizes = []
    for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", module_text):
        sizes.append(int(np.prod([int(x) for x in dims.rstrip("x").split("x")])))
    return sizes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("platform,target", [("gpu", "cuda"), ("tpu", "tpu")])
def test_fused_lowers_for_the_device_and_keeps_logits_off_it(platform, target, dtype):
    # SA-ResNet26's first attention layer at width 1 (32x32, 64 channels: 8 heads of 8), forward and
    # backward, lowered for the device: Triton or Mosaic TPU takes every kernel, and no array XLA
    # allocates is k*k-sized: the largest is a (padded) map, where the halo impl keeps 10x10-key logits.
    b, h, w, n, d, k = 2, 32, 32, 8, 8, 7
    maps, tables = jax.ShapeDtypeStruct((b, h, w, n, d), dtype), jax.ShapeDtypeStruct((k, n, d), dtype)
    kw = dict(kernel_size=k, qk_scale=0.125, qr_scale=0.35)

    def loss(impl, options):
        fn = functools.partial(A.IMPLS[impl], **kw, **options)
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))

    def lowered(impl, options=None):
        step = jax.jit(jax.value_and_grad(loss(impl, options or {}), argnums=(0, 1, 2, 3, 4)))
        return step.trace(maps, maps, maps, tables, tables).lower(lowering_platforms=(target,)).as_text()

    text = lowered("fused", dict(platform=platform, interpret=False))
    kernels = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    assert text.count(kernels) >= (3 if platform == "gpu" else 2)
    padded_map = b * n * (-(-h * w // 128) * 128) * (-(-d // 8) * 8)
    assert max(_tensor_sizes(text)) <= padded_map
    # The check can fail: halo's lowered program holds its logits (k*k-sized and more).
    assert max(_tensor_sizes(lowered("halo"))) >= b * h * w * n * k * k
