"""SPViT's fine-tuning of the DeiT-Small architecture a search found (mode "spvit_finetune";
docs/spvit_single_path.md).

ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_sm_l30_t32_ft.json`` (130 epochs) and ``_ft_dist.json`` (200
epochs, hard distillation from a CNN teacher). Give the search run (or its architecture.json) and the
dense DeiT it started from::

    --config.spvit.architecture=<search workdir> --config.spvit.pretrained_workdir=<dense DeiT run>

With distillation (the ``distill`` switch: 200 epochs, DeiT's hard distillation with weight 0.5, no
distillation token), also ``--config.teacher.workdir=<teacher run>``: a finished run of this zoo on
ImageNet (e.g. torchvision's ResNet-50 converted with python -m alite_jax.convert; SPViT's RegNetY-16GF
is not in the zoo). ``--config.sparsity.density=<d>`` adds AttentionLite's sparse learning on top.
The rest of the recipe: :func:`alite_jax.config.spvit_imagenet`.
"""

from alite_jax.config import apply_switch, base_config, spvit_imagenet


def get_config(arg=None):
    """Switches: ``distill`` (hard distillation, 200 epochs), ``smoke``, or both as ``distill,smoke``."""
    switches = set((arg or "").split(",")) - {""}
    c = spvit_imagenet(base_config(), "spvit_finetune", "deit_small", num_epochs=130)
    if "distill" in switches:
        c.spvit.distill = "hard"
        c.num_epochs = 200
    return apply_switch(c, ",".join(sorted(switches - {"distill"})) or None)
