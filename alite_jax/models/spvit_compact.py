"""The architecture an SPViT search found, as data and as a plain network.

* :func:`extract_architecture`: a :class:`~alite_jax.models.spvit.SupernetViT`'s params -> the found
  architecture as JSON-able data, thresholding the gates as the supernet does in evaluation
  (g = 1[sigmoid(theta) > 0.5], i = cumprod(g)); :func:`save_architecture` / :func:`load_architecture`.
* :class:`CompactViT`: that architecture as a plain Linen network, each block's attention slot one of
  nothing (skip), a 1x1 conv (Linear D -> hd, BN, ReLU, Linear hd -> D), a 3x3 conv (one (3, 3, D, hd)
  kernel on the patch grid, BN, ReLU, Linear hd -> D) or MSA, and an FFN with only the kept hidden units.
  Two forms of the conv slot: folded (the default; plain kernels, for inference) and unfolded
  (``folded=False``; SPViT's fine-tuning parametrisation, ziplab/SPViT ``SPViT_DeiT/models_pruning.py``
  ``UnifiedAttention``: the full ``v`` and ``proj``, ``head_probs`` and the branch BatchNorm, the kernel
  mixed at run time by the supernet's own functions). Optional stochastic depth (``drop_path_rate``).
* :func:`compact_variables`: the supernet's variables -> the compact model's, unfolded (a copy of the
  branch's weights) or folded, and the kept FFN units gathered (:func:`gather_ffn`; ziplab/SPViT
  ``SPViT_DeiT/utils.py``, the ``assigned_indicator_index`` gather).
* :func:`fold_variables`: unfolded -> folded variables: A = softmax(head_probs / alpha) folded into the conv
  kernels, biases and projections (:func:`fold_conv_attention`, i.e.
  :func:`~alite_jax.models.spvit.conv_branch_weights`).
* :func:`compact_from_dense`: SPViT's fine-tuning initialisation, the unfolded model started from a dense
  DeiT's weights with fresh ``head_probs`` and BatchNorms.

With either form's variables the compact model computes what the supernet computes in evaluation mode,
block by block (tests/test_spvit_extract.py, tests/test_spvit_finetune.py; docs/spvit_single_path.md
"Extraction and the compact model"):

* a skipped block's attention slot adds 0 (the supernet's search-time skip; ziplab/SPViT's fine-tuning
  path returns LN(x) for a skipped block instead, which this model does not do);
* a conv block's class token bypasses the conv, its slot output is LN(x)_cls (as the supernet and
  ziplab/SPViT ``UnifiedAttention``'s fine-tuning path, which concatenates ``x[:, 0]`` in front);
* the 3x3 conv is a plain zero-padded cross-correlation with the folded kernel, as the fine-tuning path's
  ``F.conv2d(padding=1)`` on the mixed kernel.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from alite_jax.models import spvit
from alite_jax.models.vit import Attention, classify, drop_path, drop_path_rates, embed_tokens
from alite_jax.models.zoo import count_params  # noqa: F401  (re-exported: the tests count with it)

Dtype = Any

ARCH_FORMAT = "alite_jax.spvit_arch/1"
ATTENTION_TYPES = ("skip", "1x1", "3x3", "msa")  # indexed by the number of indicators on, as vit_costs
SHAPE_FIELDS = ("image_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "mlp_hidden",
                "num_classes")


# ---- The architecture as data ------------------------------------------------------------------------

def _block_names(params: Mapping[str, Any]) -> list[str]:
    depth = sum(1 for name in params if name.startswith("block"))
    names = [f"block{i}" for i in range(depth)]
    missing = [n for n in names if n not in params]
    if missing or depth == 0:
        raise ValueError(f"expected SupernetViT params with block0 .. block{{depth-1}}; missing {missing}")
    return names


def extract_architecture(params: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a :class:`~alite_jax.models.spvit.SupernetViT`'s gate logits select in evaluation.

    ``params``: the supernet's ``params`` collection (the ``"params"`` entry of its variables). Per block
    the MSA gates g = 1[sigmoid(theta) > 0.5] (:func:`~alite_jax.models.spvit.sample_gate` with
    ``train=False``), i = cumprod(g), and the attention type is ``ATTENTION_TYPES[i0 + i1 + i2]``; the
    FFN keeps the hidden units whose gate is on, in increasing order. The shape fields are read from the
    params' shapes (``patch_embed``, ``pos_embed``, ``attn/head_probs``, ``fc1``, ``head``).

    Returns plain data (str, int, lists; :func:`save_architecture` writes it as JSON)::

        {"format": ARCH_FORMAT, "image_size", "patch_size", "in_chans", "dim", "depth", "num_heads",
         "mlp_hidden" (the supernet's FFN width), "num_classes",
         "blocks": [{"attention": "skip" | "1x1" | "3x3" | "msa", "ffn_units": [int, ...]}, ...]}
    """
    names = _block_names(params)
    p, _, in_chans, dim = (int(s) for s in np.shape(params["patch_embed"]["kernel"]))
    side = math.isqrt(np.shape(params["pos_embed"])[1] - 1)
    b0 = params[names[0]]
    arch: dict[str, Any] = {
        "format": ARCH_FORMAT, "image_size": side * p, "patch_size": p, "in_chans": in_chans, "dim": dim,
        "depth": len(names), "num_heads": int(np.shape(b0["attn"]["head_probs"])[0]),
        "mlp_hidden": int(np.shape(b0["fc1"]["kernel"])[1]),
        "num_classes": int(np.shape(params["head"]["kernel"])[1]), "blocks": []}
    for name in names:
        block = params[name]
        g = np.asarray(spvit.sample_gate(jnp.asarray(block["attn"]["msa_gate_logits"]), None, False))
        kind = ATTENTION_TYPES[int(np.cumprod(g > 0.5).sum())]
        ffn = np.asarray(spvit.sample_gate(jnp.asarray(block["ffn_gate_logits"]), None, False))
        arch["blocks"].append({"attention": kind, "ffn_units": [int(u) for u in np.flatnonzero(ffn > 0.5)]})
    validate_architecture(arch)
    return arch


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


