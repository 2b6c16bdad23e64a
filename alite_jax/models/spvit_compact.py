"""An SPViT search's found architecture as a plain network: :class:`CompactViT` and its blocks.

Each block's attention slot is one of nothing (skip), a 1x1 conv (Linear D -> hd, BN, ReLU, Linear
hd -> D), a 3x3 conv (one (3, 3, D, hd) kernel on the patch grid, BN, ReLU, Linear hd -> D) or MSA, and
its FFN has only the kept hidden units. Two forms of the conv slot: folded (the default;
:class:`ConvAttention`, plain kernels, for inference) and unfolded (``folded=False``;
:class:`UnfoldedConvAttention`, SPViT's fine-tuning parametrisation, ziplab/SPViT
``SPViT_DeiT/models_pruning.py`` ``UnifiedAttention``: the full ``v`` and ``proj``, ``head_probs`` and the
branch BatchNorm, the kernel mixed at run time by the supernet's own functions). Optional stochastic depth
(``drop_path_rate``).

The models are built from the architecture as data, whose format is checked here
(:func:`validate_architecture`; :func:`arch_blocks`, :func:`arch_cost_kwargs`: the form
:mod:`alite_jax.vit_costs` counts). Its extraction from a supernet, its file, and the variables of these
modules (from the supernet or a dense DeiT, folded or not) are :mod:`alite_jax.compact.spvit`'s. With either
form's variables the compact model computes what the supernet computes in evaluation mode, block by block
(tests/test_spvit_extract.py, tests/test_spvit_finetune.py; docs/spvit_single_path.md "Extraction and the
compact model"):

* a skipped block's attention slot adds 0 (the supernet's search-time skip; ziplab/SPViT's fine-tuning
  path returns LN(x) for a skipped block instead, which this model does not do);
* a conv block's class token bypasses the conv, its slot output is LN(x)_cls (as the supernet and
  ziplab/SPViT ``UnifiedAttention``'s fine-tuning path, which concatenates ``x[:, 0]`` in front);
* the 3x3 conv is a plain zero-padded cross-correlation with the folded kernel, as the fine-tuning path's
  ``F.conv2d(padding=1)`` on the mixed kernel.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from alite_jax.models import spvit
from alite_jax.models.vit import Attention, classify, drop_path, drop_path_rates, embed_tokens

ARCH_FORMAT = "alite_jax.spvit_arch/1"
ATTENTION_TYPES = ("skip", "1x1", "3x3", "msa")  # indexed by the number of indicators on, as vit_costs
CONV_KINDS = ("1x1", "3x3")
SHAPE_FIELDS = ("image_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "mlp_hidden",
                "num_classes")


def validate_architecture(arch: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``arch`` is a well-formed architecture (see :func:`extract_architecture`)."""
    if arch.get("format") != ARCH_FORMAT:
        raise ValueError(f"not an SPViT architecture of format {ARCH_FORMAT!r}: "
                         f"format={arch.get('format')!r}")
    missing = [f for f in SHAPE_FIELDS + ("blocks",) if f not in arch]
    if missing:
        raise ValueError(f"architecture lacks {missing}")
    if arch["dim"] % arch["num_heads"] or arch["image_size"] % arch["patch_size"]:
        raise ValueError("dim must be a multiple of num_heads and image_size of patch_size")
    if len(arch["blocks"]) != arch["depth"]:
        raise ValueError(f"depth {arch['depth']} but {len(arch['blocks'])} blocks")
    for i, block in enumerate(arch["blocks"]):
        if block.get("attention") not in ATTENTION_TYPES:
            raise ValueError(f"block {i}: attention {block.get('attention')!r} is not one of "
                             f"{ATTENTION_TYPES}")
        units = list(block.get("ffn_units", ()))
        if units != sorted(set(units)) or any(not 0 <= u < arch["mlp_hidden"] for u in units):
            raise ValueError(f"block {i}: ffn_units must be increasing, distinct, in "
                             f"[0, {arch['mlp_hidden']})")


def arch_blocks(arch: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """Per block (attention type, kept FFN width): the form :mod:`alite_jax.vit_costs` counts."""
    return tuple((b["attention"], len(b["ffn_units"])) for b in arch["blocks"])


def arch_cost_kwargs(arch: Mapping[str, Any]) -> dict[str, int]:
    """The shape keywords of :func:`alite_jax.vit_costs.vit_arch_macs` / ``vit_arch_params`` for ``arch``."""
    return {k: arch[k] for k in ("image_size", "patch_size", "dim", "num_heads", "num_classes", "in_chans")}


Dtype = Any


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=spvit.trunc_normal, bias_init=nn.initializers.zeros,
                    name=name)


