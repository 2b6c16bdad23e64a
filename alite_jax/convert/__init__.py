"""Pretrained teachers from the formats people have: torchvision ResNet and timm DeiT checkpoints
(``torch.save`` zip files, ``.safetensors``) read without torch and converted to this zoo's variables,
written as a run directory a distillation takes as ``teacher.workdir`` (``python -m alite_jax.convert``;
docs/convert.md).

This package may import :mod:`alite_jax.models` and :mod:`alite_jax.run_dir`; nothing in models,
sparsity or data imports it.
"""

from alite_jax.convert.readers import (CheckpointError, file_format, read_safetensors, read_state_dict,
                                       read_torch_zip, unwrap_state_dict)
from alite_jax.convert.torchvision import (ARCHS, LAYOUTS, check_batchnorm_conventions, create_resnet,
                                           expected_state_dict_shapes, torchvision_layout,
                                           torchvision_to_variables)
from alite_jax.convert.teacher_run import (SOURCES, convert_checkpoint, evaluate_teacher, teacher_run_config,
                                           write_teacher_run)
from alite_jax.convert.timm import ARCHS as TIMM_ARCHS
from alite_jax.convert.timm import create_vit, timm_layout, timm_to_variables
from alite_jax.convert.timm import expected_state_dict_shapes as timm_state_dict_shapes
