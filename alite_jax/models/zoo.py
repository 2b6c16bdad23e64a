"""The model zoo: ``create_model(name, num_classes, *, layout, **options)`` and parameter counting.

| name        | blocks     | spatial layer            | params: CIFAR, 10 classes | ImageNet, 1000 classes |
|-------------|------------|--------------------------|---------------------------|------------------------|
| resnet50    | 3, 4, 6, 3 | 3x3 conv (the teacher)   | 23,520,842                | 25,557,032             |
| sa_resnet26 | 1, 2, 4, 1 | 7x7 local self-attention | 8,306,442 (hybrid)        | 10,342,632 (hybrid)    |
| sa_resnet38 | 2, 3, 5, 2 | 7x7 local self-attention | 12,154,442 (hybrid)       | 14,190,632 (hybrid)    |
| sa_resnet50 | 3, 4, 6, 3 | 7x7 local self-attention | 16,002,442 (hybrid)       | 18,038,632 (hybrid)    |

The counts are trainable parameters (BatchNorm scale and bias, not its running statistics) at width 1,
pinned by tests/test_models.py; docs/architectures.md says where each published count comes from.

Vision Transformers (:mod:`.vit`; SPViT prunes them), 224x224 images, patch 16, depth 12, MLP ratio 4:

| name       | dim | heads | params, 1000 classes (DeiT's published counts; tests/test_vit.py) |
|------------|-----|-------|--------------------------------------------------------------------|
| deit_tiny  | 192 | 3     | 5,717,416                                                          |
| deit_small | 384 | 6     | 22,050,664                                                         |
| deit_base  | 768 | 12    | 86,567,656                                                         |
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.models.local_attention import check_attention_options
from alite_jax.models.resnet import (STAGE_WIDTHS, ResNet, attention_spatial, attention_stem,
                                     check_image_size, check_layout, scaled)
from alite_jax.models.vit import VisionTransformer, check_drop_path_rate, check_vit_image_size

STAGE_SIZES = {
    "resnet50": (3, 4, 6, 3),
    "sa_resnet26": (1, 2, 4, 1),
    "sa_resnet38": (2, 3, 5, 2),
    "sa_resnet50": (3, 4, 6, 3),
}
# DeiT (facebookresearch/deit models.py; timm's deit_*_patch16_224): width D and heads; depth 12, patch
# 16, MLP ratio 4, 224x224 images by default.
VIT_CONFIGS = {
    "deit_tiny": dict(dim=192, num_heads=3),
    "deit_small": dict(dim=384, num_heads=6),
    "deit_base": dict(dim=768, num_heads=12),
}
VIT_DEFAULTS = dict(image_size=224, patch_size=16, depth=12, mlp_ratio=4.0, drop_path_rate=0.0)
VIT_OPTIONS = ("image_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio", "drop_path_rate")
VITS = tuple(VIT_CONFIGS)
MODEL_NAMES = tuple(STAGE_SIZES) + VITS
STUDENTS = ("sa_resnet26", "sa_resnet38", "sa_resnet50")
VARIANTS = ("hybrid", "homogeneous")
ATTENTION_DEFAULTS = dict(num_heads=8, kernel_size=7, scaling="paper", rel_layout="per_head",
                          impl="auto")


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: Any) -> jnp.dtype:
    """The computation dtype called ``name`` ("float32" or "bfloat16"); ValueError names the choices."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {COMPUTE_DTYPES} (parameters "
                         f"always stay float32)")
    return dtype


def create_vit(name: str, num_classes: int, *, dtype: Any = jnp.float32, **options: Any) -> VisionTransformer:
    """A ViT of the zoo: ``name`` one of :data:`VITS`; ``options`` override :data:`VIT_OPTIONS`
    (``image_size`` 224, ``patch_size`` 16, ``dim``, ``depth`` 12, ``num_heads``, ``mlp_ratio`` 4,
    ``drop_path_rate`` 0: stochastic depth in training, :func:`~alite_jax.models.vit.drop_path`), e.g.
    ``image_size=32, patch_size=4, dim=64, depth=4`` for a miniature that runs on a CPU.

    Raises ValueError for an unknown name or option, an image size that is not a positive multiple of the
    patch size, a width that the heads do not divide, or a drop-path rate outside [0, 1)."""
    dtype = compute_dtype(dtype)
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT {name!r}; choose one of {VITS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    unknown = set(options) - set(VIT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}; the options are "
                         f"{list(VIT_OPTIONS)}")
    o = {**VIT_DEFAULTS, **VIT_CONFIGS[name], **options}
    for key in ("image_size", "patch_size", "dim", "depth", "num_heads"):
        if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
            raise ValueError(f"{name}: {key} must be an integer >= 1, got {o[key]!r}")
    if o["mlp_ratio"] <= 0 or int(o["dim"] * o["mlp_ratio"]) < 1:
        raise ValueError(f"{name}: mlp_ratio must be > 0 (and dim * mlp_ratio >= 1), got {o['mlp_ratio']}")
    check_vit_image_size(o["image_size"], o["image_size"], o["patch_size"])
    if o["dim"] % o["num_heads"]:
        raise ValueError(f"{name}: dim {o['dim']} is not a multiple of num_heads {o['num_heads']}")
    try:
        check_drop_path_rate(o["drop_path_rate"])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return VisionTransformer(num_classes, dtype=dtype, **o)


