"""The optimizers and learning-rate schedules a method builds from ``config.optimizer``: SGD with momentum
(the paper's) and AdamW (DeiT's and SPViT's), on a step or cosine schedule with linear warm-up."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from alite_jax.errors import ConfigError


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
