"""SPViT's search of DeiT-B on ImageNet-1k (mode "spvit_search"; docs/spvit_single_path.md).

ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_bs_l008_t60_search.json``: loss_lambda 0.08, target_flops 6.0
(G MACs), arc_lr 1e-3, 10 epochs, from the pretrained DeiT-B (``--config.spvit.pretrained_workdir=<dir>``).
The released repository also searched with lambda 0.06 and target 10.0 for 15 epochs
(``spvit_deit_bs_l006_t100_search.json``): ``--config.spvit.lambda_=0.06 --config.spvit.target_gflops=10
--config.num_epochs=15``. The rest of the recipe: :func:`alite_jax.config.spvit_imagenet`.
"""

from alite_jax.config import apply_switch, base_config, spvit_imagenet


def get_config(arg=None):
    c = spvit_imagenet(base_config(), "spvit_search", "deit_base", num_epochs=10)
    c.spvit.update(lambda_=0.08, target_gflops=6.0, arch_lr=1e-3)
    return apply_switch(c, arg)
