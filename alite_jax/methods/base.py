"""The seam between the trainer and what it trains: a :class:`Method`.

The loop in :mod:`alite_jax.train` knows steps, evaluation, checkpoints and preemption, and nothing of
teachers, masks or loss terms. Everything that differs between what it runs is a method's, and nothing
outside the method names its mode:

* its part of the config: the sections it owns with their defaults (:attr:`Method.sections`, merged into
  :func:`alite_jax.config.base_config`), their numeric ranges (:attr:`Method.field_ranges`), the fields
  that name another run or file (:attr:`Method.path_fields`: a phased config takes them relative to its
  workdir) and those that may change when a run resumes (:attr:`Method.may_change`);
* the models: :meth:`Method.student` (trained), :meth:`Method.run_model` (the model a finished run's
  variables belong to, which teacher loading and export rebuild) and :meth:`Method.teacher` (a frozen
  model and its variables, or None);
* what the initial state is built from, read outside ``jit``: :meth:`Method.initial_inputs` (e.g. a
  pretrained run's parameters), handed to :meth:`Method.prepare_params` as an argument of the jitted
  initialisation (never closed over as a constant);
* the loss and what it reports: :meth:`Method.loss` (of the parameters too, e.g. a FLOPs term of gate
  logits) and :attr:`Method.loss_terms`;
* the random streams the student's training forward draws (sampled gates, drop path):
  :meth:`Method.apply_rngs`;
* the optimizer (and its parameter groups): :meth:`Method.optimizer`;
* what happens at the end of an epoch, after evaluation: :meth:`Method.end_of_epoch` (prune/regrow for
  sparse distillation; nothing for a teacher);
* what it adds to the run's summary and directory, and the report it wants: :meth:`Method.summary_fields`,
  :meth:`Method.run_files`, :attr:`Method.report` (a name in :data:`alite_jax.report.REPORTS`);
* the checks of its own settings and inputs, before anything is written or compiled:
  :meth:`Method.check`, :meth:`Method.check_inputs`.

A method is built from the run's config and the number of classes and keeps nothing else: every hook is
a function of those and of its arguments. The state is the loop's plain tree (params, batch_stats,
opt_state, step, epoch_sums). Shared pieces live beside it: :mod:`~alite_jax.methods.optim` (optimizers
and schedules), :mod:`~alite_jax.methods.teacher` (a teacher run in the step) and
:mod:`~alite_jax.methods.sparse` (sparse learning).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import ml_collections
import optax

from alite_jax.config import Range
from alite_jax.distill import distillation_loss
from alite_jax.methods.optim import learning_rate_schedule, optimizer_from_config
from alite_jax.models import model_from_config

State = dict[str, Any]
Teacher = tuple[nn.Module, Any]  # (model, variables); None when the method needs none
TeacherOut = tuple[jax.Array, tuple[jax.Array, ...]]  # a teacher's (logits, features)


def class_fields(cls: type, name: str) -> Any:
    """A class attribute merged along the method's MRO (mixins included): dicts updated, tuples joined
    without repeats, base classes first."""
    merged: Any = None
    for klass in reversed(cls.__mro__):
        value = vars(klass).get(name)
        if value is None:
            continue
        if isinstance(value, dict):
            merged = {**(merged or {}), **value}
        else:
            merged = tuple(dict.fromkeys((merged or ()) + tuple(value)))
    return merged if merged is not None else ()


class Method:
    """Supervised training of ``config.model`` with cross-entropy: the teacher and the dense baseline.

    Subclasses (and mixins) override what differs (see the module docstring). The class attributes below
    are merged along the MRO by :func:`class_fields`: a mixin adds its own section, ranges and fields."""

    loss_terms: tuple[str, ...] = ("ce", "total")
    sections: ClassVar[dict[str, dict[str, Any]]] = {}  # config sections this class owns: {name: defaults}
    field_ranges: ClassVar[dict[str, Range]] = {}  # "section.field" -> its allowed values
    path_fields: ClassVar[tuple[str, ...]] = ()  # fields naming another run's directory or a file
    may_change: ClassVar[tuple[str, ...]] = ()  # fields that may differ on resume (any registered method's)
    report: ClassVar[str] = "table1"  # the report alite_jax.report writes for a finished run

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        self.config, self.num_classes = config, num_classes

    # Checks --------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raises an :class:`alite_jax.errors.ConfigError` for settings of this method that cannot run,
        reading no file (a command that runs several phases checks them all before the first)."""
        self.learning_rate(steps_per_epoch=1)
        optimizer_from_config(self.config, steps_per_epoch=1)

    def check_inputs(self) -> None:
        """Raises an :class:`alite_jax.errors.UserError` for inputs of this method that are missing or do
        not match (e.g. a teacher run); called before anything is written or compiled."""

    # Models --------------------------------------------------------------------------------------
    def student(self, dtype: str = "") -> nn.Module:
        """The model this method trains (``dtype``: another compute dtype than ``model.dtype``)."""
        return model_from_config(self.config.model, self.num_classes, dtype,
                                 image_size=self.config.data.image_size)

    def run_model(self, workdir: str, dtype: str = "") -> nn.Module:
        """The model the variables of this method's finished run in ``workdir`` belong to (what a
        distillation loads as its teacher, and the export): the student, unless the run's directory
        holds what defines it."""
        return self.student(dtype)

    def teacher(self, mesh: jax.sharding.Mesh) -> Teacher | None:
        """A frozen model and its variables (replicated on ``mesh``) used inside the step, or None."""
        return None

    def initial_inputs(self) -> Any:
        """What the initial parameters are built from besides the random init, read from files here,
        outside ``jit`` (e.g. a pretrained run's parameters on the host), or None. The trainer passes it
        to the jitted initialisation as an argument, and from there to :meth:`prepare_params`."""
        return None

    def prepare_params(self, params: Any, opt_state: Any, inputs: Any = None) -> Any:
        """The initial parameters, given the freshly initialised optimizer state (e.g. masked) and
        :meth:`initial_inputs`; runs traced."""
        return params

    # Loss ----------------------------------------------------------------------------------------
    def loss(self, params: Any, logits: jax.Array, features: tuple[jax.Array, ...], labels: jax.Array,
             teacher_out: TeacherOut | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(total, {name: term for name in loss_terms}) for one batch, what the step differentiates in
        ``params`` (the student's parameter tree: a method may add terms of the parameters themselves);
        runs inside the jitted step."""
        return distillation_loss(logits, None, labels, None, None, mode="ce")

    def apply_rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        """The rng streams of the student's training forward (``model.apply(..., rngs=...)``), from a key
        the step folds from the data seed and the step number (deterministic, the same after a resume):
        ``"dropout"`` for a ViT with ``model.drop_path_rate > 0`` (stochastic depth), else none, and then
        the step passes no ``rngs`` at all."""
        return {"dropout": key} if self.config.model.get("drop_path_rate", 0.0) > 0 else {}

    # Optimizer -----------------------------------------------------------------------------------
    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        return optimizer_from_config(self.config, steps_per_epoch)

    def learning_rate(self, steps_per_epoch: int) -> optax.Schedule:
        """The schedule the metrics report as ``lr``."""
        return learning_rate_schedule(self.config, steps_per_epoch)

    # End of epoch --------------------------------------------------------------------------------
    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int,
                     probe: Callable[[State], Any] | None = None) -> tuple[State, dict[str, Any]]:
        """Called after the epoch's evaluation; returns the new state and fields for the metrics row.
        ``probe(state)`` gives, under a state's weights, the variance of every Conv / Dense layer's
        output channels over a training batch of the epoch (:func:`alite_jax.activity.output_variance`;
        read only when called), e.g. to find the channels a prune/regrow round left dormant."""
        return state, {}

    # Summary -------------------------------------------------------------------------------------
    def masks(self, state: State) -> Any | None:
        """The pruning masks of ``state`` (a tree like the params, None leaves unpruned), or None."""
        return None

    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        """What the method adds to summary.json (plain data; :mod:`alite_jax.run_dir` writes it)."""
        return dict(distill="ce", structure="dense", per_layer_density={})

    def run_files(self, state: State) -> dict[str, Any]:
        """Files of plain data the method adds to the finished run's directory, {name: JSON-able data}
        (e.g. SPViT's ``architecture.json``)."""
        return {}
