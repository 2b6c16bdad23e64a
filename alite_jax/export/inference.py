"""The function an inference artifact holds: raw images -> logits, with the run's preprocessing folded in.

:func:`inference_function` reads a finished run directory (``config.json`` + ``model/``) and returns
``fn(variables, images) -> logits`` where ``images`` are what a camera or an image file gives after
resizing: float32 in [0, 1], NHWC, the run's image size and channel count. ``fn`` first normalises
them exactly as the training and evaluation pipeline did (``data.normalization``: "imagenet", ImageNet's
channel mean and std; "dataset", the training split's own channel statistics, recomputed here with the
pipeline's :func:`~alite_jax.data.pipeline.channel_stats`), then runs the model in eval mode (BatchNorm's
running statistics, no dropout, no gate sampling). A deployment then needs no copy of those constants.

A *compactor* (:data:`~alite_jax.export.compactors.Compactor`) may replace the trained model by an
equivalent smaller one before export: a column-pruned student without its zero columns, or SPViT's
fine-tuned model with its conv blocks folded. It takes ``(model, variables, summary)`` (``summary``: the
run's summary.json, or None) and returns ``(apply_fn, variables)`` with ``apply_fn(variables,
normalised_images) -> logits``. Every compactor is known by name as soon as this module is imported
(:mod:`alite_jax.export.compactors` lists them); :data:`AS_TRAINED` (the default) exports the run's model
as it is, dense or masked.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alite_jax import methods, run_dir
from alite_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from alite_jax.data.sources import default_splits, open_split, shard_range
from alite_jax.errors import MissingFileError, RunDirError, UserError, user_input
from alite_jax.export.compactors import AS_TRAINED, COMPACTORS, Compactor
from alite_jax.models import STUDENTS

InferenceFn = Callable[[Any, jax.Array], jax.Array]

# The local-attention implementation exported by default (alite_jax.models.local_attention.blocked): halo's
# blocked matmuls in tensors of rank <= 4 (TFLite converts them; halo's rank-7 einsums it does not), with
# a symbolic batch size allowed (halo's chunking needs a concrete one); Pallas is compiled for one GPU.
PORTABLE_IMPL = "blocked"
# Run implementations an artifact does not keep: "auto" picks per backend, and the Pallas kernels
# ("pallas", "fused") are compiled for one GPU or TPU, not serialised.
REPLACED_IMPLS = ("auto", "pallas", "fused")
# What TFLite's converter takes: the same with no chunk loop (it cannot lower the loop's dynamic slices).
TFLITE_IMPL = "blocked_unchunked"


def check_finished_run(workdir: str) -> dict[str, Any]:
    """The run's config.json; raises :class:`RunDirError` when ``workdir`` holds no finished model."""
    if not os.path.isdir(workdir):
        raise RunDirError(f"{workdir} is not a directory: give --workdir=<a finished run directory>")
    if not run_dir.is_finished_run(workdir):
        missing = [name for name in (run_dir.CONFIG, run_dir.MODEL)
                   if not os.path.exists(os.path.join(workdir, name))]
        raise RunDirError(f"{workdir} holds no finished model (no {' and no '.join(missing)}): a run writes "
                          f"{run_dir.MODEL}/ when its last epoch ends; export a finished run, or finish "
                          f"this one first")
    return run_dir.read_run_config(workdir)


