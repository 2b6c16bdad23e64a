"""SPViT's search in miniature: a tiny DeiT (dim 32, depth 3, 2 heads, patch 4) on the embedded digits at
16x16, about a minute on 2 CPU cores (mode "spvit_search"; docs/spvit_single_path.md).

The supernet starts from random weights (``spvit.pretrained_workdir`` empty; point it at a trained tiny
DeiT run of the same shapes to start from that). The dense miniature costs 0.67 M MACs (SPViT's count);
the target is 0.25 M, so the FLOPs loss has to drop MSA blocks to convolutions and FFN units. lambda is
large because the MACs are tiny: (T - F / 1e9)^2 is of order 1e-8 here, and 1e7 gives the term the
pull SPViT's lambda 20 gives at DeiT-Ti's (1.0 - 1.25)^2.
"""

import ml_collections

from alite_jax.config import apply_switch, base_config


def get_config(arg=None):
    """``spvit_demo.py:smoke``: 2 epochs on 512 training digits."""
    c = base_config()
    c.mode = "spvit_search"
    c.model = ml_collections.ConfigDict(dict(name="deit_tiny", dtype="float32", patch_size=4, dim=32, depth=3,
                                             num_heads=2))
    c.data.dataset = "digits"
    c.data.image_size = 16
    c.data.augment = "none"
    c.data.batch_size = c.data.eval_batch_size = 64
    c.num_epochs = 8
    c.optimizer.update(lr=1e-3, lr_batch=0, schedule="step", decay_epochs=(), warmup_epochs=0,
                       weight_decay=0.05)
    c.spvit.update(lambda_=1e7, target_gflops=0.25e-3, arch_lr=5e-2)
    c.log_every_steps = 22
    return apply_switch(c, arg)
