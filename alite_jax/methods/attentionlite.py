"""AttentionLite's sparse distillation (Kundu & Sundaresan, Algorithm 1) as a :class:`Method`.

The student learns from a finished teacher run (``config.teacher.workdir``) with the loss of eq. 2
(``config.distill.loss``: "kd" or "kd+at"; "ce" trains the student alone) while
:func:`alite_jax.sparsity.sparse_learning` prunes it to ``config.sparsity.density`` (1.0: dense
distillation), with prune/regrow after every epoch but the last. The teacher runs in inference mode
inside the step and is never saved.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import optax

from alite_jax import costs, distill, run_dir, sparsity
from alite_jax.errors import ConfigError, MissingFileError
from alite_jax.methods.base import Method, State, Teacher, optimizer_from_config
from alite_jax.models import compute_dtype


SPARSE_MODES = ("distill", "spvit_finetune")  # the methods that can prune with sparse learning


def is_sparse(config: ml_collections.ConfigDict) -> bool:
    """Whether the run prunes with sparse learning: a mode that can, at ``sparsity.density < 1``."""
    return config.mode in SPARSE_MODES and config.sparsity.density < 1.0


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """A distillation with a teacher term; ``distill.loss="ce"`` trains the (sparse) student alone."""
    return config.mode == "distill" and config.distill.loss != "ce"


# The pieces another method composes (SPViT's fine-tuning with sparse learning on top) ------------------

def check_teacher_run(config: ml_collections.ConfigDict, num_classes: int) -> None:
    """The teacher run at ``config.teacher.workdir``: there, finished, and trained on this data (classes,
    normalisation, image size); a :class:`alite_jax.errors.UserError` says what to change."""
    workdir = config.teacher.workdir
    if not workdir or not run_dir.is_finished_run(workdir):
        raise MissingFileError(
            f"no finished teacher run at config.teacher.workdir={workdir!r} (it needs config.json and "
            f"model/). Train the teacher first, e.g. python -m alite_jax.main "
            f"--config=configs/teacher_cifar10.py --workdir=<dir>, and point teacher.workdir at it.")
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


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Teacher:
    """The teacher run's model and variables (replicated on ``mesh``), at ``teacher.dtype`` if set."""
    return run_dir.load_model(config.teacher.workdir, mesh, config.teacher.get("dtype", ""))


def check_sparsity(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` for sparsity options that cannot run (the optimizer's wrapper and the
    prune-rate schedule check them)."""
    s = config.sparsity
    if is_sparse(config):
        sparse_optimizer(config, optax.sgd(0.1, momentum=0.9))
    sparsity.prune_rate_schedule(s.prune_rate, config.num_epochs, s.schedule, steps_per_epoch=1,
                                 full_rate_steps=s.full_rate_steps)


def sparse_optimizer(config: ml_collections.ConfigDict,
                     inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` wrapped in :func:`alite_jax.sparsity.sparse_learning` with the config's sparsity."""
    s = config.sparsity
    return sparsity.sparse_learning(
        inner, density=s.density, structure=s.structure, distribution=s.distribution, seed=config.seed,
        redistribution=s.redistribution, min_layer_fraction=s.min_layer_fraction,
        reset_regrown_momentum=s.reset_regrown_momentum, keep_channels=s.get("keep_channels", True))


def sparse_round(config: ml_collections.ConfigDict, state: State, epoch: int,
                 steps_per_epoch: int) -> tuple[State, dict[str, Any]]:
    """Algorithm 1's end of epoch: a prune/regrow round after every epoch but the last (after its
    evaluation: the model that epoch trained is the one evaluated), and the densities for the metrics."""
    row = {}
    s, num_epochs = config.sparsity, config.num_epochs
    if epoch < num_epochs - 1:
        rate = sparsity.prune_rate_schedule(s.prune_rate, num_epochs, s.schedule,
                                            steps_per_epoch=steps_per_epoch,
                                            full_rate_steps=s.full_rate_steps)(epoch)
        params, opt_state = sparsity.prune_and_regrow(state["params"], state["opt_state"], rate)
        state = dict(state, params=params, opt_state=opt_state)
        row["prune_rate"] = rate
    masks = sparsity.get_masks(state["opt_state"])
    row.update(density=sparsity.global_density(masks), per_layer_density=sparsity.layer_densities(masks))
    return state, row


class SparseLearning:
    """What a method shares when it prunes with AttentionLite's sparse learning (``self.sparse``): its
    optimizer (:meth:`inner_optimizer`) wrapped in :func:`sparse_optimizer`, the prune/regrow round after
    each epoch (:func:`sparse_round`) and the masks. Mixed into :class:`AttentionLite` and SPViT's
    fine-tuning, before :class:`Method`."""

    config: ml_collections.ConfigDict
    sparse: bool

    def inner_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """The optimizer the sparse wrapper wraps (it must keep a momentum / first moment)."""
        return optimizer_from_config(self.config, steps_per_epoch)

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        inner = self.inner_optimizer(steps_per_epoch)
        return sparse_optimizer(self.config, inner) if self.sparse else inner

    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int) -> tuple[State, dict[str, Any]]:
        """A prune/regrow round (:func:`sparse_round`) when sparse."""
        if not self.sparse:
            return state, {}
        return sparse_round(self.config, state, epoch, steps_per_epoch)

    def masks(self, state: State) -> Any | None:
        return sparsity.get_masks(state["opt_state"]) if self.sparse else None


