"""SPViT's search of DeiT-S on ImageNet-1k (mode "spvit_search"; docs/spvit_single_path.md).

ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_sm_l30_t32_search.json``: loss_lambda 3.0, target_flops 3.2 (G
MACs), arc_lr 5e-4, 10 epochs, from the pretrained DeiT-S (``--config.spvit.pretrained_workdir=<dir>``). The
rest of the recipe: :func:`alite_jax.config.spvit_imagenet`.
"""

from alite_jax.config import apply_switch, base_config, spvit_imagenet


def get_config(arg=None):
    c = spvit_imagenet(base_config(), "spvit_search", "deit_small", num_epochs=10)
    c.spvit.update(lambda_=3.0, target_gflops=3.2, arch_lr=5e-4)
    return apply_switch(c, arg)
