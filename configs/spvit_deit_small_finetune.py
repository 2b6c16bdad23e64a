"""SPViT's fine-tuning of the DeiT-Small architecture a search found (mode "spvit_finetune"):
ziplab/SPViT ``SPViT_DeiT/config/spvit_deit_sm_l30_t32_ft.json`` and, with the ``distill`` switch,
``_ft_dist.json``. What to pass and the recipe: :func:`alite_jax.config.spvit_finetune`.
"""

from alite_jax.config import spvit_finetune


def get_config(arg=None):
    """Switches: ``distill`` (hard distillation, 200 epochs), ``smoke``, or both: ``distill,smoke``."""
    return spvit_finetune("deit_small", arg)