class AttentionLite(SparseLearning, Method):
    """Distillation from a CNN teacher (CE + KD + attention transfer) with sparse learning."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        super().__init__(config, num_classes)
        self.sparse, self.with_teacher = is_sparse(config), needs_teacher(config)
        self.teacher_model = None

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return distill.loss_terms(self.config.distill.loss)

    def check(self) -> None:
        super().check()
        config = self.config
        if config.distill.loss not in distill.MODES:
            raise ConfigError(f"config.distill.loss must be one of {distill.MODES} ('ce': sparse training "
                              f"without a teacher), got {config.distill.loss!r}")
        if config.teacher.get("dtype", ""):
            compute_dtype(config.teacher.dtype)
        check_sparsity(config)

    def check_inputs(self) -> None:
        """The teacher run: there, finished, and trained on this data at this image size."""
        if self.with_teacher:
            check_teacher_run(self.config, self.num_classes)

    def teacher(self, mesh: jax.sharding.Mesh) -> Teacher | None:
        if not self.with_teacher:
            return None
        model, variables = load_teacher(self.config, mesh)
        self.teacher_model = model
        return model, variables

    def loss(self, logits, features, labels, teacher_out):
        t_logits, t_features = teacher_out if teacher_out is not None else (None, None)
        d = self.config.distill
        return distill.distillation_loss(logits, t_logits, labels, features, t_features, mode=d.loss,
                                         alpha=d.alpha, beta=d.beta, temperature=d.temperature)

    def prepare_params(self, params: Any, opt_state: Any) -> Any:
        """The student's random initial weights under the initial masks: with ``sparsity.fan_in_init``
        each output channel rescaled to its active fan-in (:func:`alite_jax.sparsity.scale_to_fan_in`)."""
        if not self.sparse:
            return params
        masks = sparsity.get_masks(opt_state)
        if self.config.sparsity.get("fan_in_init", True):
            return sparsity.scale_to_fan_in(params, masks)
        return sparsity.apply_masks(params, masks)

    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        masks = self.masks(state)
        fields = dict(distill=self.config.distill.loss,
                      structure=self.config.sparsity.structure if self.sparse else "dense",
                      per_layer_density=sparsity.layer_densities(masks) if masks is not None else {})
        if self.teacher_model is not None:
            teacher_costs = costs.count_costs(self.teacher_model, image_size, channels)
            teacher_summary = run_dir.read_summary(self.config.teacher.workdir) or {}
            fields.update(costs.reductions(student_costs, teacher_costs),
                          teacher_params=teacher_costs["params"], teacher_flops=teacher_costs["flops"],
                          teacher_test_accuracy=teacher_summary.get("test_accuracy"))
        return fields
