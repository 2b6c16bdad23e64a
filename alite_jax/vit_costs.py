"""Analytic costs of ViTs / DeiTs, SPViT supernets and the architectures SPViT extracts.

A module of its own, not a section of ``alite_jax.costs``: that module traces flax models and counts
their recorded layers under the AttentionLite conventions (norms not counted, FLOPs = 2 x MACs); this one
is closed-form arithmetic that follows SPViT's own count (norms counted, the FFN on the patch tokens
only), and one of its functions is a differentiable jax function of the gate logits, used in a loss.

SPViT calls these numbers "FLOPs"; they are multiply-accumulates (MACs), as in ``alite_jax.costs``
(FLOPs = 2 x MACs there). The terms follow the public code, ziplab/SPViT,
``SPViT_DeiT/models_pruning.py``: ``SPVisionTransformer.flops`` (the per-block terms),
``PatchEmbed.flops`` and ``SPVisionTransformer.calculate_bops_loss`` (the loss); the gate surrogate is
``UnifiedAttention.search_forward`` / ``UnifiedMlp.search_forward``. With d = dim, hd = d // heads,
HW patches and N = HW + 1 tokens:

* patch embedding HW d C p^2 (C = 3 input channels); head d x classes (the CLS token only);
* per block: norms 2 d N; attention by type: skip 0, 1x1 conv c1 = 2 d hd HW, 3x3 conv
  c3 = (9 d hd + hd d) HW, MSA m = 4 N d^2 + 2 d N^2; FFN 2 HW d x (kept hidden units).

The final norm, softmax, GELU, biases and residual additions are not counted; the FFN is counted on
the HW patch tokens, not on the N tokens it runs on (so the CLS token's 2 d hidden MACs per block are
missing, as in SPViT). docs/costs.md ("ViTs and SPViT") lists the check values.

These are functions, with no command line of their own: ``python -m alite_jax.costs`` counts every zoo
model, and for a DeiT or a found architecture (``--arch=spvit_deit_tiny``, an ``architecture.json``)
reports this count beside its own and prints :func:`format_arch_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_TYPES = ("skip", "1x1", "3x3", "msa")

# DeiT shapes (facebookresearch/deit; SPViT's ``spvit_deit_*_patch16_224``): 224x224, patch 16, 12 blocks,
# mlp_ratio 4, 1000 classes, qkv bias.
DEIT_CONFIGS: dict[str, dict[str, int]] = {
    "deit_tiny": dict(dim=192, num_heads=3),
    "deit_small": dict(dim=384, num_heads=6),
    "deit_base": dict(dim=768, num_heads=12),
}

# The released SPViT-DeiT-Ti architecture: MSA plan from ziplab/SPViT
# SPViT_DeiT/config/spvit_deit_ti_l200_t10_ft.json ("assigned_indicators": [1,0,0] for blocks 1-2, i.e.
# 1x1 conv, [1,1,1] = MSA for blocks 3-12); FFN widths kept of 768 (the FFN indicators of
# ffn_indicators/spvit_deit_ti_l200_t10_search_10epoch.pth, per block; taken as given, that binary file
# was not read here).
SPVIT_DEIT_TINY_ARCH: tuple[tuple[str, int], ...] = tuple(zip(
    ["1x1"] * 2 + ["msa"] * 10, [744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145]))
# The MSA plans of the released DeiT-S and DeiT-B searches (configs spvit_deit_sm_l30_t32_ft.json and
# spvit_deit_bs_l008_t60_ft.json); their FFN widths are only in the .pth files, so no full architecture.
SPVIT_DEIT_SMALL_ATTENTION = ("1x1",) + ("msa",) * 11
SPVIT_DEIT_BASE_ATTENTION = ("1x1",) * 3 + ("3x3",) * 2 + ("msa",) * 7
RELEASED_ARCHS = {"spvit_deit_tiny": ("deit_tiny", SPVIT_DEIT_TINY_ARCH)}


def _grid(image_size: int | tuple[int, int], patch_size: int) -> int:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    return (h // patch_size) * (w // patch_size)


def attention_macs(kind: str, dim: int, num_heads: int, num_patches: int) -> int:
    """MACs of one block's attention of type ``kind`` (``ATTENTION_TYPES``), SPViT's terms."""
    hw, n, hd = num_patches, num_patches + 1, dim // num_heads
    if kind == "skip":
        return 0
    if kind == "1x1":
        return 2 * dim * hd * hw                      # Linear d -> hd and hd -> d on the patch tokens
    if kind == "3x3":
        return (9 * dim * hd + hd * dim) * hw         # conv 3x3 d -> hd, then Linear hd -> d
    if kind == "msa":
        return 4 * n * dim ** 2 + 2 * dim * n ** 2    # q, k, v, proj; q.k^T and attention.v
    raise ValueError(f"attention type {kind!r} is not one of {ATTENTION_TYPES}")


def _fixed_macs(num_patches: int, dim: int, depth: int, num_classes: int, patch_size: int,
                in_chans: int) -> int:
    """Patch embedding, head and the per-block norms: the terms no gate changes."""
    return (num_patches * dim * in_chans * patch_size ** 2 + dim * num_classes
            + depth * 2 * dim * (num_patches + 1))


def _check_arch(arch: Sequence[tuple[str, int]], hidden: int | None) -> None:
    for i, (kind, width) in enumerate(arch):
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"block {i}: attention type {kind!r} is not one of {ATTENTION_TYPES}")
        if width < 0 or (hidden is not None and width > hidden):
            raise ValueError(f"block {i}: FFN width {width} is outside [0, {hidden}]")


def vit_arch_block_macs(arch: Sequence[tuple[str, int]], image_size: int | tuple[int, int] = 224,
                        patch_size: int = 16, dim: int = 192, num_heads: int = 3) -> list[dict[str, int]]:
    """Per block: attention, FFN and norm MACs of a searched architecture (see ``vit_arch_macs``)."""
    hw = _grid(image_size, patch_size)
    _check_arch(arch, None)
    return [dict(attention=attention_macs(kind, dim, num_heads, hw), ffn=2 * hw * dim * width,
                 norms=2 * dim * (hw + 1)) for kind, width in arch]


def vit_arch_macs(arch: Sequence[tuple[str, int]], image_size: int | tuple[int, int] = 224,
                  patch_size: int = 16, dim: int = 192, num_heads: int = 3, num_classes: int = 1000,
                  in_chans: int = 3) -> float:
    """MACs per image of a searched / extracted architecture, as SPViT counts its "FLOPs".

    ``arch``: per block, (attention type in ``ATTENTION_TYPES``, number of kept FFN hidden units).
    """
    hw = _grid(image_size, patch_size)
    blocks = vit_arch_block_macs(arch, image_size, patch_size, dim, num_heads)
    return float(_fixed_macs(hw, dim, len(arch), num_classes, patch_size, in_chans)
                 + sum(b["attention"] + b["ffn"] for b in blocks))


def dense_arch(depth: int = 12, dim: int = 192, mlp_ratio: float = 4) -> tuple[tuple[str, int], ...]:
    """The unpruned ViT as an architecture: MSA and the full FFN in every block."""
    return (("msa", int(dim * mlp_ratio)),) * depth


def vit_macs(image_size: int | tuple[int, int] = 224, patch_size: int = 16, dim: int = 192, depth: int = 12,
             num_heads: int = 3, mlp_ratio: float = 4, num_classes: int = 1000, in_chans: int = 3) -> float:
    """MACs per image of a dense ViT / DeiT, SPViT's count (DeiT-Ti 1.251 G, -S 4.587 G, -B 17.51 G)."""
    return vit_arch_macs(dense_arch(depth, dim, mlp_ratio), image_size, patch_size, dim, num_heads,
                         num_classes, in_chans)


