"""``impl="blocked"``: halo's blocked local attention in tensors of rank 4 or less, for export.

The same blocking as :mod:`.halo` (each b x b block of queries scores its shared (b+k-1)^2 key window
with one matmul, a mask keeping every query to its own k x k neighbourhood, the relative term spread over
the window by 0/1 matrices; plans from :func:`~.halo.halo_plan`), written so that an exported artifact
runs it fast on any runtime:

* every tensor has rank <= 4: the batch, head and block axes are merged before each product (TFLite's
  BATCH_MATMUL takes at most rank 5; halo's einsums are rank 7);
* a batch size left symbolic (``jax.export``) or dynamic (TFLite) is fine: halo's chunking needs a
  concrete one. On the CPU the batch still runs in cache-sized chunks, by ``lax.map`` (one image per
  chunk when the batch is symbolic); other platforms run it whole. With both chosen by
  ``lax.platform_dependent``, an artifact lowered for CPU and GPU takes the right one on each;
* ``impl="blocked_unchunked"`` is the same with no chunks, for TFLite, whose converter cannot lower
  the loop;
* no custom VJP: it is for inference (JAX still differentiates it, at the memory cost of storing the
  logits; the training implementations are ``halo`` and ``pallas``).

It is the export's default local attention (:data:`alite_jax.export.inference.PORTABLE_IMPL`);
benchmarks/RESULTS.md compares it with the others.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from alite_jax.models.local_attention.halo import (HaloPlan, default_halo_block, default_halo_chunk,
                                                   halo_plan, window_positions)
from alite_jax.models.local_attention.registry import register_impl

IMPL = "blocked"
UNCHUNKED = "blocked_unchunked"


def to_blocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(M, H, W, e) -> (M * I * J, bh * bw, e): the query blocks, zero-padded to whole blocks."""
    m, h, w, e = t.shape
    bh, bw, ni, nj = rows.block, cols.block, rows.num_blocks, cols.num_blocks
    t = jnp.pad(t, ((0, 0), (0, ni * bh - h), (0, nj * bw - w), (0, 0)))
    t = t.reshape(-1, bh, nj, bw * e).transpose(0, 2, 1, 3)  # (M * I, J, bh, bw * e)
    return t.reshape(-1, bh * bw, e)


