"""The trainer's configuration: every field with its default, and the ``smoke`` switch.

Config files under ``configs/`` start from :func:`base_config` and change what their experiment needs;
``python -m alite_jax.main --config=configs/<file>.py:smoke`` shrinks any of them to a quick run, and
``--config.<field>=value`` overrides single fields.
"""

from __future__ import annotations

import ml_collections

from alite_jax.data.pipeline import default_config as default_data_config
from alite_jax.data.sources import default_splits


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's CIFAR-10 sparse distillation of hybrid SA-ResNet26 (§4.1, Table 1)."""
    c = ml_collections.ConfigDict()
    c.mode = "distill"                # "teacher" | "baseline" | "distill"
    c.seed = 0                        # parameter init and initial masks (data: data.seed)
    c.num_epochs = 200
    # model: the zoo's options (alite_jax.models.create_model; docs/architectures.md).
    c.model = ml_collections.ConfigDict(dict(
        name="sa_resnet26", variant="hybrid", width=1.0, num_heads=8, kernel_size=7, scaling="paper",
        rel_layout="per_head", impl="auto", dtype="float32"))
    c.data = default_data_config("cifar10", image_size=32, batch_size=100)
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, decay_epochs=(120, 160, 180),
        decay_factor=0.1))
    # sparsity: see alite_jax.sparsity.sparse_learning and docs/sparse_learning.md.
    c.sparsity = ml_collections.ConfigDict(dict(
        density=0.1, structure="irregular", distribution="uniform", prune_rate=0.5, schedule="linear",
        full_rate_steps=20, redistribution="momentum", min_layer_fraction=0.25,
        reset_regrown_momentum=True))
    # distill: eq. 2's terms and weights (alite_jax.distill; docs/losses.md says where each comes from).
    c.distill = ml_collections.ConfigDict(dict(loss="kd+at", alpha=0.1, beta=1000.0, temperature=4.0))
    # teacher.workdir: a finished teacher run; teacher.dtype: its forward's compute dtype in the
    # distillation step ("": as it was trained; "bfloat16" halves its cost on bf16 hardware).
    c.teacher = ml_collections.ConfigDict(dict(workdir="", dtype=""))
    c.baseline_workdir = ""           # optional dense-student run, for the report's baseline column
    c.log_every_steps = 50
    c.checkpoint_max_to_keep = 3
    return c


def teacher_config(dataset: str, num_epochs: int = 200) -> ml_collections.ConfigDict:
    """The ResNet-50 teacher with cross-entropy on ``dataset``."""
    c = base_config()
    c.mode = "teacher"
    c.num_epochs = num_epochs
    c.model = ml_collections.ConfigDict(dict(name="resnet50", width=1.0, dtype="float32"))
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
    """``smoke``: 2 epochs on 512 training and 256 evaluation examples at width 0.25; else unchanged."""
    if not arg:
        return c
    if arg != "smoke":
        raise ValueError(f"unknown config switch {arg!r}: the only one is 'smoke'")
    defaults = default_splits(c.data.dataset)
    c.num_epochs = 2
    c.model.width = 0.25
    c.data.train_split = f"{defaults[0]}[:512]"
    c.data.eval_split = f"{defaults[1]}[:256]"
    c.data.batch_size = c.data.eval_batch_size = 32
    c.optimizer.decay_epochs = (1,)
    c.log_every_steps = 4
    return c