def vit_arch_params(arch: Sequence[tuple[str, int]], image_size: int | tuple[int, int] = 224,
                    patch_size: int = 16, dim: int = 192, num_heads: int = 3, num_classes: int = 1000,
                    in_chans: int = 3, convention: str = "spvit") -> int:
    """Trainable parameters of the extracted model (qkv bias on, as DeiT).

    Always: patch embedding (C p^2 d + d), CLS token (d), position embedding ((HW + 1) d), per block two
    LayerNorms (4 d) and the FFN at kept width w (d w + w + w d + d), final LayerNorm (2 d), head
    (d classes + classes). MSA blocks: qk (2 d^2 + 2 d), v (d^2 + d), proj (d^2 + d). Skip blocks: none.
    Convolution blocks, by ``convention``:

    * ``"spvit"``: as SPViT's fine-tuning model holds them (``UnifiedAttention.__init__`` with
      ``msa_indicators`` [1,0,0] or [1,1,0]): the full v (d^2 + d) and proj (d^2 + d), from which the
      kernels are mixed at run time, ``head_probs`` (heads x 9) and the BatchNorm's weight and bias
      (2 hd; running statistics are buffers, not parameters). This reproduces the published 4.87 M.
    * ``"folded"``: the compact model after folding ``head_probs`` into the kernels: 1x1, Linear d -> hd
      (d hd + hd), BN (2 hd), Linear hd -> d (hd d + d); 3x3, conv 3x3 d -> hd (9 d hd + hd), BN (2 hd),
      Linear hd -> d (hd d + d).
    """
    if convention not in ("spvit", "folded"):
        raise ValueError(f"convention {convention!r} is not 'spvit' or 'folded'")
    _check_arch(arch, None)
    d, hd, n = dim, dim // num_heads, _grid(image_size, patch_size) + 1
    total = in_chans * patch_size ** 2 * d + d + d + n * d + 2 * d + d * num_classes + num_classes
    for kind, width in arch:
        total += 4 * d + d * width + width + width * d + d
        if kind == "msa":
            total += 4 * d * d + 4 * d
        elif kind in ("1x1", "3x3"):
            if convention == "spvit":
                total += 2 * (d * d + d) + num_heads * 9 + 2 * hd
            else:
                taps = 9 if kind == "3x3" else 1
                total += taps * d * hd + hd + 2 * hd + hd * d + d
    return total


