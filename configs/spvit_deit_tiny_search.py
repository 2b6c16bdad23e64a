"""SPViT's search of DeiT-Ti on ImageNet-1k (mode "spvit_search"; docs/spvit_single_path.md).

ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_ti_l200_t10_search.json``: loss_lambda 20, target_flops 1.0 (G
MACs), arc_lr 1e-3, 10 epochs, from the pretrained DeiT-Ti (``--config.spvit.pretrained_workdir=<dir>``: a
timm checkpoint converted with python -m alite_jax.convert --from=timm). The rest of the recipe:
:func:`alite_jax.config.spvit_imagenet`. The run writes architecture.json for
configs/spvit_deit_tiny_finetune.py.
"""

from alite_jax.config import apply_switch, base_config, spvit_imagenet


def get_config(arg=None):
    c = spvit_imagenet(base_config(), "spvit_search", "deit_tiny", num_epochs=10)
    c.spvit.update(lambda_=20.0, target_gflops=1.0, arch_lr=1e-3)
    return apply_switch(c, arg)