def from_blocks(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """Inverse of :func:`to_blocks`: (M * I * J, bh * bw, e) -> (M, H, W, e)."""
    bh, bw, ni, nj = rows.block, cols.block, rows.num_blocks, cols.num_blocks
    e = t.shape[-1]
    t = t.reshape(-1, nj, bh, bw * e).transpose(0, 2, 1, 3).reshape(-1, ni * bh, nj * bw, e)
    return t[:, :rows.size, :cols.size]


def to_windows(t: jax.Array, rows: HaloPlan, cols: HaloPlan) -> jax.Array:
    """(M, H, W, e) -> (M * I * J, window_rows * window_cols, e): every block's key window, in the block
    order of :func:`to_blocks` (static slices: I row strips, then J windows of each)."""
    _, _, w, e = t.shape
    wr, wc = rows.window, cols.window
    strips = jnp.concatenate([t[:, s:s + wr].reshape(-1, 1, wr, w * e) for s in rows.starts], axis=1)
    strips = strips.reshape(-1, wr, w, e)  # (M * I, wr, W, e)
    windows = jnp.concatenate([strips[:, :, s:s + wc].reshape(-1, 1, wr * wc * e) for s in cols.starts],
                              axis=1)
    return windows.reshape(-1, wr * wc, e)


def spread(per_offset: jax.Array, plan: HaloPlan, axis: int) -> jax.Array:
    """(M, H, W, k) per-offset terms of each query -> (M, H, W, window) over its block's window along
    ``axis`` (1: rows, 2: columns), plus the mask (-1e30 outside the neighbourhood)."""
    size = per_offset.shape[axis]
    onehot = plan.onehot.reshape(-1, plan.onehot.shape[2], plan.window)[:size]  # (size, k, window)
    bias = plan.bias.reshape(-1, plan.window)[:size]
    if axis == 1:
        return jnp.einsum("mhwa,hau->mhwu", per_offset, onehot) + bias[None, :, None, :]
    return jnp.einsum("mhwa,wau->mhwu", per_offset, onehot) + bias[None, None, :, :]


def blocked_forward(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array, rel_cols: jax.Array,
                    rows: HaloPlan, cols: HaloPlan, qk_scale: float, qr_scale: float) -> jax.Array:
    """One chunk of images, (B, H, W, N, d) in and out, in tensors of rank <= 4."""
    b, h, w, n, d = q.shape
    f32 = jnp.float32
    heads_major = lambda t: t.reshape(-1, h * w, n, d).transpose(0, 2, 1, 3)  # noqa: E731 (B, N, HW, d)
    qh = heads_major(q)
    rq = jnp.einsum("bnpd,and->bnpa", qh, rel_rows, preferred_element_type=f32) * qr_scale
    cq = jnp.einsum("bnpd,and->bnpa", qh, rel_cols, preferred_element_type=f32) * qr_scale
    kernel_size = rel_rows.shape[0]
    rel = jnp.concatenate([spread(rq.reshape(-1, h, w, kernel_size), rows, 1),
                           spread(cq.reshape(-1, h, w, kernel_size), cols, 2)], axis=-1)
    pos = window_positions(rows.window, cols.window)
    image = lambda t: heads_major(t).reshape(-1, h, w, d)  # noqa: E731 (B * N, H, W, d)
    keys, values = to_windows(image(k), rows, cols), to_windows(image(v), rows, cols)
    qb = to_blocks(qh.reshape(-1, h, w, d), rows, cols)
    logits = (jnp.matmul(qb, jnp.swapaxes(keys, 1, 2), preferred_element_type=f32) * qk_scale
              + jnp.matmul(to_blocks(rel, rows, cols), pos))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = from_blocks(jnp.matmul(weights, values, preferred_element_type=f32), rows, cols)
    return out.reshape(-1, n, h * w, d).transpose(0, 2, 1, 3).reshape(q.shape).astype(v.dtype)


def in_chunks(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array) -> jax.Array:
    """``fn(*arrays)`` with the batch (axis 0) in sequential chunks of ``chunk`` (by ``lax.map``)."""
    batch = arrays[0].shape[0]
    if isinstance(batch, int) and batch == chunk:
        return fn(*arrays)
    out = jax.lax.map(lambda t: fn(*t), tuple(a.reshape((-1, chunk) + a.shape[1:]) for a in arrays))
    return out.reshape((-1,) + out.shape[2:])


def cpu_chunk(batch: int | object, logits_per_image: int) -> int:
    """Images per chunk on the CPU: halo's cache budget (:func:`~.halo.default_halo_chunk`) for a
    concrete batch size, one image for a symbolic one (the only size sure to divide it)."""
    if not isinstance(batch, int):
        return 1
    return default_halo_chunk(batch, logits_per_image, backend="cpu")


def plans(height: int, width: int, kernel_size: int,
          block: tuple[int, int] | None) -> tuple[HaloPlan, HaloPlan]:
    """The row and column plans; ``block`` (rows, cols) defaults to :func:`~.halo.default_halo_block`."""
    bh, bw = block or (default_halo_block(height, kernel_size), default_halo_block(width, kernel_size))
    return halo_plan(height, bh, kernel_size), halo_plan(width, bw, kernel_size)


@register_impl(IMPL)
def blocked_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                            rel_cols: jax.Array, *, kernel_size: int, qk_scale: float, qr_scale: float,
                            block: tuple[int, int] | None = None, chunk: int | None = None
                            ) -> jax.Array:
    """Halo's blocked local attention in rank-4 tensors (module docstring). ``block`` (rows, cols)
    defaults to :func:`~.halo.default_halo_block`; ``chunk`` (images per sequential step; must divide a
    concrete batch) to the CPU's cache budget on the CPU and the whole batch elsewhere."""
    b, h, w, n, _ = q.shape
    if rel_rows.shape[0] != kernel_size:
        raise ValueError(f"rel_rows has {rel_rows.shape[0]} offsets for kernel_size {kernel_size}")
    rows, cols = plans(h, w, kernel_size, block)
    forward = functools.partial(blocked_forward, rel_rows=rel_rows, rel_cols=rel_cols, rows=rows, cols=cols,
                                qk_scale=float(qk_scale), qr_scale=float(qr_scale))
    if chunk is not None:
        if isinstance(b, int) and b % chunk:
            raise ValueError(f"blocked attention's chunk {chunk} must divide the batch {b}")
        return in_chunks(forward, chunk, q, k, v)
    per_image = n * rows.num_blocks * cols.num_blocks * rows.block * cols.block * rows.window * cols.window
    on_cpu = cpu_chunk(b, per_image)
    if isinstance(b, int) and on_cpu == b:
        return forward(q, k, v)
    return jax.lax.platform_dependent(q, k, v, cpu=lambda *t: in_chunks(forward, on_cpu, *t),
                                      default=forward)


@register_impl(UNCHUNKED)
def blocked_unchunked_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_rows: jax.Array,
                                      rel_cols: jax.Array, *, kernel_size: int, qk_scale: float,
                                      qr_scale: float, block: tuple[int, int] | None = None) -> jax.Array:
    """:func:`blocked_local_attention` on the whole batch at once, with no loop: what TFLite converts
    (its converter cannot lower the chunks' loop, "'vhlo.dynamic_slice_v1' op is not part of the vhlo
    support yet"); on the CPU it is slower at large batches (the logits leave the cache)."""
    rows, cols = plans(q.shape[1], q.shape[2], kernel_size, block)
    return blocked_forward(q, k, v, rel_rows, rel_cols, rows, cols, float(qk_scale), float(qr_scale))
