"""Compact storage of irregularly pruned variables: non-zero values plus a packed bitmask per kernel.

An irregular mask (``sparsity.structure="irregular"``) leaves no row or channel to drop, and on this
CPU a sparse matmul does not beat the dense one at d = 0.1 (benchmarks/compaction.py,
benchmarks/RESULTS.md), so an irregular student runs dense. Its *artifact* can still shrink to about the
non-zeros: :func:`save_sparse` writes every float leaf whose encoding is smaller that way as

* ``<path>::values``: its non-zero values in C order (the leaf's dtype),
* ``<path>::bits``: ``np.packbits`` of its non-zero pattern (one bit per weight),
* ``<path>::shape``: its shape (int64),

and every other leaf as it is (``<path>``), in one uncompressed .npz. At density d a float32 kernel
takes (4 d + 1/8) bytes per weight instead of 4, e.g. 13% at d = 0.1. :func:`load_sparse` restores the
dense masked arrays exactly (a stored zero comes back as +0.0); :func:`densify` does the same in JAX
(jittable: the StableHLO export's weights program runs it, :mod:`alite_jax.export.formats`).
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from alite_jax.compact.tree import flatten, unflatten

FORMAT = "alite_jax.sparse_store/1"
SEP = "::"


def encode(flat: Mapping[str, np.ndarray], sparse: bool = True) -> dict[str, np.ndarray]:
    """The arrays :func:`save_sparse` writes for a flat {path: array} dict."""
    out = {"__format__": np.array(FORMAT)}
    for key, value in flat.items():
        if SEP in key or key.startswith("__"):
            raise ValueError(f"parameter path {key!r} may not contain {SEP!r} or start with '__'")
        value = np.asarray(value)
        nonzero = value != 0
        count = int(np.count_nonzero(nonzero))
        encoded = count * value.itemsize + (value.size + 7) // 8 + 8 * value.ndim
        if sparse and np.issubdtype(value.dtype, np.floating) and encoded < value.nbytes:
            out[f"{key}{SEP}values"] = value[nonzero]
            out[f"{key}{SEP}bits"] = np.packbits(nonzero.reshape(-1))
            out[f"{key}{SEP}shape"] = np.asarray(value.shape, np.int64)
        else:
            out[key] = value
    return out


def stored_leaves(data: Mapping[str, np.ndarray]) -> Iterator[tuple[str, Any, Any, tuple[int, ...]]]:
    """Each leaf of :func:`encode`'s arrays: ``(path, array, None, ())`` for a leaf stored as it is,
    ``(path, values, bits, shape)`` for one stored sparse. Raises ValueError for other arrays."""
    if "__format__" not in data or str(data["__format__"]) != FORMAT:
        raise ValueError(f"not an alite_jax sparse store (format {FORMAT})")
    for key in data:
        if key.startswith("__") or (SEP in key and not key.endswith(f"{SEP}values")):
            continue
        if SEP not in key:
            yield key, data[key], None, ()
            continue
        path = key[:-len(f"{SEP}values")]
        shape = tuple(int(s) for s in np.asarray(data[f"{path}{SEP}shape"]))
        yield path, data[key], data[f"{path}{SEP}bits"], shape


def decode(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The flat {path: dense array} dict of :func:`encode`'s arrays."""
    flat = {}
    for path, values, bits, shape in stored_leaves(data):
        values = np.asarray(values)
        if bits is None:
            flat[path] = values
            continue
        size = int(np.prod(shape))
        nonzero = np.unpackbits(bits, count=size).astype(bool)
        if int(nonzero.sum()) != values.size:
            raise ValueError(f"{path}: {values.size} values for {int(nonzero.sum())} set bits")
        dense = np.zeros(size, values.dtype)
        dense[nonzero] = values
        flat[path] = dense.reshape(shape)
    return flat


def densify(data: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """:func:`decode` in JAX ops (static shapes; traceable), the flat {path: dense array} of
    :func:`encode`'s arrays: the bits unpacked (most significant first, as ``np.packbits``), each set
    bit's rank (a cumulative sum) indexing the values."""
    flat: dict[str, Any] = {}
    for path, values, bits, shape in stored_leaves(data):
        values = jnp.asarray(values)
        if bits is None:
            flat[path] = values
            continue
        size = int(np.prod(shape))
        bits = jnp.asarray(bits).astype(jnp.int32)
        nonzero = ((bits[:, None] >> jnp.arange(7, -1, -1, dtype=jnp.int32)) & 1).reshape(-1)[:size]
        if values.size == 0:
            flat[path] = jnp.zeros(shape, values.dtype)
            continue
        rank = jnp.clip(jnp.cumsum(nonzero) - 1, 0, values.size - 1)
        flat[path] = jnp.where(nonzero == 1, values[rank], jnp.zeros((), values.dtype)).reshape(shape)
    return flat


def save_sparse(path: str, variables: Mapping[str, Any], sparse: bool = True) -> int:
    """Writes a nested dict of arrays (e.g. ``{"params", "batch_stats"}``) to an .npz, the sparse leaves
    as values + bitmask (``sparse=False``: every leaf dense, the reference size); returns its bytes."""
    with open(path, "wb") as f:
        np.savez(f, **encode(flatten(variables), sparse))
    return os.path.getsize(path)


def stored_bytes(variables: Mapping[str, Any], sparse: bool = True) -> int:
    """The bytes :func:`save_sparse` would write, without touching the disk."""
    buffer = io.BytesIO()
    np.savez(buffer, **encode(flatten(variables), sparse))
    return buffer.getbuffer().nbytes


def load_sparse(path: str) -> dict[str, Any]:
    """The nested dict of dense numpy arrays that :func:`save_sparse` wrote (masked zeros restored)."""
    with np.load(path, allow_pickle=False) as data:
        return unflatten(decode({k: data[k] for k in data.files}))
