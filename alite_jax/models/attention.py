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
a pure function with the signature of :func:`patches_local_attention` and computes the same function:

* ``"patches"``: gathers every pixel's k x k keys and values (k^2 copies); simple, memory bound.
* ``"halo"``: blocked attention; each b x b query block scores its shared (b+k-1)^2 window with one
  matmul under a mask. Custom VJP that recomputes logits; cache-sized batch chunks on CPU.
* ``"pallas"`` (:mod:`alite_jax.models.attention_pallas`): the halo forward as one fused
  jax.experimental.pallas kernel per block (GPU/TPU; interpret mode elsewhere).
* ``"auto"`` (default): the fastest measured one for the backend, :data:`AUTO_IMPLS`.

Other implementations slot in by registering themselves with :func:`register_impl`.
"""

from __future__ import annotations

import dataclasses
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
# Blocked "halo" attention: matmul-shaped, no k^2 copies.
# --------------------------------------------------------------------------------------------------


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


_MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax, not NaN


@functools.lru_cache(maxsize=None)
def halo_plan(size: int, block: int, kernel_size: int) -> HaloPlan:
    """The :class:`HaloPlan` of one axis (cached: built once per shape, as numpy constants)."""
    half = kernel_size // 2
    num = -(-size // block)
    window = min(block + kernel_size - 1, size)
    starts = tuple(min(max(i * block - half, 0), size - window) for i in range(num))
    onehot = np.zeros((num, block, kernel_size, window), np.float32)
    bias = np.full((num, block, window), _MASKED, np.float32)
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


def _halo_windows(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(c, N, H, W, d) -> (c, N, I, J, window_rows * window_cols, d): every block's key window."""
    strips = jnp.stack([t[:, :, s:s + rows.window] for s in rows.starts], axis=2)
    win = jnp.stack([strips[:, :, :, :, s:s + cols.window] for s in cols.starts], axis=3)
    return win.reshape(win.shape[:4] + (rows.window * cols.window, win.shape[-1]))


