"""``impl="flat"``: local attention whose every tensor has rank 4 or less, for TFLite.

The same function as ``impl="patches"`` (every pixel's k x k neighbourhood gathered, then attended),
with the batch, row, column and head axes merged into one before each product: TFLite's BATCH_MATMUL
takes at most 5 dimensions and its broadcasting ops at most 5 or 6, and ``patches``' einsums over
(B, H, W, N, d, k*k) tensors fail to convert ("failed to legalize operation 'tfl.batch_matmul'"). A
batch dimension left symbolic (``jax.export``) or dynamic (TFLite) is merged by reshapes to -1.

Importing this module registers the implementation (:func:`alite_jax.models.register_impl`); the
export imports it. It is for inference: JAX differentiates it, but the training implementations are
faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alite_jax.models import register_impl
from alite_jax.models.local_attention.patches import neighbourhood_mask

IMPL = "flat"


def gather_flat(x: jax.Array, kernel_size: int, channels: int) -> jax.Array:
    """(B, H, W, G * channels) -> (B * H * W * G, channels, k*k): each pixel's zero-padded k x k
    neighbourhood, per group of ``channels`` channels (a head), neighbour (a, b) at a * k + b.

    k^2 slices of the padded input, not the patches op: jax2tf writes that op as a convolution with a
    one-hot filter of k^2 * C^2 constants, which TFLite's converter folds for many minutes."""
    _, h, w, _ = x.shape
    half = kernel_size // 2
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    shifted = [padded[:, a:a + h, b:b + w, :].reshape(-1, channels, 1)
               for a in range(kernel_size) for b in range(kernel_size)]
    return jnp.concatenate(shifted, axis=-1)


@register_impl(IMPL)
def flat_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                         rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                         qr_scale: float) -> jax.Array:
    """Local attention as ``patches`` computes it, in tensors of rank <= 4 (see the module docstring)."""
    b, h, w, n, d = q.shape
    kk = kernel_size * kernel_size
    f32 = jnp.float32
    keys = gather_flat(k.reshape(b, h, w, n * d), kernel_size, d)  # (M, d, kk), M = B*H*W*N
    values = gather_flat(v.reshape(b, h, w, n * d), kernel_size, d)
    qm = q.reshape(-1, 1, d)  # (M, 1, d)
    logits = jnp.matmul(qm, keys, preferred_element_type=f32).reshape(-1, n, kk) * qk_scale  # (B*H*W, N, kk)
    qn = q.reshape(-1, n, d)
    rows = jnp.einsum("mnd,and->mna", qn, rel_rows, preferred_element_type=f32)  # (B*H*W, N, k)
    cols = jnp.einsum("mnd,cnd->mnc", qn, rel_cols, preferred_element_type=f32)
    rel = (rows[:, :, :, None] + cols[:, :, None, :]).reshape(-1, n, kk)
    logits = (logits + qr_scale * rel).reshape(-1, h * w, n, kk)
    mask = jnp.asarray(neighbourhood_mask(h, w, kernel_size)).reshape(1, h * w, 1, kk)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(-1, 1, kk)  # (M, 1, kk)
    out = jnp.matmul(weights, jnp.swapaxes(values, 1, 2), preferred_element_type=f32)  # (M, 1, d)
    return out.reshape(b, h, w, n, d).astype(v.dtype)
