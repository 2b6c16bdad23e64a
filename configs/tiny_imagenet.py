"""Tiny-ImageNet, paper Table 1: hybrid SA-ResNet26 sparse-distilled (KD+AT) at d = 0.25, 64x64, batch 32,
100 epochs with lr decays at epochs 50 and 75.

Needs tiny-imagenet-200.zip (see docs/guide.md, Data) and a finished teacher run
(configs/teacher_tiny_imagenet.py): --config.teacher.workdir=<its workdir>.
"""

from alite_jax.config import apply_switch, base_config, tiny_imagenet


def get_config(arg=None):
    c = tiny_imagenet(base_config())
    c.sparsity.density = 0.25
    return apply_switch(c, arg)
