"""``impl="halo"``: blocked local attention, matmul-shaped, with no per-pixel copies of keys and values.

Each b x b block of queries scores its shared (b+k-1)^2 window of keys with one matmul, under a mask
that keeps every query to its own k x k neighbourhood; the relative-position term is a second matmul of
per-row and per-column terms with a 0/1 matrix saying which window row and column each key is in. The
custom VJP recomputes the logits instead of storing them (flash-attention style), and on CPU the batch
runs in cache-sized chunks.

This module also owns the blocking that the Pallas kernel reuses (:mod:`.pallas`): the plans, block and
window extraction, the relative terms, the position matrix and the backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.models.local_attention.registry import register_impl


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: plans are cached, and hold arrays
class HaloPlan:
    """How one spatial axis of size ``size`` is cut into query blocks and their key windows.

    Query block i holds positions [i*block, (i+1)*block) (the last is padded past ``size``); its key
    window is the ``window`` in-image positions starting at ``starts[i]``: the block plus k//2 on each
    side, clipped to the image, so windows never hold padding. ``onehot[i, x, a, u]`` is 1 where window
    position u is offset a (index into the relative table) of query x of block i, and ``bias[i, x, u]``
    is 0 there and -inf-like elsewhere: out-of-neighbourhood keys get softmax weight 0.
    """

    size: int
    block: int
    window: int
    starts: tuple[int, ...]
    onehot: np.ndarray  # (num_blocks, block, kernel_size, window) float32
    bias: np.ndarray    # (num_blocks, block, window) float32

    @property
    def num_blocks(self) -> int:
        return len(self.starts)


MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax, not NaN


@functools.lru_cache(maxsize=None)
def halo_plan(size: int, block: int, kernel_size: int) -> HaloPlan:
    """The :class:`HaloPlan` of one axis (cached: built once per shape, as numpy constants)."""
    half = kernel_size // 2
    num = -(-size // block)
    window = min(block + kernel_size - 1, size)
    starts = tuple(min(max(i * block - half, 0), size - window) for i in range(num))
    onehot = np.zeros((num, block, kernel_size, window), np.float32)
    bias = np.full((num, block, window), MASKED, np.float32)
    for i, start in enumerate(starts):
        for x in range(block):
            for u in range(window):
                offset = start + u - (i * block + x) + half
                if 0 <= offset < kernel_size:
                    onehot[i, x, offset, u] = 1.0
                    bias[i, x, u] = 0.0
    for a in (onehot, bias):
        a.setflags(write=False)
    return HaloPlan(size, block, window, starts, onehot, bias)


def default_halo_block(size: int, kernel_size: int) -> int:
    """The query-block side for one axis: minimises keys scored per query, times a small-matmul penalty.

    A block of b queries scores (b + k - 1) keys per axis where k are needed, but small blocks make small
    matmuls. Cost model: window^2 x (1 + 8 / b^2), whose constant was set so that it ranks blocks as
    measured on the CPU at 32x32, C=64 (4 fastest, then 2, then 8; benchmarks/RESULTS.md). For k = 7 it
    picks 4 at 16x16 and larger, and the whole axis at 8 and below.
    """
    candidates = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < size} | {size})

    def cost(b: int) -> float:
        window = min(b + kernel_size - 1, size)
        return window * window * (1.0 + 8.0 / (b * b)) * (-(-size // b) * b) / size

    return min(candidates, key=cost)


def halo_windows(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(c, N, H, W, d) -> (c, N, I, J, window_rows * window_cols, d): every block's key window."""
    strips = jnp.stack([t[:, :, s:s + rows.window] for s in rows.starts], axis=2)
    win = jnp.stack([strips[:, :, :, :, s:s + cols.window] for s in cols.starts], axis=3)
    return win.reshape(win.shape[:4] + (rows.window * cols.window, win.shape[-1]))