def create_model(name: str, num_classes: int, *, layout: str = "cifar", width: float = 1.0,
                 dtype: Any = jnp.float32, **options: Any) -> nn.Module:
    """Builds a model of the zoo.

    Args:
      name: "resnet50" (the CNN teacher), "sa_resnet26", "sa_resnet38" or "sa_resnet50" (the students),
        or a ViT, "deit_tiny", "deit_small" or "deit_base" (:func:`create_vit`: ``layout`` does not
        apply to them, ``width`` must be 1, ``options`` are :data:`VIT_OPTIONS`).
      num_classes: classifier outputs.
      layout: "cifar" (3x3 stride-1 stem, images of multiples of 8) or "imagenet" (torchvision's 7x7
        stride-2 stem and 3x3 stride-2 max-pool, images of multiples of 32, e.g. 224x224). The
        homogeneous students exist in the CIFAR layout only (docs/architectures.md says why).
      width: channel multiplier (1.0: the paper's models; e.g. 0.25 for demos and tests).
      dtype: computation dtype (jnp.float32 or jnp.bfloat16); parameters stay float32.
      **options: students only: ``variant`` ("hybrid": conv stem, "homogeneous": attention stem) and
        the LocalSelfAttention options ``num_heads`` (8), ``kernel_size`` (7), ``scaling`` ("paper"),
        ``rel_layout`` ("per_head") and ``impl`` ("auto").
    Returns:
      A Linen module; ``model.apply(variables, images, train=...)`` returns ``(logits, features)``.
    Raises:
      ValueError: unknown name, layout, dtype or option, options that give an inconsistent attention
        layer, or the homogeneous variant in the ImageNet layout.
    """
    if name in VIT_CONFIGS:
        check_layout(layout)
        if width != 1.0:
            raise ValueError(f"{name} has no width multiplier (got width={width}); choose dim, depth and "
                             f"num_heads instead")
        return create_vit(name, num_classes, dtype=dtype, **options)
    dtype = compute_dtype(dtype)
    check_layout(layout)
    if name not in STAGE_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    if name not in STUDENTS:
        if options:
            raise ValueError(f"{name} is a convolutional network: the options {sorted(options)} apply "
                             f"only to the self-attention students {STUDENTS}")
        return ResNet(STAGE_SIZES[name], num_classes, width=width, layout=layout, dtype=dtype)
    variant = options.pop("variant", "hybrid")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if variant == "homogeneous" and layout == "imagenet":
        raise ValueError(
            "the homogeneous variant has no ImageNet layout: SASA's ImageNet attention stem attends within "
            "4x4 spatial blocks with spatially-aware values (a position-weighted mixture of value "
            "projections) before a 4x4 max-pool, and LocalSelfAttention has neither an even (4x4) "
            "neighbourhood nor such values (docs/architectures.md); use variant='hybrid' (the conv stem) "
            "with layout='imagenet', or layout='cifar'")
    unknown = set(options) - set(ATTENTION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}; the options are 'variant' "
                         f"and {sorted(ATTENTION_DEFAULTS)}")
    attention = {**ATTENTION_DEFAULTS, **options}
    # Every attention layer's width must suit the head layout: fail here, before any tracing.
    for base in STAGE_WIDTHS if variant == "hybrid" else (STAGE_WIDTHS[0],) + STAGE_WIDTHS:
        check_attention_options(scaled(base, width), stride=1, **attention)
    stem = None if variant == "hybrid" else functools.partial(attention_stem, **attention)
    return ResNet(STAGE_SIZES[name], num_classes, width=width, layout=layout, dtype=dtype, stem=stem,
                  spatial=functools.partial(attention_spatial, **attention))


