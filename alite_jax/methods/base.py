"""The seam between the trainer and what it trains: a :class:`Method`.

The loop in :mod:`alite_jax.train` knows steps, evaluation, checkpoints and preemption, and nothing of
teachers, masks or loss terms. Everything that differs between what it runs is a method's:

* the models it needs: :meth:`Method.student` (trained) and :meth:`Method.teacher` (a frozen model and
  its variables, or None);
* the loss and what it reports: :meth:`Method.loss` and :attr:`Method.loss_terms` (a loss that reads the
  parameters too, e.g. a FLOPs term of gate logits: :meth:`Method.step_loss`);
* the random streams the student's training forward draws (sampled gates, drop path):
  :meth:`Method.apply_rngs`;
* the optimizer (and its parameter groups): :meth:`Method.optimizer`, :meth:`Method.prepare_params`;
* what happens at the end of an epoch, after evaluation: :meth:`Method.end_of_epoch` (prune/regrow for
  sparse distillation; nothing for a teacher);
* what it adds to the run's summary and directory: :meth:`Method.summary_fields`, :meth:`Method.run_files`;
* the checks of its own settings and inputs, before anything is written or compiled:
  :meth:`Method.check`, :meth:`Method.check_inputs`.

A method is built from the run's config and the number of classes; the only thing it keeps is the
teacher model it built, for the summary. The state is the loop's plain tree (params, batch_stats,
opt_state, step, epoch_sums).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import optax

from alite_jax.distill import distillation_loss
from alite_jax.errors import ConfigError
from alite_jax.models import model_from_config

State = dict[str, Any]
Teacher = tuple[nn.Module, Any]  # (model, variables); None when the method needs none


SCHEDULES = ("step", "cosine")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``optimizer.lr``, scaled linearly with the batch when ``optimizer.lr_batch`` is set (Goyal et al.,
    "Accurate, Large Minibatch SGD": lr 0.1 x batch / 256 for ResNet-50 on ImageNet)."""
    opt = config.optimizer
    reference = opt.get("lr_batch", 0)
    return opt.lr * config.data.batch_size / reference if reference else opt.lr


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate per step: ``optimizer.schedule`` "step" (the peak lr, multiplied by decay_factor
    at each epoch of decay_epochs: paper §4.1) or "cosine" (cosine decay to ``optimizer.min_lr``, 0 by
    default, at the last epoch; timm's and DeiT's min_lr, not scaled with the batch), after
    ``optimizer.warmup_epochs`` of linear warm-up from 0 (0: none)."""
    opt = config.optimizer
    if opt.get("schedule", "step") not in SCHEDULES:
        raise ConfigError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    peak, warmup = peak_learning_rate(config), int(opt.get("warmup_epochs", 0) * steps_per_epoch)
    if opt.get("schedule", "step") == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, config.num_epochs * steps_per_epoch - warmup),
                                           alpha=opt.get("min_lr", 0.0) / peak)
    else:
        main = optax.piecewise_constant_schedule(
            peak, {int(e) * steps_per_epoch - warmup: opt.decay_factor for e in opt.decay_epochs})
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


OPTIMIZERS = ("sgd", "adamw")


def sgd(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, PyTorch-style) weight decay, on the config's schedule."""
    opt = config.optimizer
    return optax.chain(optax.add_decayed_weights(opt.weight_decay),
                       optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=opt.momentum,
                                 nesterov=opt.get("nesterov", False)))


def decay_mask(params: Any) -> Any:
    """Weight decay on parameters of rank >= 2 (kernels, embeddings), none on biases and norms: timm's
    AdamW convention (``param_groups_weight_decay``), which DeiT and SPViT train with."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def adamw(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay ``optimizer.weight_decay`` on :func:`decay_mask`) on the config's
    schedule: DeiT's optimizer."""
    return optax.adamw(learning_rate_schedule(config, steps_per_epoch),
                       weight_decay=config.optimizer.weight_decay, mask=decay_mask)


def optimizer_from_config(config: ml_collections.ConfigDict, steps_per_epoch: int
                          ) -> optax.GradientTransformation:
    """``optimizer.name``: "sgd" (the paper's, the default) or "adamw"."""
    name = config.optimizer.get("name", "sgd")
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
    return (adamw if name == "adamw" else sgd)(config, steps_per_epoch)


class Method:
    """Supervised training of ``config.model`` with cross-entropy: the teacher and the dense baseline.

    Subclasses override what differs (see the module docstring)."""

    loss_terms: tuple[str, ...] = ("ce", "total")

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
    def student(self) -> nn.Module:
        """The model this method trains."""
        return model_from_config(self.config.model, self.num_classes, image_size=self.config.data.image_size)

    def teacher(self, mesh: jax.sharding.Mesh) -> Teacher | None:
        """A frozen model and its variables (replicated on ``mesh``) used inside the step, or None."""
        return None

    def read_inputs(self) -> None:
        """Reads the files the initial state is built from (e.g. pretrained weights), called before the
        state is built: :meth:`prepare_params` runs traced, where no file can be read."""

    # Loss ----------------------------------------------------------------------------------------
    def loss(self, logits: jax.Array, features: tuple[jax.Array, ...], labels: jax.Array,
             teacher_out: tuple[jax.Array, tuple[jax.Array, ...]] | None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(total, {name: term for name in loss_terms}) for one batch; runs inside the jitted step."""
        return distillation_loss(logits, None, labels, None, None, mode="ce")

    def step_loss(self, params: Any, logits: jax.Array, features: tuple[jax.Array, ...], labels: jax.Array,
                  teacher_out: tuple[jax.Array, tuple[jax.Array, ...]] | None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """What the step differentiates: :meth:`loss`, plus terms of the parameters themselves for a method
        that overrides this (``params`` is the student's parameter tree being differentiated)."""
        return self.loss(logits, features, labels, teacher_out)

    def apply_rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        """The rng streams of the student's training forward (``model.apply(..., rngs=...)``), from a key
        the step folds from the data seed and the step number (deterministic, the same after a resume):
        ``"dropout"`` for a ViT with ``model.drop_path_rate > 0`` (stochastic depth), else none, and then
        the step passes no ``rngs`` at all."""
        return {"dropout": key} if self.config.model.get("drop_path_rate", 0.0) > 0 else {}

    # Optimizer -----------------------------------------------------------------------------------
    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        return optimizer_from_config(self.config, steps_per_epoch)

    def prepare_params(self, params: Any, opt_state: Any) -> Any:
        """The initial parameters, given the freshly initialised optimizer state (e.g. masked)."""
        return params

    def learning_rate(self, steps_per_epoch: int) -> optax.Schedule:
        """The schedule the metrics report as ``lr``."""
        return learning_rate_schedule(self.config, steps_per_epoch)

    # End of epoch --------------------------------------------------------------------------------
    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int) -> tuple[State, dict[str, Any]]:
        """Called after the epoch's evaluation; returns the new state and fields for the metrics row."""
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
