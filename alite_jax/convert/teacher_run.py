"""A converted checkpoint as a teacher run directory: what a distillation takes as ``teacher.workdir``.

:func:`convert_checkpoint` reads a file and converts it (nothing written); :func:`write_teacher_run`
writes the run directory of :mod:`alite_jax.run_dir`: ``config.json`` (a teacher config: the model, its
layout, the data set, image size and normalization the weights expect), ``model/`` (the variables) and
``summary.json`` (``converted_from``: the source file and format; ``test_accuracy`` when evaluated,
else null). ``python -m alite_jax.convert`` is these two steps (:mod:`alite_jax.convert.__main__`).
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
from alite_jax.convert.readers import CheckpointError, file_format, read_state_dict
from alite_jax.convert.torchvision import check_batchnorm_conventions, create_resnet, torchvision_to_variables
from alite_jax.errors import MissingFileError, RunDirError, user_input
from alite_jax.models import check_image_size, count_params

SOURCES = ("torchvision",)


def convert_checkpoint(path: str, source: str = "torchvision", arch: str = "resnet50",
                       num_classes: int = 1000, layout: str = "imagenet") -> tuple[nn.Module, dict[str, Any]]:
    """(model, variables) of a checkpoint file (``torch.save`` zip or safetensors) of ``source``'s
    ``arch``; :class:`CheckpointError` names what does not fit."""
    if source not in SOURCES:
        raise CheckpointError(f"unknown --from {source!r}: the converter reads {SOURCES}")
    if num_classes < 1:
        raise CheckpointError(f"--num_classes must be >= 1, got {num_classes}")
    model = create_resnet(arch, num_classes, layout)
    check_batchnorm_conventions(model)
    return model, torchvision_to_variables(read_state_dict(path), model, source=path)


def teacher_run_config(dataset: str, image_size: int, layout: str = "imagenet",
                       batch_size: int = 100) -> ml_collections.ConfigDict:
    """The teacher config a converted run directory records: ResNet-50 in ``layout``, the data set and
    image size its weights expect, ImageNet normalization (and, in the ImageNet layout, the ``imagenet``
    recipe: evaluation resizes and centre-crops), and ``num_epochs`` 0 (converted, not trained here)."""
    config = teacher_config(dataset, num_epochs=0)
    config.model.layout = layout
    config.data.image_size = image_size
    config.data.batch_size = config.data.eval_batch_size = batch_size
    config.data.normalization = "imagenet"
    if layout == "imagenet":  # evaluation: resize to 256, centre crop 224, as torchvision evaluates
        config.data.augment = "imagenet"
    return config


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
    with user_input("--image_size"):
        check_image_size(image_size, image_size, model.layout)
    check_workdir(workdir)
    config = teacher_run_config(dataset, image_size, model.layout, batch_size)
    if data_dir:
        config.data.data_dir = data_dir
    os.makedirs(workdir, exist_ok=True)
    run_dir.write_run_config(workdir, config, model.num_classes, channels=3)
    run_dir.export_model(workdir, variables)
    summary: dict[str, Any] = dict(
        mode="teacher", epochs=0,
        converted_from=dict(source=source, arch=arch, checkpoint=os.path.abspath(checkpoint),
                            file_format=file_format(checkpoint), sha256=_sha256(checkpoint)),
        params=count_params(variables["params"]), num_classes=model.num_classes, layout=model.layout,
        test_accuracy=None)
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
