"""``impl="pallas"``: the halo local attention forward as one fused Pallas kernel per query block.

The kernel computes, for one (image, head, query block), logits against the block's key window, the
softmax and the weighted sum of values, without writing the logits to memory. To keep the kernel a
plain pair of matmuls (what GPU tensor cores and the TPU MXU want), the relative-position term and the
neighbourhood mask are folded into the first matmul by augmenting the features:

    q' = [q * qk_scale, R(q), C(q), -inf-like]     k' = [k, onehot(row of key), onehot(col of key), pad]

where R(q)[u] = qr_scale * q.r_row[offset(u)] (or -inf-like outside the neighbourhood) for each window
row u, C likewise for columns, and ``pad`` is 1 only on the keys added to round the window up to a
power of two. So q'.k' = the full masked logit. Feature, key and query counts are rounded up to powers
of two (at least 16) as Triton-style backends need.

The backward pass is the pure-JAX halo backward (:func:`alite_jax.models.attention._halo_backward`),
which recomputes the logits from the kernel's saved log-sum-exp. On a backend without a Pallas
compiler (the CPU) the kernel runs in Pallas' interpret mode: correct, but slow; it is there so the
kernel is tested everywhere. Not timed on an accelerator yet, so ``impl="auto"`` does not pick it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from alite_jax.models import attention as A

_MIN_DIM = 16


def _pow2(n: int) -> int:
    return max(_MIN_DIM, 1 << (int(n) - 1).bit_length())


def _kernel(qa_ref, ka_ref, v_ref, o_ref, lse_ref):
    qa, ka, v = qa_ref[...], ka_ref[...], v_ref[...]
    s = jax.lax.dot_general(qa, ka, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    m = jnp.max(s, axis=1)
    e = jnp.exp(s - m[:, None])
    denom = jnp.sum(e, axis=1)
    o = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o_ref[...] = (o / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _augmented(qb, k, rel_rows, rel_cols, rows: A.HaloPlan, cols: A.HaloPlan, qk_scale, qr_scale):
    """(G, BQ, E) augmented queries and (G, P, E) augmented keys, G = c*N*I*J, padded to powers of 2.

    The relative terms (with the mask) and the 0/1 window-position matrix are the halo impl's own
    (:func:`~alite_jax.models.attention._halo_rel`, ``_window_positions``); the extra last feature
    masks the keys added by padding.
    """
    c, n, ni, nj, bq, d = qb.shape
    f32 = jnp.float32
    g, p = c * n * ni * nj, rows.window * cols.window
    rel = A._halo_rel(qb, rel_rows, rel_cols, rows, cols, qr_scale)  # (c, N, I, J, bq, wr + wc)
    e0 = d + rel.shape[-1] + 1
    big_q, big_p, big_e = _pow2(bq), _pow2(p), _pow2(e0)
    qa = jnp.concatenate([qb.reshape(g, bq, d).astype(f32) * qk_scale, rel.reshape(g, bq, -1),
                          jnp.full((g, bq, 1), A._MASKED, f32)], axis=-1)
    qa = jnp.pad(qa, ((0, 0), (0, big_q - bq), (0, big_e - e0)))
    pos = np.zeros((big_p, big_e - d), np.float32)
    pos[:p, :rel.shape[-1]] = A._window_positions(rows.window, cols.window).T
    pos[p:, rel.shape[-1]] = 1.0  # padding keys: their logit is the query's _MASKED feature
    keys = jnp.pad(A._halo_windows(k, rows, cols).reshape(g, p, d).astype(f32),
                   ((0, 0), (0, big_p - p), (0, 0)))
    ka = jnp.concatenate([keys, jnp.broadcast_to(jnp.asarray(pos), (g,) + pos.shape)], axis=-1)
    return qa.astype(qb.dtype), ka.astype(qb.dtype)


def _pallas_forward(q, k, v, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale, interpret):
    """Heads-major (B, N, H, W, d) inputs -> output and log-sum-exp (B, N, I, J, bq)."""
    b, n, h, w, d = q.shape
    qb = A._halo_blocks(q, rows, cols)
    bq = qb.shape[-2]
    qa, ka = _augmented(qb, k, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale)
    g, big_q, big_e = qa.shape
    big_p = ka.shape[1]
    p = rows.window * cols.window
    big_d = _pow2(d)
    values = A._halo_windows(v, rows, cols).reshape(g, p, d)
    values = jnp.pad(values, ((0, 0), (0, big_p - p), (0, big_d - d)))
    spec = lambda *shape: pl.BlockSpec((None,) + shape, lambda i: (i,) + (0,) * len(shape))  # noqa: E731
    o, lse = pl.pallas_call(
        _kernel, grid=(g,),
        in_specs=[spec(big_q, big_e), spec(big_p, big_e), spec(big_p, big_d)],
        out_specs=[spec(big_q, big_d), spec(big_q)],
        out_shape=[jax.ShapeDtypeStruct((g, big_q, big_d), v.dtype),
                   jax.ShapeDtypeStruct((g, big_q), jnp.float32)],
        interpret=interpret)(qa, ka, values)
    o = o[:, :bq, :d].reshape(b, n, rows.num_blocks, cols.num_blocks, bq, d)
    lse = lse[:, :bq].reshape(b, n, rows.num_blocks, cols.num_blocks, bq)
    return A._halo_unblocks(o, rows, cols), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas_attention(q, k, v, rel_rows, rel_cols, static):
    return _pallas_attention_fwd(q, k, v, rel_rows, rel_cols, static)[0]


def _pallas_attention_fwd(q, k, v, rel_rows, rel_cols, static):
    rows, cols, qk_scale, qr_scale, interpret = static
    o, lse = _pallas_forward(q, k, v, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale, interpret)
    return o, (q, k, v, rel_rows, rel_cols, o, lse)


def _pallas_attention_bwd(static, residuals, do):
    rows, cols, qk_scale, qr_scale, _ = static
    q, k, v, rel_rows, rel_cols, o, lse = residuals
    dq, dk, dv, drows, dcols = A._halo_backward(q, k, v, rel_rows, rel_cols, o, lse, do, rows, cols,
                                                qk_scale, qr_scale)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), drows.astype(rel_rows.dtype),
            dcols.astype(rel_cols.dtype))


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


@A.register_impl("pallas")
def pallas_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                           rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                           qr_scale: float, block: tuple[int, int] | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """Local attention with the fused Pallas forward kernel; same math and blocks as ``"halo"``.

    ``interpret`` defaults to True on the CPU (no Pallas compiler there) and False elsewhere.
    """
    b, h, w, n, d = q.shape
    bh, bw = block or (A.default_halo_block(h, kernel_size), A.default_halo_block(w, kernel_size))
    rows, cols = A.halo_plan(h, bh, kernel_size), A.halo_plan(w, bw, kernel_size)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    heads_major = lambda t: t.transpose(0, 3, 1, 2, 4)  # noqa: E731
    y = _pallas_attention(heads_major(q), heads_major(k), heads_major(v), rel_rows, rel_cols,
                          (rows, cols, float(qk_scale), float(qr_scale), bool(interpret)))
    return y.transpose(0, 2, 3, 1, 4)
