"""SPViT's search of DeiT-Ti on ImageNet-1k (mode "spvit_search"; docs/spvit_single_path.md).

From ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_ti_l200_t10_search.json`` and ``params.py``: the
supernet starts from the pretrained DeiT-Ti (``"resume": deit_tiny_patch16_224``: here
``--config.spvit.pretrained_workdir=<dir>``, a timm checkpoint converted with python -m alite_jax.convert),
loss_lambda 20, target_flops 1.0 (G MACs), arc_lr 1e-3, lr 5e-5 scaled x batch / 512 (DeiT's rule), no
warm-up, batch 256 x 4 GPUs = 1024, AdamW weight decay 0.05, DeiT's augmentation (RandAugment, random
erasing, Mixup 0.8, CutMix 1.0, label smoothing 0.1). The released search ran 10 epochs. The public
config's cosine schedule from 5e-5 with min_lr 1e-4 is constant in effect; here the lr is constant (step
schedule with no decay). Drop path 0.1 and model EMA are not reproduced.
"""

import ml_collections

from alite_jax.config import apply_switch, base_config, imagenet


def get_config(arg=None):
    c = imagenet(base_config())
    c.mode = "spvit_search"
    c.model = ml_collections.ConfigDict(dict(name="deit_tiny", dtype="float32"))
    c.data.augment = "deit"
    c.data.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    c.num_epochs = 10
    c.optimizer.update(lr=5e-5, lr_batch=512, schedule="step", decay_epochs=(), warmup_epochs=0,
                       weight_decay=0.05)
    c.spvit.update(lambda_=20.0, target_gflops=1.0, arch_lr=1e-3)
    return apply_switch(c, arg)
