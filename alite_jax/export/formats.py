"""Writes an inference function (:mod:`alite_jax.export.inference`) as a deployable artifact.

Formats (docs/export.md says how to load each in a few lines):

* ``stablehlo``: ``model.jax_export``, a serialized :func:`jax.export.export` of the function with the
  variables baked in as constants; plain JAX (no alite_jax, no flax) deserializes and calls it. The
  batch dimension is symbolic unless a batch size is given.
* ``tflite``: ``model.tflite`` for LiteRT, through :mod:`jax.experimental.jax2tf` (graph serialization:
  TFLite's converter cannot read the XlaCallModule op of native serialization) and
  ``tf.lite.TFLiteConverter``. Built-in TFLite ops only when possible; otherwise the ops that need
  ``SELECT_TF_OPS`` (the Flex delegate) are named in the metadata, with the layers that use them, or
  the export is refused with that list when Select TF ops are not allowed.
* ``onnx``: refused, with the reason (:data:`UNSUPPORTED`): no maintained converter handles these models
  with the packages alite_jax needs (docs/export.md has the measurements).

Every artifact directory also holds ``metadata.json`` (input shape, dtype and range, the folded
normalisation, logits count, source run, what the conversion needed). The directory is written next to
its destination and renamed into place, so a failed or killed export leaves the previous one whole.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Callable

import jax
import numpy as np

from alite_jax.errors import UserError
from alite_jax.compact import sparse_store
from alite_jax.compact.tree import flatten, unflatten

FORMATS = ("stablehlo", "tflite", "onnx")
FILES = {"stablehlo": "model.jax_export", "tflite": "model.tflite"}
WEIGHTS_FILE = "weights.jax_export"  # stablehlo with sparse_weights: the program that returns the weights
METADATA = "metadata.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")
# Optional packages each format needs beyond alite_jax's own (tensorflow-cpu, which tflite uses, is one of
# those): (module, pip package). None at present; a format that gains one names it here.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {}
# Formats the CLI knows but refuses, and why (measured with tf2onnx 1.17.0, jax2onnx 0.17.1, onnx 1.23.2).
UNSUPPORTED = {"onnx": (
    "no maintained JAX-to-ONNX converter handles these models here: tf2onnx 1.17 (from jax2tf's graph) "
    "fails on every model with onnx 1.23 ('Could not infer the attribute type'), and jax2onnx 0.17 "
    "requires orbax-checkpoint < 0.11.37 (alite_jax needs 0.12) and, installed beside it, converts the "
    "DeiT but not the ResNet's convolutions (NCHW and NHWC shapes mixed up: ONNX Runtime rejects the "
    "graph) nor the SA-ResNet's average pooling (an error in its plugin); export stablehlo or tflite")}


class ExportError(UserError):
    """A format cannot represent the model (the message names the layers and ops), or a package it
    needs is missing (the message names the pip command)."""


def check_format(fmt: str, sparse_weights: bool | None = None) -> None:
    """Raises :class:`ExportError` for an unknown format, a missing optional package or sparse weights
    asked of a format that cannot store them, before any work."""
    if sparse_weights and fmt != "stablehlo":
        raise ExportError(f"--format={fmt} stores the weights as constants of its graph, dense: sparse "
                          f"weights are for --format=stablehlo")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in UNSUPPORTED:
        raise ExportError(f"--format={fmt} is not supported: {UNSUPPORTED[fmt]}")
    missing = [pip for module, pip in NEEDS.get(fmt, ()) if importlib.util.find_spec(module) is None]
    if missing:
        raise ExportError(f"--format={fmt} needs {', '.join(missing)}, which is not installed here: "
                          f"pip install {' '.join(missing)}")


def _closed(fn: Callable, variables: Any) -> Callable:
    return lambda images: fn(variables, images)


def input_shape(meta: dict[str, Any], batch: int | None) -> list[int | None]:
    """The artifact's input shape: (batch or None for any, H, W, C)."""
    return [batch] + list(meta["input"]["shape"][1:])


# --------------------------------------------------------------------------------------------------
# StableHLO (jax.export)
# --------------------------------------------------------------------------------------------------


