"""Multi-head local self-attention (AttentionLite eq. 1, SASA's layer), one file per concern.

* :mod:`.layer`: the Linen layer :class:`LocalSelfAttention` (projections, relative embeddings, scaling,
  stride), its option checks and the conventions the paper leaves open.
* :mod:`.registry`: the implementation registry (:data:`IMPLS`, :func:`register_impl`) and the
  ``impl="auto"`` policy (:data:`AUTO_IMPLS`, :func:`select_impl`).
* :mod:`.patches`: ``impl="patches"``, the k^2-gather reference implementation.
* :mod:`.halo`: ``impl="halo"``, blocked attention (plans, blocks and windows, the custom VJP).
* :mod:`.blocked`: ``impl="blocked"``, halo's blocking in rank-4 tensors with a symbolic batch, for
  export (TFLite, ``jax.export``); inference only (no custom VJP).
* :mod:`.pallas`: ``impl="pallas"``, the halo forward as a fused Pallas kernel (XLA-built windows in,
  halo's backward).
* :mod:`.fused`: ``impl="fused"``, forward and backward as fused Pallas kernels that read q, k and v
  from the feature maps and never write logits (a Triton family for GPUs, a Mosaic family for TPUs).

The Pallas modules are imported the first time they are used, so importing the models does not import
``jax.experimental.pallas``.
"""

from alite_jax.models.local_attention.registry import (AUTO_IMPLS, IMPLS, LocalAttentionFn, register_impl,
                                                       register_lazy_impl, select_impl)
from alite_jax.models.local_attention.patches import (extract_patches, fold_neighbourhoods,
                                                      gather_neighbourhoods, neighbourhood_mask,
                                                      patches_local_attention)
from alite_jax.models.local_attention.halo import (HALO_CHUNK_BYTES, HaloPlan, default_halo_block,
                                                   default_halo_chunk, halo_local_attention, halo_plan)
from alite_jax.models.local_attention.blocked import blocked_local_attention
from alite_jax.models.local_attention.layer import (REL_LAYOUTS, SCALINGS, LocalSelfAttention,
                                                    attention_scales, check_attention_options)

register_lazy_impl("pallas", "alite_jax.models.local_attention.pallas")
register_lazy_impl("fused", "alite_jax.models.local_attention.fused")

__all__ = ["AUTO_IMPLS", "HALO_CHUNK_BYTES", "IMPLS", "REL_LAYOUTS", "SCALINGS", "HaloPlan",
           "LocalAttentionFn", "LocalSelfAttention", "attention_scales", "blocked_local_attention",
           "check_attention_options",
           "default_halo_block", "default_halo_chunk", "extract_patches", "fold_neighbourhoods",
           "gather_neighbourhoods", "halo_local_attention", "halo_plan", "neighbourhood_mask",
           "patches_local_attention", "register_impl", "register_lazy_impl", "select_impl"]