def normalization_stats(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) the run's pipeline normalised images with (pixel values in [0, 1]).

    "imagenet": ImageNet's constants. "dataset": the training split's statistics as the trainer recorded
    them in config.json (``input_mean``, ``input_std``) or, for a run written before it did, recomputed
    the way :func:`~alite_jax.data.pipeline.build_input_pipeline` computes them (the split's ``data_shards``
    shards, one process); this reads the data set, which must be prepared here (``download`` is off).
    """
    data = config.data
    if data.get("normalization", "dataset") == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if "input_mean" in config and "input_std" in config:  # recorded by the trainer in config.json
        return np.asarray(config.input_mean, np.float32), np.asarray(config.input_std, np.float32)
    split = data.get("train_split") or default_splits(data.dataset)[0]
    try:
        source = open_split(data.dataset, split, data_dir=data.get("data_dir"), download=False,
                            manual_dir=data.get("manual_dir"))
    except (UserError, OSError, ValueError) as e:
        raise MissingFileError(
            f"data.normalization='dataset' folds the training split's channel statistics into the artifact, "
            f"and {data.dataset!r} ({split}) cannot be read here ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}): prepare the data set here, or give --data_dir") from e
    num_shards = data.get("data_shards", 0) or 1
    shards = []
    for shard in range(num_shards):
        start, end = shard_range(len(source), shard, num_shards, drop_remainder=True)
        shards.append(dataclasses.replace(source, records=grain.MapDataset.source(source.records)[start:end]))
    return channel_stats(shards)


def build_model(config: ml_collections.ConfigDict, workdir: str, dtype: str = "float32",
                impl: str | None = None) -> Any:
    """The module the run trained (:func:`alite_jax.methods.run_model`, its method's: the zoo's, an SPViT
    search's supernet or fine-tuned architecture), computing in ``dtype``; a student's local attention uses
    ``impl`` (None: the run's, Pallas replaced by the portable :data:`PORTABLE_IMPL`, since a Pallas kernel
    is compiled for one GPU, not serialised)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.name in STUDENTS:
        config.model.impl = build_impl_name(config, impl)
    return methods.run_model(workdir, dtype, config)


def load_variables(workdir: str, model: Any, config: ml_collections.ConfigDict) -> Any:
    """The run's exported variables (``model/``) on this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return run_dir.restore_model(workdir, model, None, config.data.image_size, config.channels,
                                 sharding=device)


def inference_function(workdir: str, compactor: str | Compactor = AS_TRAINED, dtype: str = "float32",
                       impl: str | None = None, data_dir: str | None = None,
                       ) -> tuple[InferenceFn, Any, dict[str, Any]]:
    """``(fn, variables, meta)`` of a finished run: ``fn(variables, images) -> logits``.

    ``images``: float32 in [0, 1], (batch, image_size, image_size, channels) (NHWC) of the run; ``fn``
    normalises them as the run's pipeline did, then applies the (compacted) model in eval mode;
    logits are float32 (batch, num_classes). ``meta`` describes input, output, normalisation and source
    (what an artifact's metadata file records). ``compactor``: a name in :data:`COMPACTORS` or a
    function; ``dtype``: the compute dtype ("float32": portable; the run's may have been bfloat16);
    ``impl``: a student's local-attention implementation (:func:`build_model`); ``data_dir`` overrides
    the config's data directory for the "dataset" statistics.
    """
    config = ml_collections.ConfigDict(check_finished_run(workdir))
    if isinstance(compactor, str):
        if compactor not in COMPACTORS:
            raise UserError(f"unknown compactor {compactor!r}; choose one of {sorted(COMPACTORS)}")
        compactor_name, compactor = compactor, COMPACTORS[compactor]
    else:
        compactor_name = getattr(compactor, "__name__", "custom")
    if data_dir:
        config.data.data_dir = data_dir
    mean, std = normalization_stats(config)
    with user_input(f"{workdir}'s model"):  # e.g. an unknown --impl
        model = build_model(config, workdir, dtype, impl)
    variables = load_variables(workdir, model, config)
    summary = run_dir.read_summary(workdir)
    apply_fn, variables = compactor(model, variables, summary)
    mean32, inv_std32 = np.asarray(mean, np.float32), (1.0 / np.asarray(std, np.float32)).astype(np.float32)

    def fn(variables: Any, images: jax.Array) -> jax.Array:
        x = (images.astype(jnp.float32) - mean32) * inv_std32
        return apply_fn(variables, x).astype(jnp.float32)

    size, channels = config.data.image_size, config.channels
    meta = {
        "source_run": os.path.abspath(workdir),
        "model": {"name": config.model.name, "mode": config.mode, "compactor": compactor_name,
                  "compute_dtype": dtype, "structure": (summary or {}).get("structure"),
                  "density": (summary or {}).get("density")},
        "input": {"shape": [None, size, size, channels], "dtype": "float32", "layout": "NHWC",
                  "range": [0.0, 1.0], "meaning": "RGB or grayscale pixel values / 255, resized (and "
                  "centre-cropped) to the run's image size; no normalisation: it is folded in"},
        "output": {"shape": [None, config.num_classes], "dtype": "float32", "meaning": "logits"},
        "normalization": {"kind": config.data.get("normalization", "dataset"), "folded": True,
                          "mean": np.ravel(mean).astype(float).tolist(),
                          "std": np.ravel(std).astype(float).tolist(),
                          "formula": "(images - mean) / std, per channel"},
        "num_classes": config.num_classes, "dataset": config.data.dataset,
    }
    if config.model.name in STUDENTS:
        meta["model"]["impl"] = build_impl_name(config, impl)
    return fn, variables, meta


def build_impl_name(config: ml_collections.ConfigDict, impl: str | None) -> str:
    """The local-attention implementation :func:`build_model` uses for a student."""
    run_impl = config.model.get("impl", "auto")
    return impl or (PORTABLE_IMPL if run_impl in REPLACED_IMPLS else run_impl)