class ConvAttention(nn.Module):
    """A found conv block's attention slot, FOLDED: conv (1x1 or 3x3, D -> hd) on the patch grid, BN, ReLU,
    Linear hd -> D; the class token passes through (its output is its input).

    Parameters ``conv_1x1`` (a Dense, kernel (D, hd)) or ``conv_3x3`` (a Conv, kernel (3, 3, D, hd)),
    ``bn_1x1`` / ``bn_3x3`` (the supernet's names, so its running statistics carry over) and ``proj``.
    """

    kind: str  # "1x1" or "3x3"
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ValueError(f"a conv block takes a class token and a square grid of patches; got {n} tokens")
        grid = x[:, 1:].reshape(b, side, side, d)
        if self.kind == "3x3":
            y = nn.Conv(hd, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_3x3")(grid)
        elif self.kind == "1x1":
            y = _dense(hd, "conv_1x1", self.dtype)(grid)
        else:
            raise ValueError(f"conv kind {self.kind!r} is not '1x1' or '3x3'")
        y = spvit.branch_batch_norm(train, self.dtype, f"bn_{self.kind}")(y)
        y = _dense(d, "proj", self.dtype)(nn.relu(y).reshape(b, n - 1, hd))
        return jnp.concatenate([x[:, :1], y], axis=1)


class LinearParams(nn.Module):
    """The ``kernel`` (in_features, features) and ``bias`` of a Linear initialised as the dense ViT's,
    returned rather than applied: an unfolded conv block needs ``v``'s and ``proj``'s weights, not their
    outputs, under a Dense's parameter names."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        shape = (self.in_features, self.features)
        return {"kernel": self.param("kernel", spvit.trunc_normal, shape, jnp.float32),
                "bias": self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)}


class UnfoldedConvAttention(nn.Module):
    """A found conv block's attention slot in SPViT's fine-tuning parametrisation (ziplab/SPViT
    ``SPViT_DeiT/models_pruning.py``, ``UnifiedAttention`` with a conv ``msa_indicators``): the full value
    projection ``v`` (D -> D), ``proj`` (D -> D), ``head_probs`` (heads x 9) and the branch's BatchNorm
    ``bn_1x1`` / ``bn_3x3``, with the supernet's ``attn`` names and shapes (weights copy across). The kernel
    is mixed at run time, A = softmax(head_probs / alpha), by the supernet's own
    :func:`~alite_jax.models.spvit.conv_branch_weights` and :func:`~alite_jax.models.spvit.conv_branch`, so
    the slot computes the supernet's branch in evaluation and in training. The class token passes through.
    """

    kind: str  # "1x1" or "3x3"
    num_heads: int
    alpha: float = spvit.HEAD_PROBS_ALPHA
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 3)
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"the width D ({d}) must be a multiple of num_heads ({self.num_heads})")
        v, proj = LinearParams(d, d, name="v")(), LinearParams(d, d, name="proj")()
        head_probs = self.param("head_probs", spvit.HEAD_PROBS_INIT, (self.num_heads, spvit.KERNEL_TAPS),
                                jnp.float32)
        w = spvit.conv_branch_weights(spvit.head_mix(head_probs, self.alpha), v["kernel"], v["bias"],
                                      proj["kernel"])
        bn = spvit.branch_batch_norm(train, self.dtype, f"bn_{self.kind}")
        out = spvit.conv_branch(x.astype(self.dtype), w, proj["bias"], self.kind, bn)
        chex.assert_equal_shape([out, x])
        return out


class FFNBias(nn.Module):
    """An FFN that kept no hidden unit: what remains of it is ``fc2``'s bias (a zero-size fc1 / fc2 kernel
    would remain otherwise, which checkpoints cannot store)."""

    features: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("bias", nn.initializers.zeros, (self.features,))


class CompactBlock(nn.Module):
    """A pre-norm block of a found architecture: x + Slot(LN(x)), x + fc2(GELU(fc1(LN(x)))) at ``width``;
    the conv slot folded (:class:`ConvAttention`) or not (:class:`UnfoldedConvAttention`); both residual
    branches through :func:`~alite_jax.models.vit.drop_path` at rate ``drop_path``."""

    attention: str
    width: int
    num_heads: int
    dtype: Dtype = jnp.float32
    folded: bool = True
    alpha: float = spvit.HEAD_PROBS_ALPHA
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=spvit.LAYER_NORM_EPSILON, dtype=self.dtype, name=name)  # noqa: E731
        if self.attention == "msa":
            slot = Attention(self.num_heads, self.dtype, name="attn")
            x = x + drop_path(self, slot(norm("norm1")(x)), self.drop_path, train)
        elif self.attention in CONV_KINDS:
            if self.folded:
                slot = ConvAttention(self.attention, self.num_heads, self.dtype, name="attn")
            else:
                slot = UnfoldedConvAttention(self.attention, self.num_heads, self.alpha, self.dtype,
                                             name="attn")
            x = x + drop_path(self, slot(norm("norm1")(x), train), self.drop_path, train)
        elif self.attention != "skip":  # skip: the slot adds 0 (the supernet's eval), norm1 is unused
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_TYPES}")
        if self.width == 0:  # no hidden unit kept: the FFN adds fc2's bias alone (and LN2 is unused)
            bias = FFNBias(d, name="fc2")()
            return x + drop_path(self, jnp.broadcast_to(bias.astype(x.dtype), x.shape), self.drop_path, train)
        y = nn.gelu(_dense(self.width, "fc1", self.dtype)(norm("norm2")(x)), approximate=False)
        return x + drop_path(self, _dense(d, "fc2", self.dtype)(y), self.drop_path, train)


class CompactViT(nn.Module):
    """A found SPViT architecture as a plain network (dense ViT names: ``patch_embed``, ``cls_token``,
    ``pos_embed``, ``block{i}/{norm1, attn, norm2, fc1, fc2}``, ``norm``, ``head``).

    ``attention`` and ``ffn_widths`` hold one entry per block (tuples: a module's fields stay hashable);
    :meth:`from_architecture` builds one from :func:`~alite_jax.compact.spvit.extract_architecture`'s dict.
    A skipped block has no ``attn`` and no ``norm1``; an MSA block's ``attn`` is the dense ViT's (``qk``,
    ``v``, ``proj``); a conv block's is :class:`ConvAttention` (``folded``: the inference form) or
    :class:`UnfoldedConvAttention` (``folded=False``: SPViT's fine-tuning form, ``head_probs`` mixed at
    run time with temperature ``alpha``; :func:`~alite_jax.compact.spvit.fold_variables` converts its
    variables). ``__call__(x, train=False)`` returns ``(logits, features)`` as the dense ViT; ``train``
    switches the BatchNorms to batch statistics (``batch_stats`` mutable) and, with ``drop_path_rate`` > 0,
    turns on stochastic depth (rate ``np.linspace(0, drop_path_rate, depth)[i]`` in block i; rng stream
    ``"dropout"``).
    """

    num_classes: int
    attention: tuple[str, ...]
    ffn_widths: tuple[int, ...]
    image_size: int = 224
    patch_size: int = 16
    dim: int = 192
    num_heads: int = 3
    dtype: Dtype = jnp.float32
    folded: bool = True
    alpha: float = spvit.HEAD_PROBS_ALPHA
    drop_path_rate: float = 0.0

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any], dtype: Dtype = jnp.float32, folded: bool = True,
                          drop_path_rate: float = 0.0, alpha: float = spvit.HEAD_PROBS_ALPHA) -> CompactViT:
        """The compact model of ``arch`` (:func:`validate_architecture` first)."""
        validate_architecture(arch)
        kinds, widths = zip(*arch_blocks(arch))
        return cls(num_classes=arch["num_classes"], attention=tuple(kinds), ffn_widths=tuple(widths),
                   image_size=arch["image_size"], patch_size=arch["patch_size"], dim=arch["dim"],
                   num_heads=arch["num_heads"], dtype=dtype, folded=folded, alpha=alpha,
                   drop_path_rate=drop_path_rate)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        chex.assert_rank(x, 4)
        if len(self.attention) != len(self.ffn_widths):
            raise ValueError(f"{len(self.attention)} attention types but {len(self.ffn_widths)} FFN widths")
        if x.shape[1:3] != (self.image_size, self.image_size) or self.image_size % self.patch_size:
            raise ValueError(f"this model takes {self.image_size}x{self.image_size} images (a multiple of "
                             f"the patch size {self.patch_size}); got {x.shape[1]}x{x.shape[2]}")
        x = embed_tokens(self, x, self.patch_size, self.dim, self.dtype)
        features = []
        rates = drop_path_rates(self.drop_path_rate, len(self.attention))
        for i, (kind, width) in enumerate(zip(self.attention, self.ffn_widths)):
            x = CompactBlock(kind, width, self.num_heads, self.dtype, self.folded, self.alpha, rates[i],
                             name=f"block{i}")(x, train)
            features.append(x)
        return classify(x, self.num_classes, self.dtype), tuple(features)


__all__: Sequence[str] = (
    "ConvAttention", "FFNBias", "LinearParams", "UnfoldedConvAttention", "CompactBlock", "CompactViT")
