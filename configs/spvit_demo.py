"""SPViT in miniature: search -> extract -> fine-tune of a tiny DeiT on the embedded 8x8 digits, a few
minutes on 2 CPU cores (docs/spvit_single_path.md).

Five phases run in order in subfolders of the workdir:

* ``teacher``: the demo's ResNet-50 (width 0.25, 30 epochs; configs/demo.py), the CNN teacher;
* ``dense``: the dense miniature DeiT (dim 32, depth 3, 2 heads, patch 2: 16 patches; 0.663 M MACs by
  SPViT's count) trained with AdamW for 100 epochs, the "pretrained" model SPViT starts from;
* ``search``: the supernet from ``dense``'s weights, searched for 20 epochs towards 0.25 M MACs; it writes
  architecture.json;
* ``finetune``: the found architecture from ``dense``'s weights, 50 epochs of cross-entropy with label
  smoothing 0.1;
* ``finetune_kd_sparse``: the same with DeiT's hard distillation from ``teacher`` (weight 0.5) and
  AttentionLite's sparse learning on top (irregular, density 0.5): both papers' compressions in one run.

lambda is large because the MACs are tiny: (T - F / 1e9)^2 is of order 1e-7 here, and 1e7 gives the
term the pull SPViT's lambda 20 gives at DeiT-Ti's (1.0 - 1.25)^2.
"""

import ml_collections

from alite_jax.config import apply_switch, base_config, digits_demo, teacher_config

DEIT = dict(name="deit_tiny", dtype="float32", patch_size=2, dim=32, depth=3, num_heads=2)


def deit_phase(mode: str, num_epochs: int, lr: float) -> ml_collections.ConfigDict:
    """A phase on the miniature DeiT: the digits at 8x8, batch 64, AdamW (weight decay 0.05) at ``lr`` x
    batch / 64 (DeiT's linear rule), cosine."""
    c = digits_demo(base_config(), num_epochs=num_epochs)
    c.mode = mode
    c.model = ml_collections.ConfigDict(DEIT)
    c.optimizer.update(name="adamw", lr=lr, lr_batch=64, schedule="cosine", weight_decay=0.05,
                       decay_epochs=())
    c.sparsity.density = 1.0
    return c


def get_config(arg=None):
    """``spvit_demo.py:smoke``: every phase shrunk to 2 epochs on 512 training digits, a quick check."""
    teacher = digits_demo(teacher_config("digits"))
    teacher.optimizer.lr = 0.02  # as configs/demo.py
    dense = deit_phase("baseline", 100, 5e-3)
    dense.optimizer.warmup_epochs = 5
    search = deit_phase("spvit_search", 20, 1e-3)
    search.optimizer.schedule = "step"  # constant, as SPViT's search
    search.spvit.update(pretrained_workdir="dense", lambda_=1e7, target_gflops=0.25e-3, arch_lr=5e-2)
    finetune = deit_phase("spvit_finetune", 50, 2e-3)
    finetune.data.label_smoothing = 0.1
    finetune.spvit.update(pretrained_workdir="dense", architecture="search")
    sparse = finetune.copy_and_resolve_references()
    sparse.spvit.distill = "hard"
    sparse.teacher.workdir = "teacher"
    sparse.sparsity.update(density=0.5, structure="irregular")
    phases = dict(teacher=teacher, dense=dense, search=search, finetune=finetune, finetune_kd_sparse=sparse)
    c = ml_collections.ConfigDict()
    c.phases = ml_collections.ConfigDict({k: apply_switch(v, arg) for k, v in phases.items()})
    c.phase_order = tuple(phases)
    return c
