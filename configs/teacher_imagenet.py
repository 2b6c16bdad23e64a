"""The ResNet-50 teacher on ImageNet-1k: torchvision's ResNet-50 (ImageNet layout: 7x7 stride-2 stem and
max-pool), 90 epochs of SGD (lr 0.1 x batch / 256, batch 1024, 5 warm-up epochs, cosine decay), random-
resized crop and flip. ``--config.optimizer.schedule=step --config.optimizer.decay_epochs=(30,60,80)
--config.optimizer.warmup_epochs=0`` gives the step schedule of the original recipe instead.

Needs the two ILSVRC2012 tars in TFDS's manual_dir (docs/guide.md, Data). Most users convert a pretrained
torchvision checkpoint instead (python -m alite_jax.convert, docs/guide.md: Pretrained teachers).
"""

from alite_jax.config import apply_switch, imagenet, teacher_config


def get_config(arg=None):
    return apply_switch(imagenet(teacher_config("imagenet2012")), arg)
