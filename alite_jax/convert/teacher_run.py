"""A converted checkpoint as a teacher run directory: what a distillation takes as ``teacher.workdir``.

:func:`convert_checkpoint` reads a file and converts it (nothing written); :func:`write_teacher_run`
writes the run directory of :mod:`alite_jax.run_dir`: ``config.json`` (a teacher config: the model, its
layout (ResNets), the data set, image size, normalization and recipe the weights expect), ``model/``
(the variables) and ``summary.json`` (``converted_from``: the source file and format; ``test_accuracy``
when evaluated, else null). ``python -m alite_jax.convert`` is these two steps
(:mod:`alite_jax.convert.__main__`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from alite_jax import run_dir
from alite_jax.config import teacher_config
from alite_jax.convert import timm as timm_lib
from alite_jax.convert.readers import CheckpointError, file_format, read_state_dict
from alite_jax.convert.torchvision import check_batchnorm_conventions, create_resnet, torchvision_to_variables
from alite_jax.errors import MissingFileError, RunDirError, user_input
from alite_jax.models import (VIT_OPTIONS, VITS, VisionTransformer, check_model_image_size, count_params,
                              create_model)

SOURCES = ("torchvision", "timm")


def convert_checkpoint(path: str, source: str = "torchvision", arch: str = "resnet50",
                       num_classes: int = 1000, layout: str = "imagenet", image_size: int = 224
                       ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, variables) of a checkpoint file (``torch.save`` zip or safetensors) of ``source``'s
    ``arch``; :class:`CheckpointError` names what does not fit. ``layout`` applies to torchvision's
    ResNets, ``image_size`` to timm's ViTs (their position embedding's length)."""
    if source not in SOURCES:
        raise CheckpointError(f"unknown --from {source!r}: the converter reads {SOURCES}")
    if num_classes < 1:
        raise CheckpointError(f"--num_classes must be >= 1, got {num_classes}")
    if source == "timm":
        model = timm_lib.create_vit(arch, num_classes, image_size)
        return model, timm_lib.timm_to_variables(read_state_dict(path), model, source=path)
    model = create_resnet(arch, num_classes, layout)
    check_batchnorm_conventions(model)
    return model, torchvision_to_variables(read_state_dict(path), model, source=path)


def teacher_run_config(dataset: str, image_size: int, layout: str = "imagenet",
                       batch_size: int = 100, model_name: str = "resnet50") -> ml_collections.ConfigDict:
    """The teacher config a converted run directory records: ResNet-50 in ``layout`` or a DeiT
    (``model_name`` one of the zoo's ViTs; its config holds the name and dtype only), the data set and
    image size its weights expect, ImageNet normalization (and the recipe whose evaluation transform
    the weights were measured with: ``imagenet`` for a ResNet in the ImageNet layout, resize and
    centre-crop, bilinear; ``deit`` for a DeiT, the same bicubic, as DeiT evaluates), and ``num_epochs``
    0 (converted, not trained here)."""
    config = teacher_config(dataset, num_epochs=0)
    if model_name in VITS:
        config.model = ml_collections.ConfigDict(dict(name=model_name, dtype="float32"))
        config.data.image_size = image_size
        config.data.batch_size = config.data.eval_batch_size = batch_size
        config.data.normalization = "imagenet"  # DeiT: timm's IMAGENET_DEFAULT_MEAN / _STD
        config.data.augment = "deit"
        return config
    config.model.layout = layout
    config.data.image_size = image_size
    config.data.batch_size = config.data.eval_batch_size = batch_size
    config.data.normalization = "imagenet"
    if layout == "imagenet":  # evaluation: resize to 256, centre crop 224, as torchvision evaluates
        config.data.augment = "imagenet"
    return config


def config_model_name(model: nn.Module) -> str:
    """The zoo name a converted model's config records: "resnet50", or the DeiT of the ViT's width."""
    if isinstance(model, VisionTransformer):  # the DeiT of its width and heads, else the tiny one
        return {(384, 6): "deit_small", (768, 12): "deit_base"}.get((model.dim, model.num_heads), "deit_tiny")
    return "resnet50"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_workdir(workdir: str) -> None:
    """Raises :class:`RunDirError` when ``workdir`` holds a run's history that is not an earlier
    conversion (a conversion replaces an earlier conversion's files, nothing else)."""
    found = run_dir.history(workdir)
    summary = run_dir.read_summary(workdir) if found else None
    if found and not (summary or {}).get("converted_from"):
        raise RunDirError(f"{workdir} holds a run's history ({', '.join(found)}) that is not a converted "
                          f"teacher; nothing was changed. Give another --workdir.")