def vit_params(image_size: int | tuple[int, int] = 224, patch_size: int = 16, dim: int = 192, depth: int = 12,
               num_heads: int = 3, mlp_ratio: float = 4, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Trainable parameters of a dense ViT / DeiT (DeiT-Ti 5,717,416)."""
    return vit_arch_params(dense_arch(depth, dim, mlp_ratio), image_size, patch_size, dim, num_heads,
                           num_classes, in_chans)


# ---- The supernet: SPViT's differentiable FLOPs surrogate --------------------------------------------

def gate_values(logits: jax.Array) -> jax.Array:
    """SPViT's loss-side gate value: forward 1[sigmoid(theta) > 0.5], gradient of sigmoid(sigmoid(theta)-.5).

    (``UnifiedMlp.search_forward``'s ``ffn_indicators`` and ``UnifiedAttention.search_forward``'s
    ``kernel_indicators``; the FLOPs count uses these, not the relaxed-Bernoulli samples.)
    """
    s = jax.nn.sigmoid(logits)
    soft = jax.nn.sigmoid(s - 0.5)
    # hard + (soft - sg(soft)): the bracket is exactly 0, so the forward is exactly 0 or 1 (SPViT's
    # (hard - sg(soft)) + soft can round 1 to 1 - 2^-24 in float32).
    return (s > 0.5).astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))


def msa_indicators(msa_gate_logits: jax.Array) -> jax.Array:
    """(depth, 3) gate logits -> (i0, i1, i2) per block: the cumprod of the gate values."""
    return jnp.cumprod(gate_values(msa_gate_logits), axis=-1)


def _stack_ffn(ffn_gate_logits: Any) -> list[jax.Array]:
    if isinstance(ffn_gate_logits, (list, tuple)):
        return [jnp.asarray(g) for g in ffn_gate_logits]
    return list(jnp.asarray(ffn_gate_logits))


def supernet_macs(msa_gate_logits: jax.Array, ffn_gate_logits: Any, image_size: int | tuple[int, int] = 224,
                  patch_size: int = 16, dim: int = 192, num_heads: int = 3, num_classes: int = 1000,
                  in_chans: int = 3) -> jax.Array:
    """The supernet's MACs as a jax scalar, differentiable in the gate logits (``SPVisionTransformer.flops``).

    ``msa_gate_logits``: (depth, 3); ``ffn_gate_logits``: an array (depth, hidden) or a list of per-block
    arrays. Per block: attention i0 c1 + i1 (c3 - c1) + i2 (m - c3) with (i0, i1, i2) = ``msa_indicators``,
    FFN 2 HW d sum(``gate_values``); plus norms, patch embedding and head. The forward value equals
    ``vit_arch_macs(arch_from_gates(...))`` (up to the dtype's rounding); gradients are those of the soft
    sigmoid(sigmoid(theta) - 0.5) through the hard forward values (straight-through).
    """
    msa_gate_logits = jnp.asarray(msa_gate_logits)
    ffn = _stack_ffn(ffn_gate_logits)
    depth = msa_gate_logits.shape[0]
    if msa_gate_logits.shape != (depth, 3) or len(ffn) != depth:
        raise ValueError(f"need msa gate logits (depth, 3) and depth FFN gate vectors; got "
                         f"{msa_gate_logits.shape} and {len(ffn)}")
    hw = _grid(image_size, patch_size)
    c1, c3, m = (attention_macs(k, dim, num_heads, hw) for k in ("1x1", "3x3", "msa"))
    coeffs = jnp.asarray([c1, c3 - c1, m - c3], dtype=jnp.result_type(msa_gate_logits.dtype, jnp.float32))
    attention = jnp.sum(msa_indicators(msa_gate_logits) @ coeffs)
    ffn_units = sum(jnp.sum(gate_values(g)) for g in ffn)
    return attention + 2 * hw * dim * ffn_units + _fixed_macs(hw, dim, depth, num_classes, patch_size,
                                                               in_chans)


def arch_from_gates(msa_gate_logits: Any, ffn_gate_logits: Any) -> tuple[tuple[str, int], ...]:
    """The architecture the gates select at the eval threshold (sigmoid(theta) > 0.5), as extraction does."""
    on = np.asarray(jax.nn.sigmoid(jnp.asarray(msa_gate_logits)) > 0.5)
    ind = np.cumprod(on, axis=-1)
    kinds = [ATTENTION_TYPES[int(row.sum())] for row in ind]
    widths = [int(np.sum(np.asarray(jax.nn.sigmoid(g) > 0.5))) for g in _stack_ffn(ffn_gate_logits)]
    return tuple(zip(kinds, widths))


def flops_loss(macs: jax.Array, target_g: float, lam: float) -> jax.Array:
    """SPViT's complexity loss, lam (T - F / 1e9)^2 (``SPVisionTransformer.calculate_bops_loss``).

    ``macs`` is SPViT's "FLOPs" (multiply-accumulates), ``target_g`` in giga of the same unit.
    """
    return lam * (target_g - macs / 1e9) ** 2


# ---- A per-block table ----------------------------------------------------------------------------

def format_arch_table(arch: Sequence[tuple[str, int]], image_size: int | tuple[int, int] = 224,
                      patch_size: int = 16, dim: int = 192, num_heads: int = 3, num_classes: int = 1000,
                      in_chans: int = 3) -> str:
    """A per-block table (attention type, FFN width, MMACs) and the totals, as text."""
    hw = _grid(image_size, patch_size)
    lines = [f"{'block':>5} {'attention':>9} {'ffn':>5} {'attn MMACs':>10} {'ffn MMACs':>10} "
             f"{'norm MMACs':>10}"]
    for i, ((kind, width), b) in enumerate(zip(arch, vit_arch_block_macs(arch, image_size, patch_size, dim,
                                                                           num_heads))):
        lines.append(f"{i + 1:>5} {kind:>9} {width:>5} {b['attention'] / 1e6:>10.3f} {b['ffn'] / 1e6:>10.3f} "
                     f"{b['norms'] / 1e6:>10.3f}")
    macs = vit_arch_macs(arch, image_size, patch_size, dim, num_heads, num_classes, in_chans)
    params = vit_arch_params(arch, image_size, patch_size, dim, num_heads, num_classes, in_chans)
    lines += [f"patch embedding {hw * dim * in_chans * patch_size ** 2 / 1e6:.3f} MMACs, head "
              f"{dim * num_classes / 1e6:.3f} MMACs",
              f"total {macs / 1e9:.4g} G MACs (SPViT's \"FLOPs\"; {2 * macs / 1e9:.4g} G FLOPs = 2 x MACs), "
              f"{params / 1e6:.3f} M params (SPViT's convention)"]
    return "\n".join(lines)


if __name__ == "__main__":
    from alite_jax.errors import exit_with_user_error

    exit_with_user_error("alite_jax.vit_costs has no command line; count a model with python -m "
                         "alite_jax.costs, e.g. --model=deit_tiny --num_classes=1000 --arch=spvit_deit_tiny")
