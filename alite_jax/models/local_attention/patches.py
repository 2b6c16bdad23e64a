"""``impl="patches"``: local attention by gathering every pixel's k x k neighbourhood.

The gather is ``lax.conv_general_dilated_patches``; its custom VJP folds the cotangent back with k^2
shifted adds instead of JAX's transpose of the patches op (a convolution with a huge one-hot filter).
Simple and exact, memory bound (k^2 copies of keys and values): the reference the faster
implementations are checked against.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.models.local_attention.registry import register_impl


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
    each, which ran and compiled several times slower on the CPU; benchmarks/RESULTS.md.)
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