def write_teacher_run(workdir: str, model: nn.Module, variables: dict[str, Any], *, checkpoint: str,
                      dataset: str = "imagenet2012", image_size: int = 224, batch_size: int = 100,
                      source: str = "torchvision", arch: str = "resnet50", evaluate: bool = False,
                      data_dir: str | None = None, say=print) -> dict[str, Any]:
    """Writes the teacher run directory (see the module docstring) and returns its summary.

    With ``evaluate``, the model is evaluated on ``dataset``'s evaluation split through
    :func:`alite_jax.data.create_input_pipeline` and the trainer's evaluation step; a data set that is not
    prepared is reported through ``say`` in one line, and the directory is written without an accuracy.
    """
    vit = isinstance(model, VisionTransformer)
    with user_input("--image_size"):
        check_model_image_size(model, image_size, image_size)
    check_workdir(workdir)
    config = teacher_run_config(dataset, image_size, getattr(model, "layout", "imagenet"), batch_size,
                                config_model_name(model))
    if vit:  # a ViT shaped otherwise than its zoo name (e.g. fewer blocks) records what differs
        zoo = create_model(config.model.name, model.num_classes, image_size=model.image_size)
        for key in VIT_OPTIONS:
            if key != "image_size" and getattr(model, key) != getattr(zoo, key):
                config.model[key] = getattr(model, key)
    if data_dir:
        config.data.data_dir = data_dir
    os.makedirs(workdir, exist_ok=True)
    run_dir.write_run_config(workdir, config, model.num_classes, channels=3)
    run_dir.export_model(workdir, variables)
    summary: dict[str, Any] = dict(
        mode="teacher", epochs=0,
        converted_from=dict(source=source, arch=arch, checkpoint=os.path.abspath(checkpoint),
                            file_format=file_format(checkpoint), sha256=_sha256(checkpoint)),
        params=count_params(variables["params"]), num_classes=model.num_classes, test_accuracy=None)
    if vit:
        summary["model"] = config.model.name
    else:
        summary["layout"] = model.layout
    run_dir.write_summary(workdir, summary)
    if evaluate:
        metrics = evaluate_teacher(config, model, variables, say)
        if metrics is not None:
            summary.update(metrics, evaluated_split=config.data.eval_split or "default")
            run_dir.write_summary(workdir, summary)
    return summary


def evaluate_teacher(config: ml_collections.ConfigDict, model: nn.Module, variables: dict[str, Any],
                     say=print) -> dict[str, float] | None:
    """Test accuracy and loss of the converted model on ``config.data``'s evaluation split, or None (said
    in one line) when the data set is not available here. The pipeline opens a slice of the training
    split too (it builds both); nothing of it is read."""
    from alite_jax import data, train  # the input pipeline and the trainer's evaluation, on demand
    from alite_jax.distributed import make_mesh

    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.download = False  # evaluate what is prepared; never start a download of ImageNet
    mesh = make_mesh()
    data_config.batch_size = mesh.devices.size  # the training batches are built, never read
    try:
        pipe = data.create_input_pipeline(data_config, mesh)
    except (FileNotFoundError, MissingFileError) as e:
        say(f"not evaluated: {config.data.dataset} is not available here ({' '.join(str(e).split())[:300]}); "
            f"the run directory is written without test_accuracy")
        return None
    if pipe.num_classes != model.num_classes:
        raise CheckpointError(f"{config.data.dataset} has {pipe.num_classes} classes, the converted model "
                              f"{model.num_classes}: convert a checkpoint trained on it, or evaluate on "
                              f"another --dataset")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put({"params": variables["params"], "batch_stats": variables["batch_stats"]},
                           replicated)
    metrics = train.evaluate(jax.jit(train.make_eval_step(model)), state, pipe)
    say(f"{config.data.dataset}: test accuracy {metrics['test_accuracy']:.4f}")
    return metrics
