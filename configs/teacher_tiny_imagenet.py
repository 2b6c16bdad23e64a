"""The ResNet-50 teacher on Tiny-ImageNet (64x64, batch 32, 100 epochs, lr decays at 50 and 75)."""

from alite_jax.config import apply_switch, teacher_config, tiny_imagenet


def get_config(arg=None):
    return apply_switch(tiny_imagenet(teacher_config("tiny_imagenet")), arg)
