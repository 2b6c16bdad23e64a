"""Models: the local self-attention layer, the ResNet zoo (teacher and students) and ViT/DeiT."""

from alite_jax.models.local_attention import IMPLS, LocalSelfAttention, register_impl
from alite_jax.models.resnet import LAYOUTS, ResNet, check_image_size
from alite_jax.models.vit import VisionTransformer, check_vit_image_size
from alite_jax.models.zoo import (COMPUTE_DTYPES, MODEL_NAMES, STUDENTS, VARIANTS, VIT_OPTIONS, VITS, ZOO,
                                  abstract_variables, check_model_image_size, compute_dtype, count_params,
                                  create_model, create_vit, init_model, model_from_config, summary)

__all__ = [
    "COMPUTE_DTYPES", "IMPLS", "LAYOUTS", "LocalSelfAttention", "MODEL_NAMES", "ResNet", "STUDENTS",
    "VARIANTS", "VIT_OPTIONS", "VITS", "VisionTransformer", "ZOO", "abstract_variables", "check_image_size",
    "check_model_image_size", "check_vit_image_size", "compute_dtype", "count_params", "create_model",
    "create_vit", "init_model", "model_from_config", "register_impl", "summary",
]
