"""The ResNet-50 teacher on CIFAR-10 (200 epochs, lr 0.1 decayed x0.1 at 120/160/180)."""

from alite_jax.config import apply_switch, teacher_config


def get_config(arg=None):
    return apply_switch(teacher_config("cifar10"), arg)
