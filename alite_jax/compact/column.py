"""The compact inference form of a column-pruned ResNet / SA-ResNet: pruned im2col rows dropped physically.

A column-pruned student (``sparsity.structure="column"``) is a dense model whose kernels hold zero rows:
a column is one (kh, kw, C_in) slice of a kernel across all C_out filters, i.e. one row of the im2col
reduction. The masked model still multiplies by those zeros. :func:`compact_student` turns the masked
variables into a smaller network that skips them, and :class:`CompactResNet` runs it:

* 1x1 convolutions, attention projections (query/key/value) and the head: the kept input channels are
  gathered (``jnp.take`` on the channel axis) and multiplied by the kernel's kept rows only.
* k x k convolutions (the hybrid stem, the teacher's spatial conv): per tap (kh, kw), the kept input
  channels of that tap; ``kxk="gather"`` concatenates the gathered taps into one im2col slab and runs one
  GEMM, ``kxk="taps"`` runs one matmul per tap and sums, ``kxk="conv"`` scatters the kept rows into a
  dense kernel and runs XLA's convolution (benchmarks/compaction.py measures the three).
* Whole channels, where every consumer has pruned them:
  - a bottleneck's conv1 output channel c (its kernel column and its BN entry) when the spatial layer
    reads no row of c: the attention's query, key and value all pruned row c, or the spatial conv pruned
    (kh, kw, c) at every tap;
  - the spatial conv's output channel c (teacher only) when conv3 pruned row c;
  - the conv stem's output channel c when both consumers of the stem, stage1_block1's conv1 and its
    projection shortcut, pruned row c (the max-pool of the ImageNet layout acts per channel).
* Not dropped, on purpose: the residual stream's channels (each block's output reaches every later
  block of its stage through identity shortcuts, the next stage and the head; a channel could go only
  if all of them pruned it, which random or learned masks at d = 0.5 practically never do); the
  attention's output channels (the value projection's columns: heads must keep equal widths for the
  q.k products, and every implementation takes (B, H, W, N, d) tensors); the attention stem's output.
* BatchNorm is folded for inference: into the preceding conv's kernel columns and a bias, and after an
  attention layer into its value projection (scale on the columns, shift as a bias). That is exact in
  real arithmetic because each output pixel is a convex combination of values (the softmax over the
  in-image neighbours sums to 1) and the 2x2 average pooling of a strided layer is one too.

Pruning is read from the values: a row is dropped when all its weights are zero, so the function takes
the masked variables as exported (``model/`` of a sparse run, zeros included) and needs no masks. The
result equals the masked model up to float32 rounding (tests/test_compaction.py holds the logits to
1e-5 relative to the largest logit, absolute below 1; docs/compaction.md). The compact model computes
in float32 whatever the student's compute dtype was.

Compact parameters are a plain nested dict of arrays; a layer is ``{"idx": int32 (k,), "kernel":
(k, C_out), "bias": (C_out,)}`` (a k x k conv: ``{"taps": {"t<i>_<j>": {"idx", "kernel"}}, "bias"}``), so
``jax.jit(lambda x: model.apply(params, x))`` can be exported with ``jax.export``. :class:`CompactResNet`
and its layer functions are not Linen modules but pure functions of that format, so they live beside the
code that writes it. A finished run's compact model and its counts:
:func:`alite_jax.export.compactors.compact_run`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.compact.tree import flatten, unflatten
from alite_jax.models.local_attention import IMPLS, attention_scales
from alite_jax.models.local_attention.layer import rel_tables
from alite_jax.models.resnet import (ResNet, attention_spatial, attention_stem, check_image_size,
                                     conv_spatial)

Params = dict[str, Any]

KXK_METHODS = ("gather", "taps", "conv")
SPATIAL_KINDS = ("attention", "conv")
BN_EPSILON = 1e-5  # the ResNets' BatchNorm epsilon (alite_jax.models.resnet)
ARTIFACT_FORMAT = "alite_jax.compact_resnet/1"


# --------------------------------------------------------------------------------------------------
# The compact layers: pure functions of a parameter dict and an NHWC activation.
# --------------------------------------------------------------------------------------------------


def dense_apply(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """A 1x1 conv / dense layer over the kept input channels: ``x[..., idx] @ kernel (+ bias)``.

    ``idx`` is sorted and unique, so when it is as long as the channel axis it is the identity and the
    gather is skipped (a static decision: shapes only)."""
    idx, kernel = p["idx"], p["kernel"]
    chex.assert_rank(idx, 1)
    if idx.shape[0] != x.shape[-1]:
        x = jnp.take(x, idx, axis=-1)
    y = jnp.matmul(x, kernel)
    return y + p["bias"] if "bias" in p else y


def conv_apply(p: Mapping[str, Any], x: jax.Array, kernel_size: int, stride: int, padding: int,
               method: str = "gather") -> jax.Array:
    """A k x k convolution over the kept (tap, channel) rows (symmetric zero padding, ``stride``).

    ``p["taps"]`` maps ``"t<i>_<j>"`` to the kept channels of tap (i, j) and their kernel rows (a tap
    with no kept row is absent); ``method`` "gather" concatenates the gathered taps and runs one GEMM,
    "taps" runs one matmul per tap, "conv" scatters the kept rows back into a (k, k, C_in, C_out) kernel
    (zeros elsewhere) and runs XLA's convolution (the storage stays compact)."""
    if method not in KXK_METHODS:
        raise ValueError(f"unknown k x k method {method!r}; choose one of {KXK_METHODS}")
    b, h, w, _ = x.shape
    out_h = (h + 2 * padding - kernel_size) // stride + 1
    out_w = (w + 2 * padding - kernel_size) // stride + 1
    if method == "conv":
        kernel = jnp.zeros((kernel_size, kernel_size, x.shape[-1], p["bias"].shape[0]), x.dtype)
        for name, tap in p["taps"].items():
            i, j = (int(v) for v in name[1:].split("_"))
            kernel = kernel.at[i, j, tap["idx"]].set(tap["kernel"])
        y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["bias"]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    parts, kernels = [], []
    for name in sorted(p["taps"]):
        i, j = (int(v) for v in name[1:].split("_"))
        tap = p["taps"][name]
        window = xp[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
        parts.append(jnp.take(window, tap["idx"], axis=-1) if tap["idx"].shape[0] != x.shape[-1]
                     else window)
        kernels.append(tap["kernel"])
    bias = p["bias"]
    if not parts:
        return jnp.broadcast_to(bias, (b, out_h, out_w, bias.shape[0]))
    if method == "gather":
        y = jnp.matmul(jnp.concatenate(parts, axis=-1), jnp.concatenate(kernels, axis=0))
    else:
        y = functools.reduce(jnp.add, [jnp.matmul(part, k) for part, k in zip(parts, kernels)])
    return y + bias


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The LocalSelfAttention options a compact attention layer runs with (static)."""

    num_heads: int = 8
    kernel_size: int = 7
    scaling: str = "paper"
    rel_layout: str = "per_head"
    impl: str = "auto"


def attention_apply(p: Mapping[str, Any], x: jax.Array, options: AttentionOptions,
                    stride: int = 1) -> jax.Array:
    """A compact local self-attention layer: compact q/k/v projections (the value one carrying the
    folded BatchNorm), then the same neighbourhood computation as :class:`LocalSelfAttention`."""
    b, h, w, _ = x.shape
    c, n = p["query"]["kernel"].shape[-1], options.num_heads
    q = dense_apply(p["query"], x).reshape(b, h, w, n, c // n)
    k = dense_apply(p["key"], x).reshape(b, h, w, n, c // n)
    v = dense_apply(p["value"], x).reshape(b, h, w, n, c // n)
    rows, cols = rel_tables(p["rel_rows"], p["rel_cols"], n, options.rel_layout)
    qk_scale, qr_scale = attention_scales(options.scaling, c, n)
    y = IMPLS[options.impl](q, k, v, rows, cols, kernel_size=options.kernel_size, qk_scale=qk_scale,
                            qr_scale=qr_scale).reshape(b, h, w, c)
    if stride > 1:
        y = nn.avg_pool(y, (stride, stride), strides=(stride, stride))
    return y


# --------------------------------------------------------------------------------------------------
# The compact model.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompactResNet:
    """The compact inference network of a (pruned) ResNet / SA-ResNet; all fields are static.

    ``apply(params, images) -> logits`` is a pure, jittable function of the compact parameters
    (:func:`compact_student`) and NHWC images.

    Attributes:
      stage_sizes: blocks per stage, as the student's.
      num_classes: classifier outputs.
      layout: "cifar" or "imagenet" (the stem and the image sizes taken, as the student's).
      stem: "conv" (hybrid students, the teacher) or "attention" (homogeneous students).
      spatial: "attention" (students) or "conv" (the teacher's 3x3 conv).
      attention: the attention layers' options.
      kxk: "gather" or "taps", how k x k convolutions run (:func:`conv_apply`).
    """

    stage_sizes: tuple[int, ...]
    num_classes: int
    layout: str = "cifar"
    stem: str = "conv"
    spatial: str = "attention"
    attention: AttentionOptions = AttentionOptions()
    kxk: str = "gather"

    def stem_apply(self, params: Params, images: jax.Array) -> jax.Array:
        """Stem (conv or attention, BatchNorm folded), ReLU, and the ImageNet layout's max-pool."""
        if self.stem == "attention":
            x = attention_apply(params["stem"], images, self.attention)
        elif self.layout == "imagenet":
            x = conv_apply(params["stem"], images, 7, 2, 3, self.kxk)
        else:
            x = conv_apply(params["stem"], images, 3, 1, 1, self.kxk)
        x = nn.relu(x)
        if self.layout == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x

    def block_apply(self, p: Params, x: jax.Array, stride: int) -> jax.Array:
        """One bottleneck: conv1, spatial layer, conv3 (BatchNorms folded), shortcut, ReLU."""
        y = nn.relu(dense_apply(p["conv1"], x))
        if self.spatial == "attention":
            y = attention_apply(p["attention"], y, self.attention, stride)
        else:
            y = conv_apply(p["conv2"], y, 3, stride, 1, self.kxk)
        y = dense_apply(p["conv3"], nn.relu(y))
        if "proj" in p:
            x = dense_apply(p["proj"], x[:, ::stride, ::stride])
        return nn.relu(y + x)

    def apply(self, params: Params, images: jax.Array) -> jax.Array:
        """Logits (B, num_classes) of NHWC float images."""
        chex.assert_rank(images, 4)
        check_image_size(images.shape[1], images.shape[2], self.layout)
        x = self.stem_apply(params, images.astype(jnp.float32))
        for s, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                stride = 2 if s > 0 and i == 0 else 1
                x = self.block_apply(params[f"stage{s + 1}_block{i + 1}"], x, stride)
        logits = dense_apply(params["head"], jnp.mean(x, axis=(1, 2)))
        chex.assert_shape(logits, (images.shape[0], self.num_classes))
        return logits

    def to_json(self) -> str:
        """The fields as JSON (stored with the parameters by :func:`save_compact`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CompactResNet":
        """The model :meth:`to_json` wrote."""
        fields = json.loads(text)
        fields["stage_sizes"] = tuple(fields["stage_sizes"])
        fields["attention"] = AttentionOptions(**fields["attention"])
        return cls(**fields)


# --------------------------------------------------------------------------------------------------
# Masked variables -> compact parameters.
# --------------------------------------------------------------------------------------------------


def used_rows(kernel: np.ndarray) -> np.ndarray:
    """Bool (rows,) of a kernel seen as (kh*kw*C_in, C_out): which im2col rows hold a non-zero."""
    kernel = np.asarray(kernel)
    return np.any(kernel.reshape(-1, kernel.shape[-1]) != 0, axis=1)


def fold_bn(bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with BatchNorm(y) = a * y + b in inference (running statistics), computed in float64."""
    scale = np.asarray(bn_params["scale"], np.float64)
    a = scale / np.sqrt(np.asarray(bn_stats["var"], np.float64) + BN_EPSILON)
    b = np.asarray(bn_params["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * a
    return a, b


def positions(kept: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where the channels ``rows`` sit among the ``kept`` channels a compact producer outputs."""
    pos = np.searchsorted(kept, rows)
    if rows.size and (pos.max() >= kept.size or np.any(kept[np.minimum(pos, kept.size - 1)] != rows)):
        raise AssertionError("a consumer reads a channel its producer dropped")
    return pos.astype(np.int32)


def f32(x: np.ndarray) -> jax.Array:
    """A float64 host array as a float32 JAX array."""
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def compact_dense(kernel: Any, in_kept: np.ndarray | None = None, out_kept: np.ndarray | None = None,
                  fold: tuple[np.ndarray, np.ndarray] | None = None, bias: Any = None) -> Params:
    """A 1x1 conv or dense kernel (..., C_in, C_out) -> ``{"idx", "kernel", ["bias"]}``: its rows with a
    non-zero, indexed into the producer's ``in_kept`` channels (None: all), its ``out_kept`` columns
    (None: all), with ``fold`` = (a, b) of a following BatchNorm multiplied in."""
    k = np.asarray(kernel, np.float64)
    k = k.reshape(-1, k.shape[-1])
    rows = np.flatnonzero(np.any(k != 0, axis=1))
    out = np.arange(k.shape[1]) if out_kept is None else out_kept
    w = k[rows][:, out]
    b = None if bias is None else np.asarray(bias, np.float64)[out]
    if fold is not None:
        a, shift = fold[0][out], fold[1][out]
        w = w * a
        b = shift if b is None else b * a + shift
    p = {"idx": jnp.asarray(rows if in_kept is None else positions(in_kept, rows), jnp.int32),
         "kernel": f32(w)}
    if b is not None:
        p["bias"] = f32(b)
    return p


def compact_conv(kernel: Any, fold: tuple[np.ndarray, np.ndarray], in_kept: np.ndarray | None = None,
                 out_kept: np.ndarray | None = None) -> Params:
    """A k x k conv kernel (kh, kw, C_in, C_out) and its BatchNorm -> ``{"taps", "bias"}`` (see
    :func:`conv_apply`), keeping per tap the channels with a non-zero row."""
    k = np.asarray(kernel, np.float64)
    out = np.arange(k.shape[-1]) if out_kept is None else out_kept
    a, shift = fold[0][out], fold[1][out]
    taps = {}
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            rows = np.flatnonzero(np.any(k[i, j] != 0, axis=1))
            if rows.size:
                idx = rows if in_kept is None else positions(in_kept, rows)
                taps[f"t{i}_{j}"] = {"idx": jnp.asarray(idx, jnp.int32),
                                     "kernel": f32(k[i, j][rows][:, out] * a)}
    return {"taps": taps, "bias": f32(shift)}


def compact_attention(p: Mapping[str, Any], fold: tuple[np.ndarray, np.ndarray],
                      in_kept: np.ndarray | None = None) -> Params:
    """A LocalSelfAttention's params and the BatchNorm after it -> compact q/k/v (value with the BN)."""
    return {"query": compact_dense(p["query"]["kernel"], in_kept),
            "key": compact_dense(p["key"]["kernel"], in_kept),
            "value": compact_dense(p["value"]["kernel"], in_kept, fold=fold),
            "rel_rows": f32(p["rel_rows"]), "rel_cols": f32(p["rel_cols"])}


def architecture(model: ResNet) -> tuple[str, str, AttentionOptions]:
    """(stem kind, spatial kind, attention options) of a zoo ResNet; ValueError for other models."""
    if not isinstance(model, ResNet):
        raise ValueError(f"compaction takes the zoo's ResNets (the SA-ResNet students and the ResNet "
                         f"teacher), not {type(model).__name__}")
    spatial = getattr(model.spatial, "func", model.spatial)
    stem = None if model.stem is None else getattr(model.stem, "func", model.stem)
    if stem not in (None, attention_stem) or spatial not in (attention_spatial, conv_spatial):
        raise ValueError("compaction knows the zoo's stems and spatial layers only (conv or local "
                         "self-attention)")
    options: dict[str, Any] = {}
    for factory in (model.spatial, model.stem):
        options.update(getattr(factory, "keywords", None) or {})
    known = {f.name for f in dataclasses.fields(AttentionOptions)}
    attention = AttentionOptions(**{k: v for k, v in options.items() if k in known})
    return ("conv" if stem is None else "attention",
            "attention" if spatial is attention_spatial else "conv", attention)


def compact_student(model: ResNet, variables: Mapping[str, Any],
                    kxk: str = "gather") -> tuple[CompactResNet, Params]:
    """The compact network of a masked ResNet / SA-ResNet and its compact parameters.

    Args:
      model: the zoo's ResNet (SA-ResNet students, hybrid or homogeneous, or the teacher), either layout.
      variables: its ``{"params", "batch_stats"}`` with zeros where pruned (a column-pruned kernel's
        pruned rows are zero); nothing else is assumed of the zeros, so any kernel row that is zero
        is dropped and irregular masks compact too (with little to gain).
      kxk: how the k x k convolutions run, "gather" or "taps" (:func:`conv_apply`).
    Returns:
      ``(compact_model, params)``: ``compact_model.apply(params, images)`` equals the masked model's
      logits up to float32 rounding.
    """
    if kxk not in KXK_METHODS:
        raise ValueError(f"unknown k x k method {kxk!r}; choose one of {KXK_METHODS}")
    stem_kind, spatial_kind, options = architecture(model)
    params, stats = variables["params"], variables["batch_stats"]
    params = jax.tree.map(np.asarray, dict(params))
    stats = jax.tree.map(np.asarray, dict(stats))
    out: Params = {}
    first = params["stage1_block1"]
    # The stem's output channels that its two consumers (stage1_block1's conv1 and projection) read.
    if stem_kind == "conv":
        stem_kept = np.flatnonzero(used_rows(first["conv1"]["kernel"])
                                   | used_rows(first["proj_conv"]["kernel"]))
        out["stem"] = compact_conv(params["stem_conv"]["kernel"],
                                   fold_bn(params["stem_bn"], stats["stem_bn"]), out_kept=stem_kept)
    else:
        stem_kept = None
        out["stem"] = compact_attention(params["stem_attention"],
                                        fold_bn(params["stem_bn"], stats["stem_bn"]))
    for s, blocks in enumerate(model.stage_sizes):
        for i in range(blocks):
            name = f"stage{s + 1}_block{i + 1}"
            p, st = params[name], stats[name]
            in_kept = stem_kept if (s, i) == (0, 0) else None
            if spatial_kind == "attention":
                a = p["attention"]
                mid_kept = np.flatnonzero(used_rows(a["query"]["kernel"]) | used_rows(a["key"]["kernel"])
                                          | used_rows(a["value"]["kernel"]))
                spatial_out = None
                block = {"attention": compact_attention(a, fold_bn(p["bn2"], st["bn2"]), mid_kept)}
            else:
                k2 = p["conv2"]["kernel"]
                mid_kept = np.flatnonzero(np.any(np.asarray(k2) != 0, axis=(0, 1, 3)))
                spatial_out = np.flatnonzero(used_rows(p["conv3"]["kernel"]))
                block = {"conv2": compact_conv(k2, fold_bn(p["bn2"], st["bn2"]), mid_kept, spatial_out)}
            block["conv1"] = compact_dense(p["conv1"]["kernel"], in_kept, mid_kept,
                                           fold_bn(p["bn1"], st["bn1"]))
            block["conv3"] = compact_dense(p["conv3"]["kernel"], spatial_out,
                                           fold=fold_bn(p["bn3"], st["bn3"]))
            if "proj_conv" in p:
                block["proj"] = compact_dense(p["proj_conv"]["kernel"], in_kept,
                                              fold=fold_bn(p["proj_bn"], st["proj_bn"]))
            out[name] = block
    out["head"] = compact_dense(params["head"]["kernel"], bias=params["head"]["bias"])
    model_c = CompactResNet(tuple(model.stage_sizes), int(params["head"]["kernel"].shape[-1]),
                            layout=model.layout, stem=stem_kind, spatial=spatial_kind, attention=options,
                            kxk=kxk)
    return model_c, out


# --------------------------------------------------------------------------------------------------
# Sizes and the artifact on disk.
# --------------------------------------------------------------------------------------------------


def count_values(tree: Any) -> tuple[int, int]:
    """(float values, integer indices) in a parameter tree."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    floats = sum(x.size for x in leaves if np.issubdtype(x.dtype, np.floating))
    return floats, sum(x.size for x in leaves if np.issubdtype(x.dtype, np.integer))


def save_compact(path: str, model: CompactResNet, params: Params) -> int:
    """Writes the compact model and parameters to one .npz file (uncompressed); returns its bytes."""
    flat = flatten(params)
    if "__model__" in flat:
        raise ValueError("a parameter may not be called __model__")
    with open(path, "wb") as f:
        np.savez(f, __model__=np.array(model.to_json()), __format__=np.array(ARTIFACT_FORMAT), **flat)
    return os.path.getsize(path)


def load_compact(path: str) -> tuple[CompactResNet, Params]:
    """(model, params) that :func:`save_compact` wrote."""
    with np.load(path, allow_pickle=False) as data:
        if "__format__" not in data or str(data["__format__"]) != ARTIFACT_FORMAT:
            raise ValueError(f"{path} is not a compact model saved by alite_jax.compact.column.save_compact "
                             f"(format {ARTIFACT_FORMAT})")
        model = CompactResNet.from_json(str(data["__model__"]))
        flat = {k: jnp.asarray(data[k]) for k in data.files if k not in ("__model__", "__format__")}
    return model, unflatten(flat)


def channels_dropped(model: ResNet, variables: Mapping[str, Any], params: Params) -> int:
    """Whole channels the compaction removed: the stem's and every bottleneck's conv1 and conv2 outputs
    (each BN entry folded away with its channel)."""
    dense = variables["params"]
    dropped = 0
    if "stem_conv" in dense:
        kept = params["stem"]["bias"].shape[0]
        dropped += dense["stem_conv"]["kernel"].shape[-1] - kept
    for name, block in params.items():
        if name.startswith("stage"):
            dropped += dense[name]["conv1"]["kernel"].shape[-1] - block["conv1"]["kernel"].shape[-1]
            if "conv2" in block:
                dropped += dense[name]["conv2"]["kernel"].shape[-1] - block["conv2"]["bias"].shape[0]
    return int(dropped)
