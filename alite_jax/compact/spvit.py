"""An SPViT search's found architecture as data, and the compact model's variables.

* :func:`extract_architecture`: a :class:`~alite_jax.models.spvit.SupernetViT`'s params -> the found
  architecture as JSON-able data, thresholding the gates as the supernet does in evaluation
  (g = 1[sigmoid(theta) > 0.5], i = cumprod(g)); :func:`save_architecture` / :func:`load_architecture`;
  :func:`supernet_gates`, the gates that make a supernet run it.
* :func:`compact_variables`: the supernet's variables -> those of
  :class:`~alite_jax.models.spvit_compact.CompactViT`, the architecture as a plain network, unfolded (a
  copy of the branch's weights) or folded, and the kept FFN units gathered (:func:`gather_ffn`;
  ziplab/SPViT ``SPViT_DeiT/utils.py``, the ``assigned_indicator_index`` gather).
* :func:`fold_variables`: the unfolded compact model's variables (SPViT's fine-tuning form) -> the folded
  one's, for inference: A = softmax(head_probs / alpha) folded into the conv kernels, biases and
  projections (:func:`fold_conv_attention`, i.e. :func:`~alite_jax.models.spvit.conv_branch_weights`).
* :func:`compact_from_dense`: SPViT's fine-tuning initialisation, the unfolded model started from a dense
  DeiT's weights with fresh ``head_probs`` and BatchNorms.

With either form's variables the compact model computes what the supernet computes in evaluation mode,
block by block (tests/test_spvit_extract.py, tests/test_spvit_finetune.py; docs/spvit_single_path.md
"Extraction and the compact model"). The Linen modules are in :mod:`alite_jax.models.spvit_compact`; this
module builds none. The architecture's format (:func:`~alite_jax.models.spvit_compact.validate_architecture`,
:func:`~alite_jax.models.spvit_compact.arch_blocks`) is the models', which are built from it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.compact.tree import flatten, unflatten
from alite_jax.models import spvit
from alite_jax.models.spvit_compact import ARCH_FORMAT, ATTENTION_TYPES, CONV_KINDS, validate_architecture

ARCHITECTURE = "architecture.json"  # the file an SPViT run keeps its model's architecture in

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


# ---- Variables: the supernet's or a dense DeiT's -> the compact model's ------------------------------

def fold_conv_attention(attn: Mapping[str, Any], kind: str,
                        alpha: float = spvit.HEAD_PROBS_ALPHA) -> dict[str, Any]:
    """An unfolded conv slot's params (``v``, ``proj``, ``head_probs``, ``bn_{kind}``, as the supernet's
    ``attn``) -> the folded :class:`~alite_jax.models.spvit_compact.ConvAttention`'s (``conv_{kind}``,
    ``bn_{kind}``, ``proj``).

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
    """The unfolded :class:`~alite_jax.models.spvit_compact.CompactViT`'s variables (``folded=False``) ->
    the folded one's, for inference.

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
    """The :class:`~alite_jax.models.spvit_compact.CompactViT` variables of ``arch`` from the supernet's
    ``{"params", "batch_stats"}``.

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
    PyTorch's (out, in) layout), with ``norm2``; no unit kept: ``fc2``'s bias alone
    (:class:`~alite_jax.models.spvit_compact.FFNBias`)."""
    u = np.asarray(units, dtype=np.int32)
    fc1, fc2 = block_params["fc1"], block_params["fc2"]
    if not len(u):
        return {"fc2": {"bias": fc2["bias"]}}
    return {"norm2": block_params["norm2"],
            "fc1": {"kernel": jnp.take(fc1["kernel"], u, axis=1), "bias": jnp.take(fc1["bias"], u, axis=0)},
            "fc2": {"kernel": jnp.take(fc2["kernel"], u, axis=0), "bias": fc2["bias"]}}


def compact_from_dense(dense_params: Mapping[str, Any], arch: Mapping[str, Any],
                       fresh_variables: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """SPViT's fine-tuning initialisation: the unfolded :class:`~alite_jax.models.spvit_compact.CompactViT`
    of ``arch`` started from a dense DeiT's params (:class:`~alite_jax.models.vit.VisionTransformer`'s
    ``params`` collection).

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
    fresh = flatten(fresh_variables["params"])
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
    source = flatten(source)
    head = flatten({"head": dense_params["head"]})
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
    params = unflatten({**fresh, **taken})
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
    "ARCHITECTURE", "extract_architecture", "save_architecture", "load_architecture", "fold_conv_attention",
    "fold_variables", "compact_variables", "gather_ffn", "compact_from_dense", "supernet_gates")
