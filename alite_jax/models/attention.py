"""Multi-head local self-attention: the student's replacement for k x k convolutions.

AttentionLite (Kundu & Sundaresan 2021) eq. 1, the layer of SASA (Ramachandran, Parmar et al. 2019):

    y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij.k_ab / sqrt(C_out) + q_ij.r_{a-i,b-j} / C_out^(1/4) ) v_ab

with q = x W_Q, k = x W_K, v = x W_V (1x1 projections, no bias), N heads of d = C_out / N channels each,
heads concatenated. Parameters per layer: 3 C_in C_out (projections) + k C_out (relative embeddings);
they do not grow with k.

Choices the paper leaves open, and what this module does:

* Relative embedding. r_{da,db} is a row-offset embedding (k x C_out/2) concatenated with a column-offset
  embedding (k x C_out/2). ``rel_layout="per_head"`` (default) splits WITHIN each head: the first d/2
  channels of every head see row offsets, the last d/2 column offsets, so every head is position-aware on
  both axes. ``rel_layout="across_heads"`` reproduces the public SASA code: channels [0, C/2) (heads
  0..N/2-1) see only row offsets and [C/2, C) only column offsets. Both have k C_out parameters.
* Scaling. ``scaling="paper"`` (default) is eq. 1: 1/sqrt(C_out) on q.k and C_out^(-1/4) on q.r, with
  C_out the layer's total width (not d). ``"none"`` is SASA's (no scaling); ``"dim_head"`` scales both
  terms by 1/sqrt(d), the Transformer convention.
* Borders. Neighbours outside the image are excluded from the softmax (masked), instead of the public
  code's zero-padded keys that still take part in it. Every pixel attends at least to itself.
* Stride. A stride s > 1 is the stride-1 attention followed by s x s average pooling with stride s
  (SASA §4: "spatial downsampling ... 2x2 average pooling with stride 2 after the attention layer").
* Initialisation. Projections: He normal over fan-out (the public SASA code's kaiming_normal_,
  mode='fan_out'); relative embeddings: N(0, 1), as in that code.
* Precision. With ``dtype=jnp.bfloat16`` the projections and the neighbourhood products run in bfloat16;
  logits and the softmax are accumulated in float32.

The neighbourhood computation sits behind one switch, ``impl``, a key of :data:`IMPLS`. Every entry is
a pure function with the signature of :func:`patches_local_attention`, so faster implementations (blocked
"halo" attention, fused kernels) slot in by registering themselves with :func:`register_impl`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Protocol

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

SCALINGS = ("paper", "none", "dim_head")
REL_LAYOUTS = ("per_head", "across_heads")


class LocalAttentionFn(Protocol):
    """Signature of a local-attention implementation.

    Args:
      q, k, v: (B, H, W, N, d) queries, keys and values, N heads of d channels.
      rel_rows, rel_cols: (kernel_size, N, d) row- and column-offset embeddings laid out per channel
        (zero in the channels an embedding does not touch); index t is offset t - kernel_size // 2.
      kernel_size: the odd neighbourhood extent k.
      qk_scale, qr_scale: the factors on q.k and q.r.
    Returns:
      (B, H, W, N, d): per head, the softmax over in-image neighbours of the logits, applied to v.
    """

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                 rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                 qr_scale: float) -> jax.Array: ...


IMPLS: dict[str, LocalAttentionFn] = {}


def register_impl(name: str) -> Callable[[LocalAttentionFn], LocalAttentionFn]:
    """Decorator that makes a local-attention implementation selectable as ``impl=name``."""

    def wrap(fn: LocalAttentionFn) -> LocalAttentionFn:
        IMPLS[name] = fn
        return fn

    return wrap


# --------------------------------------------------------------------------------------------------
# Neighbourhood gather: conv_general_dilated_patches forward, folding backward.
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def neighbourhood_mask(height: int, width: int, kernel_size: int) -> np.ndarray:
    """(H, W, k*k) booleans: whether neighbour (a, b) (flattened a*k + b) of pixel (i, j) is inside."""
    half = kernel_size // 2
    offsets = np.arange(kernel_size) - half
    rows_ok = (np.arange(height)[:, None] + offsets[None, :] >= 0) & (
        np.arange(height)[:, None] + offsets[None, :] < height)
    cols_ok = (np.arange(width)[:, None] + offsets[None, :] >= 0) & (
        np.arange(width)[:, None] + offsets[None, :] < width)
    mask = rows_ok[:, None, :, None] & cols_ok[None, :, None, :]  # (H, W, k, k)
    mask = mask.reshape(height, width, kernel_size * kernel_size)
    mask.setflags(write=False)
    return mask


def extract_patches(x: jax.Array, kernel_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C, k*k) by the patches op alone (JAX differentiates it itself)."""
    b, h, w, c = x.shape
    p = jax.lax.conv_general_dilated_patches(
        x, (kernel_size, kernel_size), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    # Feature order of the patches op is (channel, kernel row, kernel column), channel-major.
    return p.reshape(b, h, w, c, kernel_size * kernel_size)


def fold_neighbourhoods(g: jax.Array, kernel_size: int) -> jax.Array:
    """Adjoint of :func:`gather_neighbourhoods`: (B, H, W, C, k*k) -> (B, H, W, C).

    Neighbour (a, b) of pixel (i, j) is pixel (i + a - k//2, j + b - k//2), so its cotangent lands there:
    a sum of k^2 shifted slices, accumulated in place into a padded buffer by a loop. (Written as k^2
    unrolled pads, XLA's CPU compiler emits one kernel per pad with the cotangent's producer fused into
    each: measured here, the layer's fwd+bwd ran 1.7x slower and SA-ResNet26's gradient took 5x longer
    to compile, 47 s instead of 9 s.)
    """
    b, h, w, c, kk = g.shape
    half = kernel_size // 2
    by_offset = jnp.moveaxis(g, -1, 0)  # (k*k, B, H, W, C)

    def add_offset(i, acc):
        a, bb = i // kernel_size, i % kernel_size
        window = jax.lax.dynamic_slice(acc, (0, a, bb, 0), (b, h, w, c))
        return jax.lax.dynamic_update_slice(acc, window + by_offset[i].astype(acc.dtype), (0, a, bb, 0))

    # Accumulate in at least float32 so a bfloat16 cotangent does not lose bits over k^2 additions.
    acc = jnp.zeros((b, h + 2 * half, w + 2 * half, c), jnp.promote_types(g.dtype, jnp.float32))
    acc = jax.lax.fori_loop(0, kk, add_offset, acc)
    return acc[:, half:half + h, half:half + w].astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_neighbourhoods(x: jax.Array, kernel_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C, k*k): the k x k zero-padded neighbourhood of every pixel.

    Forward is ``lax.conv_general_dilated_patches``. Its autodiff transpose is a convolution with a huge
    one-hot filter (about 20x slower on CPU), so the backward is :func:`fold_neighbourhoods` instead.
    """
    return extract_patches(x, kernel_size)


def _gather_fwd(x, kernel_size):
    return extract_patches(x, kernel_size), None


def _gather_bwd(kernel_size, _, g):
    return (fold_neighbourhoods(g, kernel_size),)


gather_neighbourhoods.defvjp(_gather_fwd, _gather_bwd)


def _masked_logits(logits: jax.Array, height: int, width: int, kernel_size: int) -> jax.Array:
    """Sets the logits of out-of-image neighbours to a large negative number (softmax weight 0)."""
    mask = jnp.asarray(neighbourhood_mask(height, width, kernel_size))[None, :, :, None, :]
    return jnp.where(mask, logits, jnp.finfo(logits.dtype).min)


@register_impl("patches")
def patches_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                            rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                            qr_scale: float,
                            gather: Callable[[jax.Array, int], jax.Array] = gather_neighbourhoods
                            ) -> jax.Array:
    """Local attention by gathering every pixel's k x k keys and values (k^2 copies of each).

    Simple and exact but memory bound: the gathered keys and values are k^2 times larger than k and v.
    ``gather`` maps (B, H, W, C) to (B, H, W, C, k*k) (benchmarks swap in :func:`extract_patches`).
    """
    b, h, w, n, d = q.shape
    kk = kernel_size * kernel_size
    keys = gather(k.reshape(b, h, w, n * d), kernel_size).reshape(b, h, w, n, d, kk)
    values = gather(v.reshape(b, h, w, n * d), kernel_size).reshape(b, h, w, n, d, kk)
    f32 = jnp.float32
    logits = jnp.einsum("bhwnd,bhwndp->bhwnp", q, keys, preferred_element_type=f32) * qk_scale
    # q.r separates into a row term and a column term: k + k products per head instead of k^2.
    rows = jnp.einsum("bhwnd,and->bhwna", q, rel_rows, preferred_element_type=f32)
    cols = jnp.einsum("bhwnd,cnd->bhwnc", q, rel_cols, preferred_element_type=f32)
    rel = (rows[..., :, None] + cols[..., None, :]).reshape(b, h, w, n, kk)
    logits = _masked_logits(logits + qr_scale * rel, h, w, kernel_size)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhwnp,bhwndp->bhwnd", weights, values, preferred_element_type=f32).astype(v.dtype)


# --------------------------------------------------------------------------------------------------
# The Linen layer.
# --------------------------------------------------------------------------------------------------


def attention_scales(scaling: str, features: int, num_heads: int) -> tuple[float, float]:
    """(q.k factor, q.r factor) for a scaling convention; see the module docstring."""
    if scaling == "paper":
        return 1.0 / math.sqrt(features), features ** -0.25
    if scaling == "none":
        return 1.0, 1.0
    if scaling == "dim_head":
        s = 1.0 / math.sqrt(features // num_heads)
        return s, s
    raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS}")


def check_attention_options(features: int, num_heads: int, kernel_size: int, stride: int,
                            scaling: str, rel_layout: str, impl: str) -> None:
    """Raises ValueError naming the problem and the fix for an inconsistent layer configuration."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number (the window is centred on the "
                         f"pixel); got {kernel_size}")
    if num_heads < 1 or features % num_heads:
        raise ValueError(f"features ({features}) must be divisible by num_heads ({num_heads}); "
                         f"change the width multiplier or the number of heads")
    if rel_layout not in REL_LAYOUTS:
        raise ValueError(f"unknown rel_layout {rel_layout!r}; choose one of {REL_LAYOUTS}")
    if rel_layout == "per_head" and (features // num_heads) % 2:
        raise ValueError(f"rel_layout='per_head' splits each head's {features // num_heads} channels "
                         f"into row and column halves, so channels per head must be even; change "
                         f"the width or num_heads, or use rel_layout='across_heads'")
    if rel_layout == "across_heads" and features % 2:
        raise ValueError(f"rel_layout='across_heads' needs an even number of features, got {features}")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {tuple(IMPLS)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def _rel_tables(rel_rows: jax.Array, rel_cols: jax.Array, num_heads: int,
                rel_layout: str) -> tuple[jax.Array, jax.Array]:
    """Lays the (k, C/2) embeddings out per channel as two (k, N, d) tables, zero where unused."""
    k, half = rel_rows.shape
    c = 2 * half
    d = c // num_heads
    zeros = jnp.zeros((k, num_heads, d // 2), rel_rows.dtype)
    if rel_layout == "per_head":
        rows = jnp.concatenate([rel_rows.reshape(k, num_heads, d // 2), zeros], axis=-1)
        cols = jnp.concatenate([zeros, rel_cols.reshape(k, num_heads, d // 2)], axis=-1)
        return rows, cols
    zeros = jnp.zeros((k, half), rel_rows.dtype)
    rows = jnp.concatenate([rel_rows, zeros], axis=-1).reshape(k, num_heads, d)
    cols = jnp.concatenate([zeros, rel_cols], axis=-1).reshape(k, num_heads, d)
    return rows, cols


class LocalSelfAttention(nn.Module):
    """Multi-head k x k local self-attention with relative position embeddings (paper eq. 1).

    Attributes:
      features: output channels C_out.
      num_heads: N; each head attends with C_out / N channels.
      kernel_size: odd neighbourhood extent k.
      stride: s > 1 average-pools the output s x s (the input height and width must divide by s).
      scaling: "paper" | "none" | "dim_head" (module docstring).
      rel_layout: "per_head" | "across_heads" (module docstring).
      impl: a key of :data:`IMPLS`; every implementation computes the same function.
      dtype: computation dtype (None: from the input and params); param_dtype: parameter dtype.
    """

    features: int
    num_heads: int = 8
    kernel_size: int = 7
    stride: int = 1
    scaling: str = "paper"
    rel_layout: str = "per_head"
    impl: str = "patches"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    rel_init: Callable = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_attention_options(self.features, self.num_heads, self.kernel_size, self.stride,
                                self.scaling, self.rel_layout, self.impl)
        chex.assert_rank(x, 4)
        b, h, w, _ = x.shape
        if h % self.stride or w % self.stride:
            raise ValueError(f"stride {self.stride} needs height and width divisible by it; got {h}x{w}")
        c, n, k = self.features, self.num_heads, self.kernel_size
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        proj = functools.partial(nn.Dense, c, use_bias=False, dtype=dtype, param_dtype=self.param_dtype,
                                 kernel_init=self.kernel_init)
        q = proj(name="query")(x).reshape(b, h, w, n, c // n)
        key = proj(name="key")(x).reshape(b, h, w, n, c // n)
        value = proj(name="value")(x).reshape(b, h, w, n, c // n)
        rel_rows = self.param("rel_rows", self.rel_init, (k, c // 2), self.param_dtype)
        rel_cols = self.param("rel_cols", self.rel_init, (k, c // 2), self.param_dtype)
        rows, cols = _rel_tables(rel_rows.astype(dtype), rel_cols.astype(dtype), n, self.rel_layout)
        qk_scale, qr_scale = attention_scales(self.scaling, c, n)
        y = IMPLS[self.impl](q, key, value, rows, cols, kernel_size=k, qk_scale=qk_scale,
                             qr_scale=qr_scale)
        chex.assert_shape(y, (b, h, w, n, c // n))
        y = y.reshape(b, h, w, c)
        if self.stride > 1:
            y = nn.avg_pool(y, (self.stride, self.stride), strides=(self.stride, self.stride))
        return y
