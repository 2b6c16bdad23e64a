"""CIFAR-100, paper Table 1: hybrid SA-ResNet26 sparse-distilled (KD+AT) from ResNet-50 at d = 0.1.

Needs a finished teacher run (configs/teacher_cifar100.py): --config.teacher.workdir=<its workdir>.
"""

from alite_jax.config import apply_switch, base_config


def get_config(arg=None):
    c = base_config()
    c.data.dataset = "cifar100"
    return apply_switch(c, arg)