def halo_blocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(c, N, H, W, d) -> (c, N, I, J, block_rows * block_cols, d), zero-padded to whole blocks."""
    c, n, h, w, d = t.shape
    bh, bw = rows.block, cols.block
    t = jnp.pad(t, ((0, 0), (0, 0), (0, rows.num_blocks * bh - h), (0, cols.num_blocks * bw - w),
                    (0, 0)))
    t = t.reshape(c, n, rows.num_blocks, bh, cols.num_blocks, bw, d).transpose(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(c, n, rows.num_blocks, cols.num_blocks, bh * bw, d)


def halo_unblocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """Inverse of :func:`halo_blocks`: (c, N, I, J, bh*bw, d) -> (c, N, H, W, d)."""
    c, n, ni, nj, _, d = t.shape
    t = t.reshape(c, n, ni, nj, rows.block, cols.block, d).transpose(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(c, n, ni * rows.block, nj * cols.block, d)[:, :, :rows.size, :cols.size]


def halo_rel(qb: jax.Array, rel_rows: jax.Array, rel_cols: jax.Array, rows: HaloPlan,
              cols: HaloPlan, qr_scale: float) -> jax.Array:
    """Per query, q.r (plus the mask) for each window row then each window column: (c, N, I, J, bq,
    window_rows + window_cols), float32. :func:`halo_logits` spreads it over the window by a matmul."""
    c, n, ni, nj, bq, d = qb.shape
    f32 = jnp.float32
    q6 = qb.reshape(c, n, ni, nj, rows.block, cols.block, d)
    # Each query's k row-offset (column-offset) products, moved onto the window rows (columns).
    rq = jnp.einsum("cnijxyd,and->cnijxya", q6, rel_rows, preferred_element_type=f32) * qr_scale
    cq = jnp.einsum("cnijxyd,and->cnijxya", q6, rel_cols, preferred_element_type=f32) * qr_scale
    rt = jnp.einsum("cnijxya,ixau->cnijxyu", rq, rows.onehot) + rows.bias[None, None, :, None, :,
                                                                            None, :]
    ct = jnp.einsum("cnijxya,jyav->cnijxyv", cq, cols.onehot) + cols.bias[None, None, None, :, None,
                                                                            :, :]
    return jnp.concatenate([rt, ct], axis=-1).reshape(c, n, ni, nj, bq, rows.window + cols.window)


@functools.lru_cache(maxsize=None)
def window_positions(window_rows: int, window_cols: int) -> np.ndarray:
    """(window_rows + window_cols, window_rows * window_cols): which row and column each key is in."""
    pos = np.zeros((window_rows + window_cols, window_rows * window_cols), np.float32)
    for u in range(window_rows):
        for v in range(window_cols):
            pos[u, u * window_cols + v] = pos[window_rows + v, u * window_cols + v] = 1.0
    pos.setflags(write=False)
    return pos


def halo_logits(qb: jax.Array, keys: jax.Array, rel: jax.Array, rows: HaloPlan, cols: HaloPlan,
                 qk_scale: float) -> jax.Array:
    """Logits (c, N, I, J, queries, keys) of every block, float32, masked: q.k plus q.r as two matmuls
    (q.r and the mask come in as per-row and per-column terms, spread over the keys by a 0/1 matrix)."""
    pos = window_positions(rows.window, cols.window)
    s = jnp.einsum("cnijqd,cnijpd->cnijqp", qb, keys, preferred_element_type=jnp.float32)
    return s * qk_scale + jnp.einsum("cnijqe,ep->cnijqp", rel, pos)


def halo_forward(q, k, v, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale):
    """One chunk, heads-major (c, N, H, W, d): output and per-query log-sum-exp (c, N, I, J, bq)."""
    f32 = jnp.float32
    qb = halo_blocks(q, rows, cols)
    s = halo_logits(qb, halo_windows(k, rows, cols),
                     halo_rel(qb, rel_rows, rel_cols, rows, cols, qr_scale), rows, cols, qk_scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("cnijqp,cnijpd->cnijqd", e.astype(v.dtype), halo_windows(v, rows, cols),
                   preferred_element_type=f32) / denom
    return halo_unblocks(o.astype(v.dtype), rows, cols), (m + jnp.log(denom))[..., 0]


def halo_backward(q, k, v, rel_rows, rel_cols, o, lse, do, rows, cols, qk_scale, qr_scale):
    """One chunk's gradients, recomputing the logits (flash-attention style: nothing k^2-sized kept).

    ``o`` and ``lse`` are the forward's output and log-sum-exp, which save a pass over the logits when
    they come from the very same logits computation (the halo forward). With both None the softmax is
    renormalised from the recomputed logits and ``delta`` is taken as sum(P * dP): the gradient is then
    exactly that of the recomputed forward, whatever rounding a different forward computation (the Pallas
    kernel, with its own matmul precision on GPU) had; a normaliser from elsewhere would scale P by
    exp(its logit error), which grows with the logits' size.

    Every matmul is a plain row-major product: the two that contract over queries (dK = dS^T Q and
    dV = P^T dO) are computed transposed, as (d, q)(q, p), and their small (d, p) results transposed
    back, instead of contracting the large (q, p) matrices over their major axis (which XLA's CPU
    backend runs as a slow generic dot).
    """
    f32 = jnp.float32
    swap = lambda t: jnp.swapaxes(t, -1, -2)  # noqa: E731
    qb = halo_blocks(q, rows, cols)
    keys, keys_vjp = jax.vjp(lambda t: halo_windows(t, rows, cols), k)
    values, values_vjp = jax.vjp(lambda t: halo_windows(t, rows, cols), v)
    rel, rel_vjp = jax.vjp(lambda t, r, c: halo_rel(t, r, c, rows, cols, qr_scale), qb, rel_rows,
                           rel_cols)
    s = halo_logits(qb, keys, rel, rows, cols, qk_scale)
    if lse is None:
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = p / jnp.sum(p, axis=-1, keepdims=True)
    else:
        p = jnp.exp(s - lse[..., None])
    dob = halo_blocks(do, rows, cols).astype(f32)
    dp = jnp.einsum("cnijqd,cnijpd->cnijqp", dob, values, preferred_element_type=f32)
    if o is None:
        delta = jnp.sum(p * dp, axis=-1, keepdims=True)
    else:
        delta = jnp.sum(dob * halo_blocks(o, rows, cols).astype(f32), axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dqb = jnp.einsum("cnijqp,cnijpd->cnijqd", ds, keys, preferred_element_type=f32) * qk_scale
    dkeys = swap(jnp.einsum("cnijdq,cnijqp->cnijdp", swap(qb).astype(f32), ds)) * qk_scale
    dvalues = swap(jnp.einsum("cnijdq,cnijqp->cnijdp", swap(dob), p))
    pos = window_positions(rows.window, cols.window)
    dqb_rel, drows, dcols = rel_vjp(jnp.einsum("cnijqp,ep->cnijqe", ds, pos))
    (dk,) = keys_vjp(dkeys.astype(k.dtype))
    (dv,) = values_vjp(dvalues.astype(v.dtype))
    return halo_unblocks(dqb + dqb_rel, rows, cols), dk, dv, drows, dcols


@dataclasses.dataclass(frozen=True)
class HaloStatic:
    """The static (non-differentiated) arguments of the halo custom VJP."""

    rows: HaloPlan
    cols: HaloPlan
    chunk: int
    qk_scale: float
    qr_scale: float


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _halo_attention(q, k, v, rel_rows, rel_cols, static: HaloStatic):
    return _halo_attention_fwd(q, k, v, rel_rows, rel_cols, static)[0]


def _chunks(t: jax.Array, chunk: int) -> jax.Array:
    return t.reshape((t.shape[0] // chunk, chunk) + t.shape[1:])


def _unchunks(t: jax.Array) -> jax.Array:
    return t.reshape((-1,) + t.shape[2:])


def _halo_attention_fwd(q, k, v, rel_rows, rel_cols, static: HaloStatic):
    rows, cols, chunk = static.rows, static.cols, static.chunk
    qk_scale, qr_scale = static.qk_scale, static.qr_scale
    o, lse = jax.lax.map(
        lambda t: halo_forward(*t, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale),
        (_chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk)))
    o = _unchunks(o)
    return o, (q, k, v, rel_rows, rel_cols, o, lse)


def _halo_attention_bwd(static: HaloStatic, residuals, do):
    rows, cols, chunk = static.rows, static.cols, static.chunk
    qk_scale, qr_scale = static.qk_scale, static.qr_scale
    q, k, v, rel_rows, rel_cols, o, lse = residuals
    f32 = jnp.float32

    def body(acc, t):
        dq, dk, dv, drows, dcols = halo_backward(*t[:3], rel_rows, rel_cols, *t[3:], rows, cols,
                                                  qk_scale, qr_scale)
        return (acc[0] + drows, acc[1] + dcols), (dq.astype(q.dtype), dk.astype(k.dtype), dv)

    zeros = (jnp.zeros(rel_rows.shape, f32), jnp.zeros(rel_cols.shape, f32))
    (drows, dcols), (dq, dk, dv) = jax.lax.scan(
        body, zeros, (_chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk), _chunks(o, chunk),
                      lse, _chunks(do, chunk)))
    return (_unchunks(dq), _unchunks(dk), _unchunks(dv), drows.astype(rel_rows.dtype),
            dcols.astype(rel_cols.dtype))


_halo_attention.defvjp(_halo_attention_fwd, _halo_attention_bwd)

HALO_CHUNK_BYTES = 256 << 10  # CPU: float32 logits per sequential batch chunk (see default_halo_chunk)


def default_halo_chunk(batch: int, logits_per_image: int, backend: str | None = None) -> int:
    """Images per sequential chunk of the batch.

    On CPU, the largest divisor of the batch whose float32 logits fit in :data:`HALO_CHUNK_BYTES`, so
    each chunk's working set stays in cache (the budget is the one the whole training step ran fastest
    with; benchmarks/RESULTS.md). On accelerators, the whole batch: parallelism matters more than cache
    there.
    """
    if (backend or jax.default_backend()) != "cpu":
        return batch
    fits = [c for c in range(1, batch + 1) if batch % c == 0 and c * logits_per_image * 4 <=
            HALO_CHUNK_BYTES]
    return max(fits, default=1)


@register_impl("halo")
def halo_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                         rel_cols: jax.Array, *, kernel_size: int, qk_scale: float, qr_scale: float,
                         block: tuple[int, int] | None = None, chunk: int | None = None
                         ) -> jax.Array:
    """Blocked ("halo") local attention: each b x b query block attends its (b+k-1)^2 key window.

    Logits of a block are one matmul against its shared window (matmul-shaped work, no per-pixel copies
    of keys and values); a mask keeps each query to its own k x k neighbourhood, so the result equals
    :func:`~alite_jax.models.local_attention.patches.patches_local_attention`. The custom VJP recomputes
    the logits instead of storing them, and on CPU the batch is processed in cache-sized chunks.
    ``block`` (rows, cols) and ``chunk`` default to
    :func:`default_halo_block` and :func:`default_halo_chunk`.
    """
    b, h, w, n, d = q.shape
    bh, bw = block or (default_halo_block(h, kernel_size), default_halo_block(w, kernel_size))
    rows, cols = halo_plan(h, bh, kernel_size), halo_plan(w, bw, kernel_size)
    if chunk is None:
        per_image = n * rows.num_blocks * cols.num_blocks * bh * bw * rows.window * cols.window
        chunk = default_halo_chunk(b, per_image)
    if b % chunk:
        raise ValueError(f"halo chunk {chunk} must divide the batch {b}")
    heads_major = lambda t: t.transpose(0, 3, 1, 2, 4)  # noqa: E731
    y = _halo_attention(heads_major(q), heads_major(k), heads_major(v), rel_rows, rel_cols,
                        HaloStatic(rows, cols, chunk, float(qk_scale), float(qr_scale)))
    return y.transpose(0, 2, 3, 1, 4)
