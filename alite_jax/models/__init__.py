"""Models: the local self-attention layer and the ResNet zoo (teacher and students)."""

from alite_jax.models import attention_pallas  # noqa: F401  (registers impl="pallas")
from alite_jax.models.attention import IMPLS, LocalSelfAttention, register_impl
from alite_jax.models.resnet import ResNet, check_image_size
from alite_jax.models.zoo import (MODEL_NAMES, STUDENTS, VARIANTS, ZOO, abstract_variables, count_params,
                                  create_model, init_model, summary)

__all__ = [
    "IMPLS", "LocalSelfAttention", "register_impl", "ResNet", "check_image_size", "MODEL_NAMES",
    "STUDENTS", "VARIANTS", "ZOO", "abstract_variables", "count_params", "create_model", "init_model",
    "summary",
]
