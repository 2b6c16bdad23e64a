"""``impl="pallas"``: the halo local attention forward as one fused Pallas kernel per query block.

The kernel computes, for one (image, head, query block), logits against the block's key window, the
softmax and the weighted sum of values, without writing the logits to memory. The logits are two
matmuls (what GPU tensor cores and the TPU MXU want): the content term q.k, and the relative-position
term with the neighbourhood mask as a matmul of per-row and per-column terms with a 0/1 matrix that
says which window row and column each key is in (the halo impl's factorisation):

    logits = [q * qk_scale] @ keys.T  +  [R(q), C(q), -inf-like] @ pos.T

where R(q)[u] = qr_scale * q.r_row[offset(u)] (or -inf-like outside the neighbourhood) for each window
row u, C likewise for columns, and ``pos`` (shared by every block, loaded once) has a 1 in the last
column only on the keys added to round the window up to a power of two. Query, key, feature and
relative-term counts are rounded up to powers of two, at least 16: Triton needs power-of-two blocks and
its dot needs every matmul dimension >= 16. On GPU the kernel is compiled by Triton (set explicitly:
JAX's default Pallas GPU backend is now Mosaic GPU); float32 operands follow JAX's matmul precision
setting like XLA's own dots (TF32 by default on GPUs that have it, IEEE float32 under
``jax.default_matmul_precision("highest")``).

The backward pass is the pure-JAX halo backward (:func:`.halo.halo_backward`), which recomputes the
logits and renormalises them itself rather than reuse the kernel's normaliser: on a GPU the kernel's
logits (Triton, TF32 by default) and XLA's recomputed ones round differently, and a normaliser from one
applied to the other scales every softmax weight by exp(the logit difference), an error that grows with
the logits. That coupling is the suspected cause of the NaN a whole-model training step with the kernel
gave on an H200 while every single layer matched (benchmarks/RESULTS.md); the self-normalising backward
removes it by construction, but has not been re-run on a GPU yet (``benchmarks/pallas_model_check.py``
is the check). On a backend without a Pallas compiler (the CPU) the kernel runs in Pallas' interpret
mode: correct, but slow; it is there so the kernel is tested everywhere. ``impl="auto"`` does not pick
it: on the H200 its forward+backward was no faster than ``halo``'s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from alite_jax.models.local_attention import halo
from alite_jax.models.local_attention.registry import register_impl

_MIN_DIM = 16


def _pow2(n: int) -> int:
    return max(_MIN_DIM, 1 << (int(n) - 1).bit_length())


def _kernel(q_ref, rel_ref, k_ref, pos_ref, v_ref, o_ref):
    """One (image, head, query block): masked logits, softmax and weighted values, in on-chip memory."""
    q, rel, k, pos, v = q_ref[...], rel_ref[...], k_ref[...], pos_ref[...], v_ref[...]
    nt = (((1,), (1,)), ((), ()))  # a @ b.T
    s = (jax.lax.dot_general(q, k, nt, preferred_element_type=jnp.float32)
         + jax.lax.dot_general(rel, pos, nt, preferred_element_type=jnp.float32))
    m = jnp.max(s, axis=1)
    e = jnp.exp(s - m[:, None])
    denom = jnp.sum(e, axis=1)
    o = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o_ref[...] = (o / denom[:, None]).astype(o_ref.dtype)


def _operands(qb, k, v, rel_rows, rel_cols, rows: halo.HaloPlan, cols: halo.HaloPlan, qk_scale,
              qr_scale):
    """The kernel's five operands, every dimension padded to a power of two (at least 16).

    G = c*N*I*J blocks. Returns (G, BQ, D) scaled queries, (G, BQ, R) relative terms, (G, P, D) window
    keys, (P, R) window positions (shared by every block), (G, P, D) window values. The relative terms
    (with the mask) and the 0/1 position matrix are the halo impl's own
    (:func:`.halo.halo_rel`, :func:`.halo.window_positions`); the relative operand's extra
    column is -inf-like, and only the keys added by padding have a 1 in that column of ``pos``.
    """
    c, n, ni, nj, bq, d = qb.shape
    f32, dtype = jnp.float32, qb.dtype
    g, p = c * n * ni * nj, rows.window * cols.window
    rel = halo.halo_rel(qb, rel_rows, rel_cols, rows, cols, qr_scale)  # (c, N, I, J, bq, wr + wc)
    r0 = rel.shape[-1] + 1
    big_q, big_p, big_d, big_r = _pow2(bq), _pow2(p), _pow2(d), _pow2(r0)
    queries = jnp.pad((qb.reshape(g, bq, d).astype(f32) * qk_scale).astype(dtype),
                      ((0, 0), (0, big_q - bq), (0, big_d - d)))
    rel = jnp.concatenate([rel.reshape(g, bq, -1), jnp.full((g, bq, 1), halo.MASKED, f32)], axis=-1)
    rel = jnp.pad(rel.astype(dtype), ((0, 0), (0, big_q - bq), (0, big_r - r0)))
    pos = np.zeros((big_p, big_r), np.float32)
    pos[:p, :r0 - 1] = halo.window_positions(rows.window, cols.window).T
    pos[p:, r0 - 1] = 1.0  # padding keys: their logit is the query's -inf-like column
    windows = lambda t: jnp.pad(halo.halo_windows(t, rows, cols).reshape(g, p, d),  # noqa: E731
                                ((0, 0), (0, big_p - p), (0, big_d - d)))
    return queries, rel, windows(k), jnp.asarray(pos, dtype), windows(v)


def compiler_params(backend: str) -> object | None:
    """Triton settings on GPU (JAX's default Pallas GPU backend is Mosaic GPU, which this kernel is not
    written for); None elsewhere (TPU: Mosaic TPU; CPU: interpret mode)."""
    if backend != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _pallas_forward(q, k, v, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale, interpret):
    """Heads-major (B, N, H, W, d) inputs -> output (B, N, H, W, d)."""
    b, n, h, w, d = q.shape
    qb = halo.halo_blocks(q, rows, cols)
    bq = qb.shape[-2]
    queries, rel, keys, pos, values = _operands(qb, k, v, rel_rows, rel_cols, rows, cols, qk_scale,
                                                qr_scale)
    g, big_q, big_d = queries.shape
    big_p, big_r = pos.shape
    spec = lambda *shape: pl.BlockSpec((None,) + shape, lambda i: (i,) + (0,) * len(shape))  # noqa: E731
    o = pl.pallas_call(
        _kernel, grid=(g,),
        in_specs=[spec(big_q, big_d), spec(big_q, big_r), spec(big_p, big_d),
                  pl.BlockSpec((big_p, big_r), lambda i: (0, 0)), spec(big_p, big_d)],
        out_specs=spec(big_q, big_d),
        out_shape=jax.ShapeDtypeStruct((g, big_q, big_d), v.dtype),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(jax.default_backend()),
    )(queries, rel, keys, pos, values)
    o = o[:, :bq, :d].reshape(b, n, rows.num_blocks, cols.num_blocks, bq, d)
    return halo.halo_unblocks(o, rows, cols)


@dataclasses.dataclass(frozen=True)
class PallasStatic:
    """The static (non-differentiated) arguments of the Pallas custom VJP."""

    rows: halo.HaloPlan
    cols: halo.HaloPlan
    qk_scale: float
    qr_scale: float
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas_attention(q, k, v, rel_rows, rel_cols, static: PallasStatic):
    return _pallas_attention_fwd(q, k, v, rel_rows, rel_cols, static)[0]


def _pallas_attention_fwd(q, k, v, rel_rows, rel_cols, static: PallasStatic):
    o = _pallas_forward(q, k, v, rel_rows, rel_cols, static.rows, static.cols, static.qk_scale,
                        static.qr_scale, static.interpret)
    return o, (q, k, v, rel_rows, rel_cols)


def _pallas_attention_bwd(static: PallasStatic, residuals, do):
    # The kernel's output and normaliser are not reused: the backward renormalises its own recomputed
    # logits (see _halo_backward), so the kernel's different rounding cannot skew the gradient.
    q, k, v, rel_rows, rel_cols = residuals
    dq, dk, dv, drows, dcols = halo.halo_backward(q, k, v, rel_rows, rel_cols, None, None, do,
                                                  static.rows, static.cols, static.qk_scale,
                                                  static.qr_scale)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), drows.astype(rel_rows.dtype),
            dcols.astype(rel_cols.dtype))


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


@register_impl("pallas")
def pallas_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                           rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                           qr_scale: float, block: tuple[int, int] | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """Local attention with the fused Pallas forward kernel; same math and blocks as ``"halo"``.

    ``interpret`` defaults to True on the CPU (no Pallas compiler there) and False elsewhere.
    """
    b, h, w, n, d = q.shape
    bh, bw = block or (halo.default_halo_block(h, kernel_size), halo.default_halo_block(w, kernel_size))
    rows, cols = halo.halo_plan(h, bh, kernel_size), halo.halo_plan(w, bw, kernel_size)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    heads_major = lambda t: t.transpose(0, 3, 1, 2, 4)  # noqa: E731
    y = _pallas_attention(heads_major(q), heads_major(k), heads_major(v), rel_rows, rel_cols,
                          PallasStatic(rows, cols, float(qk_scale), float(qr_scale), bool(interpret)))
    return y.transpose(0, 2, 3, 1, 4)