def _halo_blocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(c, N, H, W, d) -> (c, N, I, J, block_rows * block_cols, d), zero-padded to whole blocks."""
    c, n, h, w, d = t.shape
    bh, bw = rows.block, cols.block
    t = jnp.pad(t, ((0, 0), (0, 0), (0, rows.num_blocks * bh - h), (0, cols.num_blocks * bw - w),
                    (0, 0)))
    t = t.reshape(c, n, rows.num_blocks, bh, cols.num_blocks, bw, d).transpose(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(c, n, rows.num_blocks, cols.num_blocks, bh * bw, d)


def _halo_unblocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """Inverse of :func:`_halo_blocks`: (c, N, I, J, bh*bw, d) -> (c, N, H, W, d)."""
    c, n, ni, nj, _, d = t.shape
    t = t.reshape(c, n, ni, nj, rows.block, cols.block, d).transpose(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(c, n, ni * rows.block, nj * cols.block, d)[:, :, :rows.size, :cols.size]


def _halo_rel(qb: jax.Array, rel_rows: jax.Array, rel_cols: jax.Array, rows: HaloPlan,
              cols: HaloPlan, qr_scale: float) -> jax.Array:
    """Per query, q.r (plus the mask) for each window row then each window column: (c, N, I, J, bq,
    window_rows + window_cols), float32. :func:`_halo_logits` spreads it over the window by a matmul."""
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
def _window_positions(window_rows: int, window_cols: int) -> np.ndarray:
    """(window_rows + window_cols, window_rows * window_cols): which row and column each key is in."""
    pos = np.zeros((window_rows + window_cols, window_rows * window_cols), np.float32)
    for u in range(window_rows):
        for v in range(window_cols):
            pos[u, u * window_cols + v] = pos[window_rows + v, u * window_cols + v] = 1.0
    pos.setflags(write=False)
    return pos


def _halo_logits(qb: jax.Array, keys: jax.Array, rel: jax.Array, rows: HaloPlan, cols: HaloPlan,
                 qk_scale: float) -> jax.Array:
    """Logits (c, N, I, J, queries, keys) of every block, float32, masked: q.k plus q.r as two matmuls
    (q.r and the mask come in as per-row and per-column terms, spread over the keys by a 0/1 matrix)."""
    pos = _window_positions(rows.window, cols.window)
    s = jnp.einsum("cnijqd,cnijpd->cnijqp", qb, keys, preferred_element_type=jnp.float32)
    return s * qk_scale + jnp.einsum("cnijqe,ep->cnijqp", rel, pos)


def _halo_forward(q, k, v, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale):
    """One chunk, heads-major (c, N, H, W, d): output and per-query log-sum-exp (c, N, I, J, bq)."""
    f32 = jnp.float32
    qb = _halo_blocks(q, rows, cols)
    s = _halo_logits(qb, _halo_windows(k, rows, cols),
                     _halo_rel(qb, rel_rows, rel_cols, rows, cols, qr_scale), rows, cols, qk_scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("cnijqp,cnijpd->cnijqd", e.astype(v.dtype), _halo_windows(v, rows, cols),
                   preferred_element_type=f32) / denom
    return _halo_unblocks(o.astype(v.dtype), rows, cols), (m + jnp.log(denom))[..., 0]


def _halo_backward(q, k, v, rel_rows, rel_cols, o, lse, do, rows, cols, qk_scale, qr_scale):
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
    qb = _halo_blocks(q, rows, cols)
    keys, keys_vjp = jax.vjp(lambda t: _halo_windows(t, rows, cols), k)
    values, values_vjp = jax.vjp(lambda t: _halo_windows(t, rows, cols), v)
    rel, rel_vjp = jax.vjp(lambda t, r, c: _halo_rel(t, r, c, rows, cols, qr_scale), qb, rel_rows,
                           rel_cols)
    s = _halo_logits(qb, keys, rel, rows, cols, qk_scale)
    if lse is None:
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = p / jnp.sum(p, axis=-1, keepdims=True)
    else:
        p = jnp.exp(s - lse[..., None])
    dob = _halo_blocks(do, rows, cols).astype(f32)
    dp = jnp.einsum("cnijqd,cnijpd->cnijqp", dob, values, preferred_element_type=f32)
    if o is None:
        delta = jnp.sum(p * dp, axis=-1, keepdims=True)
    else:
        delta = jnp.sum(dob * _halo_blocks(o, rows, cols).astype(f32), axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dqb = jnp.einsum("cnijqp,cnijpd->cnijqd", ds, keys, preferred_element_type=f32) * qk_scale
    dkeys = swap(jnp.einsum("cnijdq,cnijqp->cnijdp", swap(qb).astype(f32), ds)) * qk_scale
    dvalues = swap(jnp.einsum("cnijdq,cnijqp->cnijdp", swap(dob), p))
    pos = _window_positions(rows.window, cols.window)
    dqb_rel, drows, dcols = rel_vjp(jnp.einsum("cnijqp,ep->cnijqe", ds, pos))
    (dk,) = keys_vjp(dkeys.astype(k.dtype))
    (dv,) = values_vjp(dvalues.astype(v.dtype))
    return _halo_unblocks(dqb + dqb_rel, rows, cols), dk, dv, drows, dcols


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _halo_attention(q, k, v, rel_rows, rel_cols, static):
    return _halo_attention_fwd(q, k, v, rel_rows, rel_cols, static)[0]


def _chunks(t: jax.Array, chunk: int) -> jax.Array:
    return t.reshape((t.shape[0] // chunk, chunk) + t.shape[1:])


def _unchunks(t: jax.Array) -> jax.Array:
    return t.reshape((-1,) + t.shape[2:])


def _halo_attention_fwd(q, k, v, rel_rows, rel_cols, static):
    rows, cols, chunk, qk_scale, qr_scale = static
    o, lse = jax.lax.map(
        lambda t: _halo_forward(*t, rel_rows, rel_cols, rows, cols, qk_scale, qr_scale),
        (_chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk)))
    o = _unchunks(o)
    return o, (q, k, v, rel_rows, rel_cols, o, lse)


def _halo_attention_bwd(static, residuals, do):
    rows, cols, chunk, qk_scale, qr_scale = static
    q, k, v, rel_rows, rel_cols, o, lse = residuals
    f32 = jnp.float32

    def body(acc, t):
        dq, dk, dv, drows, dcols = _halo_backward(*t[:3], rel_rows, rel_cols, *t[3:], rows, cols,
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
    each chunk's working set stays in cache: at SA-ResNet26's 32x32, C=64 layer (B=32) one image per
    chunk ran the forward 1.2-2.0x and fwd+bwd 1.1-2.4x faster than the whole batch at once (3
    interleaved rounds on the noisy 2-core CPU), and the whole training step was fastest with a 256 KiB
    budget (12.2 images/s, against 10.7 with 4 MiB; benchmarks/RESULTS.md). On accelerators, the whole
    batch: parallelism matters more than cache there.
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
    :func:`patches_local_attention`. The custom VJP recomputes the logits instead of storing them, and on
    CPU the batch is processed in cache-sized chunks. ``block`` (rows, cols) and ``chunk`` default to
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
                        (rows, cols, chunk, float(qk_scale), float(qr_scale)))
    return y.transpose(0, 2, 3, 1, 4)


# --------------------------------------------------------------------------------------------------
# impl="auto": the fastest measured implementation for the backend.
# --------------------------------------------------------------------------------------------------

# Backend -> implementation, from benchmarks/local_attention.py (benchmarks/RESULTS.md). On the CPU the
# halo implementation's fwd+bwd is 5-15x faster than patches' at every SA-ResNet26 shape. On the GPU
# (an H200) halo's fwd+bwd is 5-17x faster than patches' and 1.04-1.13x faster than pallas' at every
# shape in float32, level with pallas in bfloat16, and whole-model training with pallas went NaN there
# once (see attention_pallas), so halo it is; a per-shape rule would gain nothing measurable. On TPU
# nothing has been timed: halo, the pure-JAX choice.
AUTO_IMPLS: dict[str, str] = {"cpu": "halo", "gpu": "halo", "tpu": "halo"}


def select_impl(backend: str | None = None) -> str:
    """The implementation ``impl="auto"`` runs on ``backend`` (default: JAX's default backend)."""
    return AUTO_IMPLS.get(backend or jax.default_backend(), "halo")


@register_impl("auto")
def auto_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                         rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                         qr_scale: float) -> jax.Array:
    """Dispatches to :func:`select_impl`'s choice at trace time (a static, per-backend decision)."""
    return IMPLS[select_impl()](q, k, v, rel_rows, rel_cols, kernel_size=kernel_size,
                                qk_scale=qk_scale, qr_scale=qr_scale)


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
      impl: a key of :data:`IMPLS`; every implementation computes the same function. "auto" (default)
        runs the fastest measured one for the backend (:func:`select_impl`).
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
        rows, cols = _rel_tables(rel_rows.astype(dtype), rel_cols.astype(dtype), n, self.rel_layout)
        qk_scale, qr_scale = attention_scales(self.scaling, c, n)
        y = IMPLS[self.impl](q, key, value, rows, cols, kernel_size=k, qk_scale=qk_scale,
                             qr_scale=qr_scale)
        chex.assert_shape(y, (b, h, w, n, c // n))
        y = y.reshape(b, h, w, c)
        if self.stride > 1:
            y = nn.avg_pool(y, (self.stride, self.stride), strides=(self.stride, self.stride))
        return y
