"""The trainer's configuration: every field with its default and its allowed values, and the ``smoke``
switch.

Config files under ``configs/`` start from :func:`base_config` and change what their experiment needs;
``python -m alite_jax.main --config=configs/<file>.py:smoke`` shrinks any of them to a quick run, and
``--config.<field>=value`` overrides single fields (every field, the text fields without a default
included). :func:`check_ranges` refuses a numeric field outside its meaning (:data:`FIELD_RANGES`, and the
ranges of the methods' sections) before anything is read or compiled.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from alite_jax.data.pipeline import default_config as default_data_config
from alite_jax.data.sources import default_splits
from alite_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's CIFAR-10 sparse distillation of hybrid SA-ResNet26 (§4.1, Table 1)."""
    c = ml_collections.ConfigDict()
    c.mode = "distill"                # a mode registered in alite_jax.methods (METHODS)
    c.seed = 0                        # parameter init and initial masks (data: data.seed)
    c.num_epochs = 200
    # Before each evaluation, BatchNorm's running statistics are recomputed from this many training
    # batches under the current weights (alite_jax.batch_norm_stats; 0: keep the running averages).
    c.bn_batches = 8
    # A layer whose parameter norm (or BatchNorm statistics' scale) grows more than this factor in one
    # epoch is named in a warning line (alite_jax.health; 0: no check). Non-finite values always stop.
    c.health_factor = 10.0
    # model: the zoo's options (alite_jax.models.create_model; docs/architectures.md).
    c.model = ml_collections.ConfigDict(dict(
        name="sa_resnet26", layout="cifar", variant="hybrid", width=1.0, num_heads=8, kernel_size=7,
        scaling="paper", rel_layout="per_head", impl="auto", dtype="float32"))
    c.data = default_data_config("cifar10", image_size=32, batch_size=100)
    # optimizer: name "sgd" (momentum, coupled weight decay: the paper's) or "adamw" (DeiT's; momentum and
    # nesterov unused); SPViT's methods always use AdamW.
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.1, lr_batch=0, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="step",
        decay_epochs=(120, 160, 180), decay_factor=0.1, warmup_epochs=0, min_lr=0.0))
    # The sections of the registered methods, with their defaults (alite_jax.methods: sparsity, distill
    # and teacher for AttentionLite, spvit for SPViT; the fields are described in docs/guide.md).
    from alite_jax.methods import registered_sections

    for name, defaults in registered_sections().items():
        c[name] = ml_collections.ConfigDict(dict(defaults))
    c.baseline_workdir = ""           # optional dense-student run, for the report's baseline column
    c.log_every_steps = 50
    c.checkpoint_max_to_keep = 3
    return c


def teacher_config(dataset: str, num_epochs: int = 200) -> ml_collections.ConfigDict:
    """The ResNet-50 teacher with cross-entropy on ``dataset``."""
    c = base_config()
    c.mode = "teacher"
    c.num_epochs = num_epochs
    c.model = ml_collections.ConfigDict(dict(name="resnet50", layout="cifar", width=1.0, dtype="float32"))
    c.data.dataset = dataset
    return c


def tiny_imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny-ImageNet per §4.1: 64x64, batch 32, 100 epochs, lr decays at 1/2 and 3/4 of training."""
    c.data.dataset = "tiny_imagenet"
    c.data.image_size = 64
    c.data.batch_size = c.data.eval_batch_size = 32
    c.num_epochs = 100
    c.optimizer.decay_epochs = (50, 75)
    c.log_every_steps = 200
    return c


def imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ImageNet-1k (imagenet2012) at 224x224 in the ImageNet layout: the ResNet recipe of Goyal et al.
    (random-resized crop and flip; resize 256 + centre crop 224 at evaluation; ImageNet's normalisation,
    as torchvision's pretrained teachers expect), global batch 1024 with lr 0.1 x batch / 256, 5 warm-up
    epochs and a cosine decay over 90 epochs, 16 grain workers per process."""
    c.data.dataset = "imagenet2012"
    c.data.image_size = 224
    c.data.batch_size, c.data.eval_batch_size = 1024, 1000
    c.data.augment, c.data.normalization, c.data.workers = "imagenet", "imagenet", 16
    c.model.layout = "imagenet"
    c.num_epochs = 90
    c.optimizer.update(lr=0.1, lr_batch=256, schedule="cosine", warmup_epochs=5, weight_decay=1e-4)
    c.log_every_steps = 100
    return c


