"""Multi-head local self-attention: the student's replacement for k x k convolutions.

AttentionLite (Kundu & Sundaresan 2021) eq. 1, the layer of SASA (Ramachandran, Parmar et al. 2019):

    y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij.k_ab / sqrt(C_out) + q_ij.r_{a-i,b-j} / C_out^(1/4) ) v_ab

with q = x W_Q, k = x W_K, v = x W_V (1x1 projections, no bias), N heads of d = C_out / N channels each,
heads concatenated. Parameters per layer: 3 C_in C_out (projections) + k C_out (relative embeddings);
they do not grow with k.

Choices the paper leaves open, and what this module does (docs/architectures.md gives the public sources,
among them the PyTorch SASA code meant by "the public SASA code" below):

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
  (SASA, "Replacing Spatial Convolutions": a 2x2 average pooling with stride 2 follows the attention
  layer where spatial downsampling is required).
* Initialisation. Projections: He normal over fan-out (the public SASA code's kaiming_normal_,
  mode='fan_out'); relative embeddings: N(0, 1), as in that code.
* Precision. With ``dtype=jnp.bfloat16`` the projections and the neighbourhood products run in bfloat16;
  logits and the softmax are accumulated in float32.

The neighbourhood computation sits behind one switch, ``impl``, a key of the registry's ``IMPLS``
(:mod:`~alite_jax.models.local_attention.registry`); every entry computes the same function:
``"patches"`` (:mod:`.patches`), ``"halo"`` (:mod:`.halo`), ``"blocked"`` (:mod:`.blocked`), the Pallas
kernels ``"pallas"`` (:mod:`.pallas`) and ``"fused"`` (:mod:`.fused`), both imported on first use, and
``"auto"`` (default: the fastest measured one for the backend).
"""

from __future__ import annotations

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from alite_jax.models.local_attention.registry import IMPLS

Dtype = Any

SCALINGS = ("paper", "none", "dim_head")
REL_LAYOUTS = ("per_head", "across_heads")


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


def rel_tables(rel_rows: jax.Array, rel_cols: jax.Array, num_heads: int,
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
      impl: a key of :data:`~alite_jax.models.local_attention.registry.IMPLS`; every implementation
        computes the same function. "auto" (default) runs the fastest measured one for the backend
        (:func:`~alite_jax.models.local_attention.registry.select_impl`).
      dtype: computation dtype (None: from the input and params); param_dtype: parameter dtype.
    """

    features: int
    num_heads: int = 8
    kernel_size: int = 7
    stride: int = 1
    scaling: str = "paper"
    rel_layout: str = "per_head"
    impl: str = "auto"
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
        rows, cols = rel_tables(rel_rows.astype(dtype), rel_cols.astype(dtype), n, self.rel_layout)
        qk_scale, qr_scale = attention_scales(self.scaling, c, n)
        y = IMPLS[self.impl](q, key, value, rows, cols, kernel_size=k, qk_scale=qk_scale,
                             qr_scale=qr_scale)
        chex.assert_shape(y, (b, h, w, n, c // n))
        y = y.reshape(b, h, w, c)
        if self.stride > 1:
            y = nn.avg_pool(y, (self.stride, self.stride), strides=(self.stride, self.stride))
        return y

