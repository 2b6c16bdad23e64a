"""A finished teacher run inside the step: the mixin of the methods that distil from one.

``config.teacher.workdir`` names the run (any finished run whose method is registered: a converted
torchvision ResNet-50, a trained teacher, a dense DeiT); the teacher runs in inference mode inside the
jitted step, at ``teacher.dtype`` if set, and is never saved.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections

from alite_jax import run_dir
from alite_jax.errors import ConfigError, MissingFileError
from alite_jax.methods import registry
from alite_jax.methods.base import Teacher
from alite_jax.models import compute_dtype


# The repository's teacher config of each data set: what the missing-teacher message suggests.
TEACHER_CONFIGS = {"cifar10": "configs/teacher_cifar10.py", "cifar100": "configs/teacher_cifar100.py",
                   "tiny_imagenet": "configs/teacher_tiny_imagenet.py",
                   "imagenet2012": "configs/teacher_imagenet.py"}


def check_teacher_run(config: ml_collections.ConfigDict, num_classes: int) -> None:
    """The teacher run at ``config.teacher.workdir``: there, finished, and trained on this data (classes,
    normalisation, image size); a :class:`alite_jax.errors.UserError` says what to change."""
    workdir = config.teacher.workdir
    if not workdir or not run_dir.is_finished_run(workdir):
        dataset = config.data.dataset
        example = TEACHER_CONFIGS.get(dataset, "configs/teacher_cifar10.py")
        raise MissingFileError(
            f"no finished teacher run at config.teacher.workdir={workdir!r} (it needs config.json and "
            f"model/). Train the teacher first, e.g. python -m alite_jax.main "
            f"--config={example} --workdir=<dir>, and point teacher.workdir at it"
            + ("" if dataset in TEACHER_CONFIGS else f" (with data.dataset={dataset!r})") + ".")
    teacher = ml_collections.ConfigDict(run_dir.read_run_config(workdir))
    if teacher.data.dataset != config.data.dataset or teacher.num_classes != num_classes:
        raise ConfigError(f"the teacher at {workdir} was trained on {teacher.data.dataset} "
                          f"({teacher.num_classes} classes), not on {config.data.dataset} "
                          f"({num_classes} classes)")
    norms = teacher.data.get("normalization", "dataset"), config.data.get("normalization", "dataset")
    if norms[0] != norms[1]:
        raise ConfigError(f"the teacher at {workdir} takes images normalised with data.normalization="
                          f"{norms[0]!r}, the student's config says {norms[1]!r}: set "
                          f"data.normalization={norms[0]!r}")
    if teacher.data.image_size != config.data.image_size:
        raise ConfigError(f"the teacher at {workdir} takes {teacher.data.image_size}px images, the "
                          f"student {config.data.image_size}px")


class TeacherRun:
    """What a method shares when it distils from a finished run (mixed in before
    :class:`~alite_jax.methods.base.Method`): the ``teacher`` config section, its check, and the frozen
    model and variables the step runs, when :meth:`uses_teacher` says the loss needs them."""

    config: ml_collections.ConfigDict
    num_classes: int
    # teacher.workdir: a finished teacher run; teacher.dtype: its forward's compute dtype in the step
    # ("": as it was trained; "bfloat16" halves its cost on bf16 hardware).
    sections: ClassVar[dict[str, dict[str, Any]]] = {"teacher": dict(workdir="", dtype="")}
    path_fields: ClassVar[tuple[str, ...]] = ("teacher.workdir",)
    may_change: ClassVar[tuple[str, ...]] = ("teacher.workdir",)

    def uses_teacher(self) -> bool:
        """Whether this run's loss has a teacher term (overridden by each method)."""
        return True

    def check_teacher(self) -> None:
        """The ``teacher`` section's settings (no file read)."""
        if self.config.teacher.get("dtype", ""):
            compute_dtype(self.config.teacher.dtype)

    def check_teacher_inputs(self) -> None:
        """The teacher run, when the loss needs one: there, finished, on this data and image size."""
        if self.uses_teacher():
            check_teacher_run(self.config, self.num_classes)

    def teacher_model(self) -> nn.Module | None:
        """The teacher run's model, without its variables (for the summary's costs), or None."""
        if not self.uses_teacher():
            return None
        return registry.run_model(self.config.teacher.workdir, self.config.teacher.get("dtype", ""))

    def teacher(self, mesh: jax.sharding.Mesh) -> Teacher | None:
        """The teacher run's model and variables (replicated on ``mesh``), at ``teacher.dtype`` if set."""
        if not self.uses_teacher():
            return None
        return registry.load_run(self.config.teacher.workdir, mesh, self.config.teacher.get("dtype", ""))

    def teacher_summary(self) -> dict[str, Any]:
        """The teacher run's summary.json ({} without a teacher or a summary)."""
        if not self.uses_teacher():
            return {}
        return run_dir.read_summary(self.config.teacher.workdir) or {}