def stablehlo_bytes(fn: Callable, variables: Any, meta: dict[str, Any], batch: int | None = None,
                    platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> tuple[bytes, dict[str, Any]]:
    """(serialized jax.export artifact, what to add to the metadata). ``batch`` None: symbolic."""
    exported = jax.export.export(jax.jit(_closed(fn, variables)),
                                 platforms=platforms)(image_spec(meta, batch))
    return bytes(exported.serialize()), stablehlo_info(exported)


def image_spec(meta: dict[str, Any], batch: int | None) -> jax.ShapeDtypeStruct:
    """The images argument: (batch, H, W, C) float32, the batch symbolic when ``batch`` is None."""
    shape = input_shape(meta, batch)
    if batch is None:
        shape[0] = jax.export.symbolic_shape("batch")[0]
    return jax.ShapeDtypeStruct(tuple(shape), np.float32)


def stablehlo_info(exported: Any) -> dict[str, Any]:
    return {"platforms": list(exported.platforms), "calling_convention_version":
            exported.calling_convention_version, "jax_version": jax.__version__}


def stablehlo_sparse_bytes(fn: Callable, variables: Any, meta: dict[str, Any], batch: int | None = None,
                           platforms: tuple[str, ...] = DEFAULT_PLATFORMS
                           ) -> tuple[bytes, bytes, dict[str, Any]]:
    """(model program, weights program, what to add to the metadata) for an irregularly pruned model.

    Weights baked into one program as constants are stored dense, zeros and all. Here the model program
    takes the weights as its first argument (``model.call(weights, images)``), and a second program with
    no arguments returns them (``weights = weights_program.call()``, once, at load): it holds each sparse
    kernel as its non-zero values plus a bitmask (:func:`~alite_jax.compact.sparse_store.encode`) and
    expands them (:func:`~alite_jax.compact.sparse_store.densify`). Expanding them inside the model
    program instead would keep one file, but XLA does not fold the expansion away: it would run at every
    call.
    """
    encoded = sparse_store.encode(flatten(variables))
    weights_exported = jax.export.export(jax.jit(lambda: unflatten(sparse_store.densify(encoded))),
                                         platforms=platforms)()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), variables)
    model_exported = jax.export.export(jax.jit(fn), platforms=platforms)(abstract, image_spec(meta, batch))
    stored = [k for k in encoded if k.endswith(f"{sparse_store.SEP}values")]
    info = dict(stablehlo_info(model_exported), weights_file=WEIGHTS_FILE, sparse_leaves=len(stored),
                nonzero_weights=int(sum(np.asarray(encoded[k]).size for k in stored)))
    return bytes(model_exported.serialize()), bytes(weights_exported.serialize()), info


# --------------------------------------------------------------------------------------------------
# TensorFlow graph (jax2tf), TFLite
# --------------------------------------------------------------------------------------------------


def tf_function(fn: Callable, variables: Any, meta: dict[str, Any], batch: int | None = None) -> Any:
    """A ``tf.function`` of the inference function (jax2tf's graph serialization, TF ops
    named after the flax modules that made them)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    shape = input_shape(meta, batch)
    poly = None if batch is not None else ["(b, " + ", ".join(str(d) for d in shape[1:]) + ")"]
    with warnings.catch_warnings():  # graph serialization is deprecated in jax2tf, yet TFLite needs it
        warnings.simplefilter("ignore", DeprecationWarning)
        tf_fn = jax2tf.convert(_closed(fn, variables), native_serialization=False, with_gradient=False,
                               polymorphic_shapes=poly)
    spec = tf.TensorSpec(shape, tf.float32, name="images")
    return tf.function(tf_fn, input_signature=[spec], autograph=False, jit_compile=False)


# A converter's error names the ops it could not lower ("failed to legalize operation 'tfl.mul'", or the
# list after "TF Select ops:") and the source lines that made them (".../models/local_attention/halo.py:
# 121:9: error: ..."); the layer is the model file's (a local-attention implementation: the
# LocalSelfAttention layer).
_OP = re.compile(r"operation '([a-z]+\.[A-Za-z0-9_]+)'")
_SELECT_OPS = re.compile(r"TF Select ops: ([A-Za-z0-9_, ]+)")
_SOURCE = re.compile(r"alite_jax/(models/[A-Za-z0-9_/]+\.py):(\d+):\d+: error")
LAYERS_OF_SOURCES = {"models/local_attention/": "LocalSelfAttention", "models/vit.py": "ViT block",
                     "models/spvit": "SPViT block", "models/resnet.py": "ResNet block"}


def ops_and_layers(message: str) -> tuple[list[str], list[str]]:
    """The ops a converter's error names, and the layers (with the model source line) they come from."""
    ops = set(_OP.findall(message))
    for listed in _SELECT_OPS.findall(message):
        ops.update(f"tf.{op.strip()}" for op in listed.split(",") if op.strip())
    layers = set()
    for path, line in _SOURCE.findall(message):
        layer = next((name for prefix, name in LAYERS_OF_SOURCES.items() if path.startswith(prefix)), "layer")
        layers.add(f"{layer} ({path}:{line})")
    return sorted(ops), sorted(layers)


