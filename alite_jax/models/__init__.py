"""Models: the local self-attention layer and the ResNet zoo (teacher and students)."""

from alite_jax.models.local_attention import IMPLS, LocalSelfAttention, register_impl
from alite_jax.models.resnet import LAYOUTS, ResNet, check_image_size
from alite_jax.models.zoo import (COMPUTE_DTYPES, MODEL_NAMES, STUDENTS, VARIANTS, ZOO, abstract_variables,
                                  compute_dtype, count_params, create_model, init_model, model_from_config,
                                  summary)

__all__ = [
    "COMPUTE_DTYPES", "IMPLS", "LAYOUTS", "LocalSelfAttention", "MODEL_NAMES", "ResNet", "STUDENTS",
    "VARIANTS", "ZOO", "abstract_variables", "check_image_size", "compute_dtype", "count_params",
    "create_model", "init_model", "model_from_config", "register_impl", "summary",
]