def save_architecture(path: str | os.PathLike, arch: Mapping[str, Any]) -> None:
    """Writes ``arch`` as JSON (validated first)."""
    validate_architecture(arch)
    with open(path, "w") as f:
        json.dump(arch, f, indent=1)
        f.write("\n")


def load_architecture(path: str | os.PathLike) -> dict[str, Any]:
    """Reads an architecture written by :func:`save_architecture` (validated)."""
    with open(path) as f:
        arch = json.load(f)
    validate_architecture(arch)
    return arch


def arch_blocks(arch: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """Per block (attention type, kept FFN width): the form :mod:`alite_jax.vit_costs` counts."""
    return tuple((b["attention"], len(b["ffn_units"])) for b in arch["blocks"])


def arch_cost_kwargs(arch: Mapping[str, Any]) -> dict[str, int]:
    """The shape keywords of :func:`alite_jax.vit_costs.vit_arch_macs` / ``vit_arch_params`` for ``arch``."""
    return {k: arch[k] for k in ("image_size", "patch_size", "dim", "num_heads", "num_classes", "in_chans")}


# ---- The compact network -----------------------------------------------------------------------------

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
        elif self.attention in ("1x1", "3x3"):
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
    :meth:`from_architecture` builds one from :func:`extract_architecture`'s dict. A skipped block has no
    ``attn`` and no ``norm1``; an MSA block's ``attn`` is the dense ViT's (``qk``, ``v``, ``proj``); a
    conv block's is :class:`ConvAttention` (``folded``: the inference form) or
    :class:`UnfoldedConvAttention` (``folded=False``: SPViT's fine-tuning form, ``head_probs`` mixed at
    run time with temperature ``alpha``; :func:`fold_variables` converts its variables).
    ``__call__(x, train=False)`` returns ``(logits, features)`` as the dense ViT; ``train`` switches the
    BatchNorms to batch statistics (``batch_stats`` mutable) and, with ``drop_path_rate`` > 0, turns on
    stochastic depth (rate ``np.linspace(0, drop_path_rate, depth)[i]`` in block i; rng stream
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


# ---- Variables: the supernet's or a dense DeiT's -> the compact model's ------------------------------

CONV_KINDS = ("1x1", "3x3")


def fold_conv_attention(attn: Mapping[str, Any], kind: str,
                        alpha: float = spvit.HEAD_PROBS_ALPHA) -> dict[str, Any]:
    """An unfolded conv slot's params (``v``, ``proj``, ``head_probs``, ``bn_{kind}``, as the supernet's
    ``attn``) -> the folded :class:`ConvAttention`'s (``conv_{kind}``, ``bn_{kind}``, ``proj``).

    With A = softmax(head_probs / alpha) over the heads (``alpha`` must be the model's): ``conv_3x3``
    kernel (3, 3, D, hd) with tap (kh, kw) = sum_h A[h, kh + 3 kw] W_v^h and bias sum_p sum_h A[h, p]
    b_v^h, ``proj`` kernel sum_p sum_h A[h, p] W_proj^h; ``conv_1x1`` and its ``proj`` the centre tap
    p = 4 alone; ``proj``'s bias and the BatchNorm's scale and bias copied. This is
    :func:`~alite_jax.models.spvit.conv_branch_weights`, the function the unfolded model calls at run time.
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind {kind!r} is not one of {CONV_KINDS}")
    missing = [k for k in ("v", "proj", "head_probs") if k not in attn]
    if missing:
        raise ValueError(f"an unfolded conv slot has v, proj and head_probs; missing {missing} "
                         f"(already folded?)")
    w = spvit.conv_branch_weights(spvit.head_mix(attn["head_probs"], alpha), attn["v"]["kernel"],
                                  attn["v"]["bias"], attn["proj"]["kernel"])
    tag, bn = kind[0], f"bn_{kind}"
    return {f"conv_{kind}": {"kernel": w[f"kernel{tag}"], "bias": w[f"bias{tag}"]}, bn: attn[bn],
            "proj": {"kernel": w[f"proj{tag}"], "bias": attn["proj"]["bias"]}}


def fold_variables(variables: Mapping[str, Any], arch: Mapping[str, Any],
                   alpha: float = spvit.HEAD_PROBS_ALPHA) -> dict[str, Any]:
    """The unfolded :class:`CompactViT`'s variables (``folded=False``) -> the folded one's, for inference.

    Each conv block's ``attn`` goes through :func:`fold_conv_attention`; everything else, the BatchNorm
    statistics included, is kept as is. Both models then compute the same function (up to float rounding).
    """
    validate_architecture(arch)
    params = dict(variables["params"])
    for i, block in enumerate(arch["blocks"]):
        if block["attention"] in CONV_KINDS:
            name = f"block{i}"
            params[name] = {**params[name], "attn": fold_conv_attention(params[name]["attn"],
                                                                        block["attention"], alpha)}
    return {"params": params, "batch_stats": dict(variables.get("batch_stats", {}))}


def compact_variables(supernet_variables: Mapping[str, Any], arch: Mapping[str, Any],
                      alpha: float = spvit.HEAD_PROBS_ALPHA, *, folded: bool = True) -> dict[str, Any]:
    """The :class:`CompactViT` variables of ``arch`` from the supernet's ``{"params", "batch_stats"}``.

    Copied: ``patch_embed``, ``cls_token``, ``pos_embed``, ``norm``, ``head``, each block's ``norm2`` and
    (unless skipped) ``norm1``; an MSA block's ``qk``, ``v``, ``proj``. Gathered: ``fc1`` kernel columns
    and bias entries, ``fc2`` kernel rows, of the kept units (``fc2``'s bias whole). A conv block keeps
    its branch's ``v``, ``proj``, ``head_probs`` and BatchNorm (``bn_3x3`` or ``bn_1x1``: scale, bias,
    running mean and variance): the unfolded model's variables (``folded=False``); with ``folded`` they go
    through :func:`fold_variables` (``alpha`` must be the supernet's). Nothing of the unused branch or the
    gate logits is kept.
    """
    validate_architecture(arch)
    sp, sb = supernet_variables["params"], supernet_variables.get("batch_stats", {})
    params: dict[str, Any] = {k: sp[k] for k in ("patch_embed", "cls_token", "pos_embed", "norm", "head")}
    stats: dict[str, Any] = {}
    for i, block in enumerate(arch["blocks"]):
        name, kind = f"block{i}", block["attention"]
        src = sp[name]
        out: dict[str, Any] = gather_ffn(src, block["ffn_units"])
        a = src["attn"]
        if kind != "skip":
            out["norm1"] = src["norm1"]
        if kind == "msa":
            out["attn"] = {k: a[k] for k in ("qk", "v", "proj")}
        elif kind in CONV_KINDS:
            bn = f"bn_{kind}"
            out["attn"] = {k: a[k] for k in ("v", "proj", "head_probs", bn)}
            stats[name] = {"attn": {bn: sb[name]["attn"][bn]}}
        params[name] = out
    unfolded = {"params": params, "batch_stats": stats}
    return fold_variables(unfolded, arch, alpha) if folded else unfolded


def gather_ffn(block_params: Mapping[str, Any], units: Sequence[int]) -> dict[str, Any]:
    """``fc1`` and ``fc2`` of a block at the kept hidden ``units``: fc1's kernel columns and bias entries,
    fc2's kernel rows, fc2's bias whole (ziplab/SPViT ``SPViT_DeiT/utils.py``, the
    ``assigned_indicator_index`` gather of ``fc1.weight`` rows, ``fc1.bias`` and ``fc2.weight`` columns in
    PyTorch's (out, in) layout), with ``norm2``; no unit kept: ``fc2``'s bias alone (:class:`FFNBias`)."""
    u = np.asarray(units, dtype=np.int32)
    fc1, fc2 = block_params["fc1"], block_params["fc2"]
    if not len(u):
        return {"fc2": {"bias": fc2["bias"]}}
    return {"norm2": block_params["norm2"],
            "fc1": {"kernel": jnp.take(fc1["kernel"], u, axis=1), "bias": jnp.take(fc1["bias"], u, axis=0)},
            "fc2": {"kernel": jnp.take(fc2["kernel"], u, axis=0), "bias": fc2["bias"]}}


def compact_from_dense(dense_params: Mapping[str, Any], arch: Mapping[str, Any],
                       fresh_variables: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """SPViT's fine-tuning initialisation: the unfolded :class:`CompactViT` of ``arch`` started from a dense
    DeiT's params (:class:`~alite_jax.models.vit.VisionTransformer`'s ``params`` collection).

    SPViT fine-tunes the found architecture from the pretrained DeiT, not from the supernet, with fresh
    ``head_probs`` and BatchNorms (docs/spvit_single_path.md). Taken from
    the dense model: ``patch_embed``, ``cls_token``, ``pos_embed``, ``norm``, each block's ``norm2`` and
    (unless skipped) ``norm1``, an MSA block's ``qk``, ``v``, ``proj``, a conv block's ``v`` and ``proj``,
    and ``fc1`` / ``fc2`` gathered at the kept units (:func:`gather_ffn`); ``head`` only when its shapes
    match (a fine-tune on another number of classes keeps the fresh head). Everything else (``head_probs``,
    the BatchNorms' params and ``batch_stats``) is ``fresh_variables``' (``CompactViT.from_architecture(
    arch, folded=False).init(...)``).

    Returns ``(variables, taken_paths)``: the paths ("block0/fc1/kernel", ...) of the params taken from
    the dense model, sorted. ValueError for a tree that does not fit (a missing block, a shape other than
    the compact model's, folded ``fresh_variables``).
    """
    validate_architecture(arch)
    if "params" in dense_params and "patch_embed" not in dense_params:
        raise ValueError("dense_params must be the dense model's params collection (variables['params'])")
    fresh = traverse_util.flatten_dict(dict(fresh_variables["params"]), sep="/")
    depth = arch["depth"]
    dense_blocks = sum(1 for k in dense_params if k.startswith("block"))
    if dense_blocks != depth or any(f"block{i}" not in dense_params for i in range(depth)):
        raise ValueError(f"the architecture has {depth} blocks but the dense params have {dense_blocks}")
    source: dict[str, Any] = {k: dense_params[k] for k in ("patch_embed", "cls_token", "pos_embed", "norm")}
    for i, block in enumerate(arch["blocks"]):
        name, kind, src = f"block{i}", block["attention"], dense_params[f"block{i}"]
        hidden = int(np.shape(src["fc1"]["kernel"])[1])
        if hidden != arch["mlp_hidden"]:
            raise ValueError(f"{name}: the dense FFN has {hidden} hidden units, the architecture "
                             f"{arch['mlp_hidden']}")
        out: dict[str, Any] = gather_ffn(src, block["ffn_units"])
        if kind != "skip":
            out["norm1"] = src["norm1"]
        if kind == "msa":
            out["attn"] = {k: src["attn"][k] for k in ("qk", "v", "proj")}
        elif kind in CONV_KINDS:
            if f"{name}/attn/head_probs" not in fresh:
                raise ValueError(f"{name}: fresh_variables must be the UNFOLDED CompactViT's (folded=False): "
                                 f"a conv block keeps v, proj and head_probs")
            out["attn"] = {k: src["attn"][k] for k in ("v", "proj")}
        source[name] = out
    source = traverse_util.flatten_dict(source, sep="/")
    head = traverse_util.flatten_dict({"head": dense_params["head"]}, sep="/")
    if all(k in fresh and np.shape(v) == np.shape(fresh[k]) for k, v in head.items()):
        source.update(head)
    for path, value in source.items():
        if path not in fresh:
            raise ValueError(f"{path} is not a parameter of the compact model (do fresh_variables "
                             f"fit arch?)")
        if np.shape(value) != np.shape(fresh[path]):
            raise ValueError(f"{path}: the dense model's shape {np.shape(value)} is not the compact "
                             f"model's {np.shape(fresh[path])}")
    taken = {k: jnp.asarray(v) for k, v in source.items()}
    params = traverse_util.unflatten_dict({**fresh, **taken}, sep="/")
    variables = {"params": params, "batch_stats": fresh_variables.get("batch_stats", {})}
    return variables, tuple(sorted(source))


def supernet_gates(arch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(msa_gates (depth, 3), ffn_gates (depth, mlp_hidden))`` that make a supernet run ``arch``: the
    overrides of :class:`~alite_jax.models.spvit.SupernetViT`'s ``__call__``."""
    settings = {"skip": "skip", "1x1": "conv1x1", "3x3": "conv3x3", "msa": "msa"}
    msa = jnp.asarray([spvit.MSA_SETTINGS[settings[b["attention"]]] for b in arch["blocks"]], jnp.float32)
    ffn = np.zeros((arch["depth"], arch["mlp_hidden"]), np.float32)
    for i, b in enumerate(arch["blocks"]):
        ffn[i, np.asarray(b["ffn_units"], np.int64)] = 1.0  # an empty list indexes nothing
    return msa, jnp.asarray(ffn)


__all__: Sequence[str] = (
    "ARCH_FORMAT", "ATTENTION_TYPES", "extract_architecture", "validate_architecture", "save_architecture",
    "load_architecture", "arch_blocks", "arch_cost_kwargs", "ConvAttention", "FFNBias", "LinearParams",
    "UnfoldedConvAttention", "CompactBlock", "CompactViT", "CONV_KINDS", "fold_conv_attention",
    "fold_variables", "compact_variables", "gather_ffn", "compact_from_dense", "count_params",
    "supernet_gates")