def spvit_imagenet(c: ml_collections.ConfigDict, mode: str, model: str, num_epochs: int
                   ) -> ml_collections.ConfigDict:
    """SPViT's recipe on ImageNet-1k (ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_*.json`` and
    ``params.py``): ``model`` (a DeiT) at 224, DeiT's augmentation (RandAugment, random erasing, Mixup 0.8,
    CutMix 1.0, label smoothing 0.1), drop path 0.1, global batch 1024 (256 x 4 GPUs for DeiT-Ti, 128 x 8
    for S and B), AdamW with weight decay 0.05 at lr 5e-5 x batch / 512, no warm-up, timm's cosine schedule
    from there to min_lr 1e-5 (the searches set min_lr 1e-4, the scaled lr itself: constant in effect,
    and so constant here). The dense DeiT it starts from: ``--config.spvit.pretrained_workdir``."""
    c = imagenet(c)
    c.mode = mode
    c.model = ml_collections.ConfigDict(dict(name=model, dtype="float32", drop_path_rate=0.1))
    c.data.augment = "deit"
    c.data.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    c.num_epochs = num_epochs
    c.optimizer.update(lr=5e-5, lr_batch=512, schedule="step", decay_epochs=(), warmup_epochs=0,
                       weight_decay=0.05)
    if mode == "spvit_finetune":
        c.optimizer.update(schedule="cosine", min_lr=1e-5)
    c.sparsity.density = 1.0  # AttentionLite's sparse learning on top: --config.sparsity.density=<d>
    return c


def spvit_finetune(model: str, arg: str | None) -> ml_collections.ConfigDict:
    """SPViT's fine-tuning of ``model``'s found architecture on ImageNet (:func:`spvit_imagenet`): 130
    epochs (``config/spvit_deit_*_ft.json``), or with the ``distill`` switch 200 epochs of DeiT's hard
    distillation from ``teacher.workdir`` (``_ft_dist.json``; SPViT's teacher RegNetY-16GF is not in the
    zoo: e.g. torchvision's ResNet-50 converted with python -m alite_jax.convert); ``arg``: "distill",
    "smoke" or "distill,smoke". Pass the search's run directory (or its architecture.json) and the dense
    DeiT it started from: ``--config.spvit.architecture=<dir> --config.spvit.pretrained_workdir=<dir>``;
    ``--config.sparsity.density=<d>`` adds AttentionLite's sparse learning on top."""
    switches = set((arg or "").split(",")) - {""}
    c = spvit_imagenet(base_config(), "spvit_finetune", model, num_epochs=130)
    if "distill" in switches:
        c.spvit.distill = "hard"
        c.num_epochs = 200
    return apply_switch(c, ",".join(sorted(switches - {"distill"})) or None)


