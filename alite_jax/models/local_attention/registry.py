"""The implementation registry of local attention, and the ``impl="auto"`` policy.

Every implementation is a pure function with the :class:`LocalAttentionFn` signature and computes the
same function (the conformance tests hold each to naive references, values and gradients). ``IMPLS``
maps names to them; :func:`register_impl` adds one. An implementation whose module is costly to import
(``"pallas"`` and ``"fused"`` pull in ``jax.experimental.pallas``) is registered lazily by
:func:`register_lazy_impl`: its module loads the first time the implementation is called.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import jax


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



class LazyImpl:
    """An entry of :data:`IMPLS` that imports ``module`` (which registers the real function under
    ``name``, replacing this entry) the first time it is called."""

    def __init__(self, name: str, module: str):
        self.name, self.module = name, module

    def __call__(self, *args, **kwargs) -> jax.Array:
        importlib.import_module(self.module)
        fn = IMPLS[self.name]
        if isinstance(fn, LazyImpl):
            raise RuntimeError(f"importing {self.module} did not register impl {self.name!r}")
        return fn(*args, **kwargs)


def register_lazy_impl(name: str, module: str) -> None:
    """Makes ``impl=name`` selectable now, importing ``module`` (which must register ``name`` with
    :func:`register_impl`) only when the implementation is first called."""
    IMPLS.setdefault(name, LazyImpl(name, module))


# --------------------------------------------------------------------------------------------------
# impl="auto": the fastest measured implementation for the backend.
# --------------------------------------------------------------------------------------------------

# Backend -> implementation, chosen from benchmarks/local_attention.py's measurements
# (benchmarks/RESULTS.md): on the CPU and on the GPU (an H200) halo's forward+backward was the fastest
# at every SA-ResNet26 shape measured, and whole-model training with pallas went NaN on the GPU once (see
# local_attention/pallas.py); a per-shape rule would gain nothing measurable. "fused" has not been
# compiled on a GPU or TPU yet (benchmarks/gpu_suite.sh measures it); on TPU nothing has been timed:
# halo, the pure-JAX choice.
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
