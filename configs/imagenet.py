"""ImageNet-1k: hybrid SA-ResNet26 (ImageNet layout, as in SASA) sparse-distilled (KD+AT) at d = 0.25 from
a ResNet-50 teacher, 224x224, 90 epochs, batch 1024 (lr 0.1 x batch / 256, 5 warm-up epochs, cosine).

The paper stops at Tiny-ImageNet; this carries its Tiny-ImageNet setting (d = 0.25) to ImageNet with the
standard ResNet recipe. The teacher is a finished run directory at --config.teacher.workdir=<dir>: a
torchvision checkpoint converted with python -m alite_jax.convert (docs/guide.md: Pretrained teachers),
or a run of configs/teacher_imagenet.py.
"""

from alite_jax.config import apply_switch, base_config, imagenet


def get_config(arg=None):
    c = imagenet(base_config())
    c.sparsity.density = 0.25
    return apply_switch(c, arg)