def digits_demo(c: ml_collections.ConfigDict, num_epochs: int = 30) -> ml_collections.ConfigDict:
    """The method in miniature: scikit-learn's embedded 8x8 digits (no download) at width 0.25, batch 64
    (22 steps per epoch), lr 0.05 decayed x0.1 at 1/2 and 3/4 of ``num_epochs`` (the demo config, the
    ablation benchmark and the notebook's tiny run)."""
    c.num_epochs = num_epochs
    c.data.dataset = "digits"
    c.data.image_size = 8
    c.data.batch_size = c.data.eval_batch_size = 64
    c.optimizer.decay_epochs = (num_epochs // 2, num_epochs * 3 // 4)
    c.optimizer.lr = 0.05  # lr 0.1 diverges for these narrow nets on so few steps
    c.model.width = 0.25
    c.log_every_steps = 22  # once per epoch of the 1,438 training digits
    return c


def apply_switch(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """``smoke``: 2 epochs on 512 training and 256 evaluation examples at width 0.25, batch 32, no
    warm-up, at most 2 data workers; else unchanged."""
    if not arg:
        return c
    if arg != "smoke":
        raise ConfigError(f"unknown config switch {arg!r}: the only one is 'smoke'")
    defaults = default_splits(c.data.dataset)
    c.num_epochs = 2
    c.model.width = 0.25
    c.data.train_split = f"{defaults[0]}[:512]"
    c.data.eval_split = f"{defaults[1]}[:256]"
    c.data.batch_size = c.data.eval_batch_size = 32
    c.optimizer.decay_epochs = (1,)
    c.optimizer.warmup_epochs = 0
    c.data.workers = min(c.data.workers, 2)
    c.log_every_steps = 4
    return c


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field may take: an interval (each bound open or closed), integers or any
    number, and what the field means (for the error message)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    meaning: str = ""

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.high == math.inf:
            return f"{kind}{'>' if self.low_open else '>='} {self.low:g}"
        return (f"{kind}in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


def _at_least(low: float, meaning: str, integer: bool = True) -> Range:
    return Range(low=low, integer=integer, meaning=meaning)


def _above(low: float, meaning: str) -> Range:
    return Range(low=low, low_open=True, meaning=meaning)


def _fraction(meaning: str, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(0, 1, low_open=low_open, high_open=high_open, meaning=meaning)


# Every numeric field of the trainer's own sections of base_config() (a tuple field: each of its
# elements); a method's sections bring their ranges (Method.field_ranges). A test checks that every
# numeric field of the config gets a range.
FIELD_RANGES: dict[str, Range] = {
    "seed": _at_least(0, "the seed of the initial parameters and masks"),
    "num_epochs": _at_least(1, "the number of training epochs"),
    "bn_batches": _at_least(0, "training batches BatchNorm's statistics are recomputed from; 0: off"),
    "health_factor": _at_least(0, "the growth in one epoch that a warning names; 0: no check",
                               integer=False),
    "log_every_steps": _at_least(1, "steps between progress lines"),
    "checkpoint_max_to_keep": _at_least(1, "how many epoch checkpoints are kept"),
    "model.width": _above(0, "the channel multiplier"),
    "model.num_heads": _at_least(1, "attention heads per layer"),
    "model.kernel_size": _at_least(1, "the attention neighbourhood's side"),
    "data.image_size": _at_least(8, "the side images are resized to"),
    "data.batch_size": _at_least(1, "the global training batch"),
    "data.eval_batch_size": _at_least(1, "the global evaluation batch"),
    "data.seed": _at_least(0, "the seed of the data order and augmentation"),
    "data.data_shards": _at_least(0, "shards the data is cut into; 0: one per process"),
    "data.workers": _at_least(0, "grain worker processes; 0: none"),
    "data.crop_ratio": _fraction("the evaluation's centre crop ratio", low_open=True),
    "data.mixup_alpha": _at_least(0, "Mixup's Beta parameter; 0: off", integer=False),
    "data.cutmix_alpha": _at_least(0, "CutMix's Beta parameter; 0: off", integer=False),
    "data.mix_prob": _fraction("the probability a batch is mixed"),
    "data.mix_switch_prob": _fraction("the probability of CutMix instead of Mixup"),
    "data.label_smoothing": _fraction("label smoothing", high_open=True),
    "optimizer.lr": _above(0, "the peak learning rate (at batch optimizer.lr_batch, if set)"),
    "optimizer.lr_batch": _at_least(0, "the batch optimizer.lr is given for; 0: no scaling"),
    "optimizer.warmup_epochs": _at_least(0, "epochs of linear lr warm-up from 0"),
    "optimizer.min_lr": _at_least(0, "where the cosine schedule ends", integer=False),
    "optimizer.momentum": _fraction("SGD momentum", high_open=True),
    "optimizer.weight_decay": _at_least(0, "the L2 weight decay", integer=False),
    "optimizer.decay_epochs": _at_least(0, "epochs at which the lr is multiplied by decay_factor"),
    "optimizer.decay_factor": _fraction("what the lr is multiplied by at each decay epoch", low_open=True),
}


def all_field_ranges() -> dict[str, Range]:
    """:data:`FIELD_RANGES` and the ranges of every registered method's config sections."""
    from alite_jax.methods import registered_ranges

    return {**FIELD_RANGES, **registered_ranges()}


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming every numeric field of ``config`` outside its range.

    The ranges are :data:`FIELD_RANGES` (the trainer's fields) and those of every registered method's
    sections (:attr:`alite_jax.methods.Method.field_ranges`). Fields a config does not have (a teacher's
    model has no attention options) are skipped; the check does not depend on the mode, so a
    distillation field is checked in a teacher run too.
    """
    problems = []
    for name, allowed in all_field_ranges().items():
        *sections, key = name.split(".")
        holder = config
        for section in sections:
            holder = holder.get(section) if holder is not None else None
        if holder is None or key not in holder:
            continue
        value = holder[key]
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not all(v in allowed for v in values):
            what = f" ({allowed.meaning})" if allowed.meaning else ""
            each = " in every element" if isinstance(value, (tuple, list)) else ""
            problems.append(f"config.{name} must be {allowed}{what}{each}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))