def model_from_config(model_config: Mapping[str, Any], num_classes: int, dtype: str = "",
                      image_size: int | None = None) -> nn.Module:
    """The model a config's ``model`` section describes (name, layout, width, dtype and, for the
    students, the variant and attention options); ``dtype`` overrides its compute dtype.

    For a ViT: name, dtype and any of ``patch_size``, ``dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``drop_path_rate`` present in the section; ``image_size`` (the config's ``data.image_size``; None:
    224) sizes its position embedding. layout and width do not apply to ViTs and are not read for them."""
    if model_config["name"] in VIT_CONFIGS:
        options = {k: model_config[k] for k in VIT_OPTIONS if k != "image_size" and k in model_config}
        if image_size is not None:
            options["image_size"] = image_size
        return create_vit(model_config["name"], num_classes,
                          dtype=dtype or model_config.get("dtype", "float32"), **options)
    options = {}
    if model_config["name"] in STUDENTS:  # the attention options apply to the students only
        options = {k: model_config[k] for k in ("variant", "num_heads", "kernel_size", "scaling",
                                                "rel_layout", "impl") if k in model_config}
    return create_model(model_config["name"], num_classes, layout=model_config.get("layout", "cifar"),
                        width=model_config.get("width", 1.0),
                        dtype=dtype or model_config.get("dtype", "float32"), **options)


def check_model_image_size(model: nn.Module, height: int, width: int) -> None:
    """Raises ValueError unless ``model`` takes height x width images: a ResNet's layout rule
    (:func:`check_image_size`), a ViT's patch rule (:func:`check_vit_image_size`) and its built size."""
    if isinstance(model, VisionTransformer):
        check_vit_image_size(height, width, model.patch_size)
        if (height, width) != (model.image_size, model.image_size):
            raise ValueError(f"this ViT was built for {model.image_size}x{model.image_size} images (its "
                             f"position embedding); got {height}x{width}")
        return
    check_image_size(height, width, getattr(model, "layout", "cifar"))


def init_model(model: nn.Module, rng: jax.Array, image_size: int | tuple[int, int] = 32,
               channels: int = 3) -> dict:
    """Initialises a model's variables ({'params', 'batch_stats'}) for images of the given size; a model
    without batch statistics (a ViT) gets an empty ``batch_stats``, so every model's variables have the
    same two collections (what the trainer's state and ``model.apply`` take)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    check_model_image_size(model, h, w)
    variables = dict(model.init(rng, jnp.zeros((1, h, w, channels), jnp.float32), train=False))
    variables.setdefault("batch_stats", {})
    return variables


def abstract_variables(model: nn.Module, image_size: int | tuple[int, int] = 32,
                       channels: int = 3) -> dict:
    """Shapes and dtypes of a model's variables, without allocating or computing them."""
    return jax.eval_shape(lambda key: init_model(model, key, image_size, channels), jax.random.key(0))


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))


ZOO = (("resnet50", {}), ("sa_resnet26", {"variant": "hybrid"}),
       ("sa_resnet26", {"variant": "homogeneous"}), ("sa_resnet38", {"variant": "hybrid"}),
       ("sa_resnet38", {"variant": "homogeneous"}))  # AttentionLite's models (sa_resnet50: SASA's only)


def summary(num_classes: int = 10, image_size: int = 32, width: float = 1.0,
            run_forward: bool = False, layout: str = "cifar") -> str:
    """A table of the zoo: parameters, stage feature shapes and (optionally) a timed forward pass.

    With ``run_forward`` every model is initialised and applied to two random images, so the table also
    shows that each model compiles and runs here (the time includes compilation). In the ImageNet layout
    the homogeneous students, which it does not have, are left out.
    """
    check_image_size(image_size, image_size, layout)
    rows = []
    for name, opts in ZOO:
        if layout == "imagenet" and opts.get("variant") == "homogeneous":
            continue
        model = create_model(name, num_classes, layout=layout, width=width, **opts)
        variables = abstract_variables(model, image_size)
        images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
        _, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
        row = [f"{name} ({opts['variant']})" if opts else f"{name} (teacher)",
               f"{count_params(variables['params']):,}",
               " ".join("x".join(map(str, f.shape[1:])) for f in feats)]
        if run_forward:
            start = time.perf_counter()
            real = init_model(model, jax.random.key(0), image_size)
            x = jax.random.normal(jax.random.key(1), images.shape)
            logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(real, x)
            jax.block_until_ready(logits)
            if not bool(jnp.all(jnp.isfinite(logits))):
                raise FloatingPointError(f"{name} produced non-finite logits")
            row.append(f"{time.perf_counter() - start:.1f}s")
        rows.append(row)
    header = ["model", "params", f"stage features (HxWxC) at {image_size}x{image_size}"]
    if run_forward:
        header.append("init+forward")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [f"Model zoo: {layout} layout, {num_classes} classes, width x{width}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join(lines)