def conversion_hint(meta: dict[str, Any], batch: int | None, message: str) -> str:
    """What to do about a model TFLite's converter refused (the end of the error's sentence)."""
    if meta["model"].get("impl") == "blocked" and "dynamic_slice" in message:
        return ("; its local attention impl='blocked' runs the batch in chunks by a loop TFLite cannot "
                "lower: build the inference function with impl='blocked_unchunked' (the CLI's default for "
                "tflite)")
    if batch is None and "dynamic_gather" in message:
        return ("; with a dynamic batch TFLite cannot lower its gathers (a compact model's kept channels): "
                "give a fixed batch size (--batch=N), or export stablehlo")
    return "; export stablehlo instead"


def tflite_bytes(fn: Callable, variables: Any, meta: dict[str, Any], batch: int | None = 1,
                 allow_select_tf_ops: bool = True) -> tuple[bytes, dict[str, Any]]:
    """(TFLite flatbuffer, what to add to the metadata): built-in ops only when the model allows it, else
    with the Select TF ops the message of the built-ins-only attempt names (refused when not allowed)."""
    import tensorflow as tf

    concrete = tf_function(fn, variables, meta, batch).get_concrete_function()

    def convert(ops: list[Any]) -> bytes:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
        converter.target_spec.supported_ops = ops
        return converter.convert()

    try:
        return convert([tf.lite.OpsSet.TFLITE_BUILTINS]), {"select_tf_ops": [], "select_tf_layers": []}
    except Exception as e:  # the converter raises ConverterError (or others) with the ops in its text
        error = e
    ops, layers = ops_and_layers(str(error))
    where = f" in {', '.join(layers[:8])}" if layers else ""
    if not allow_select_tf_ops:
        raise ExportError(f"TFLite's built-in ops cannot represent {meta['model']['name']}: it needs the "
                          f"Select TF ops {', '.join(ops) or '(unnamed)'}{where}; allow Select TF ops "
                          f"(the Flex delegate), or export stablehlo")
    try:
        flat = convert([tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS])
    except Exception as e:
        ops, layers = ops_and_layers(f"{error}\n{e}")
        hint = conversion_hint(meta, batch, f"{error}\n{e}")
        raise ExportError(
            f"TFLite cannot represent {meta['model']['name']}, even with Select TF ops: the converter cannot "
            f"lower {', '.join(ops) or ' '.join(str(e).split())[:300]}"
            f"{' in ' + ', '.join(layers[:8]) if layers else ''}{hint}") from e
    return flat, {"select_tf_ops": ops, "select_tf_layers": layers}


# --------------------------------------------------------------------------------------------------
# The artifact directory
# --------------------------------------------------------------------------------------------------


def write_artifact(out_dir: str, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    """Writes ``files`` ({name: bytes}) and ``metadata.json`` into ``out_dir`` atomically (a new directory
    renamed into place; the previous export, if any, is replaced only once the new one is complete)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for name, payload in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(payload)
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=2)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def wants_sparse_weights(meta: dict[str, Any], sparse_weights: bool | None) -> bool:
    """``sparse_weights`` None ("auto"): stored sparse when the run was irregularly pruned."""
    if sparse_weights is None:
        return meta["model"].get("structure") == "irregular"
    return sparse_weights


def export(fn: Callable, variables: Any, meta: dict[str, Any], fmt: str, out_dir: str,
           batch: int | None = None, sparse_weights: bool | None = None, **options: Any) -> str:
    """Converts the inference function to ``fmt`` and writes the artifact into ``out_dir``; returns the
    artifact file's path. ``batch``: a fixed batch size, or None for any (tflite: None is kept dynamic
    too; LiteRT then needs ``resize_tensor_input`` before ``allocate_tensors``). ``sparse_weights``
    (stablehlo only): store the weights as non-zeros plus bitmasks in a second program
    (:func:`stablehlo_sparse_bytes`); None: when the run was irregularly pruned."""
    check_format(fmt, sparse_weights)
    sparse = wants_sparse_weights(meta, sparse_weights)
    files: dict[str, bytes] = {}
    if fmt == "stablehlo" and sparse:
        files[FILES[fmt]], files[WEIGHTS_FILE], info = stablehlo_sparse_bytes(fn, variables, meta, batch,
                                                                             **options)
    else:
        convert = {"stablehlo": stablehlo_bytes, "tflite": tflite_bytes}[fmt]
        files[FILES[fmt]], info = convert(fn, variables, meta, batch, **options)
    meta = dict(meta, format=fmt, file=FILES[fmt], conversion=info,
                weights="sparse" if WEIGHTS_FILE in files else "embedded")
    meta["input"] = dict(meta["input"], shape=input_shape(meta, batch))
    meta["output"] = dict(meta["output"], shape=[batch] + meta["output"]["shape"][1:])
    write_artifact(out_dir, files, meta)
    return os.path.join(os.path.abspath(out_dir), FILES[fmt])
