"""Bottleneck ResNets: the ResNet-50 teacher and the SA-ResNet students, in two layouts.

One skeleton serves both: a stem, four stages of bottleneck blocks of widths 64/128/256/512 (outputs 4x
that), the stride on the block's spatial layer, a projection shortcut (1x1 conv + BN, strided) where the
shape changes, global average pooling and a dense head. The ``layout`` picks the stem:

* ``"cifar"`` (default): a 3x3 stride-1 stem conv, no max-pool (small images: 32x32, 64x64);
* ``"imagenet"``: torchvision's ResNet stem, a 7x7 stride-2 conv (padding 3), BN, ReLU and a 3x3
  stride-2 max-pool (padding 1, padded with -inf), so 224x224 images reach the stages at 56x56.

docs/architectures.md gives the public source of each rule here and the parameter counts the tests pin.

* Teacher: the spatial layer is a 3x3 convolution (PyTorch-style symmetric padding of 1).
* Student: every k x k (k > 1) convolution becomes :class:`LocalSelfAttention`; a downsampling block
  average-pools 2x2 after its attention layer (SASA). The conv stem is the hybrid variant, the
  attention stem the homogeneous one (the same simple relative embedding as every other layer). The
  model takes both layers as module factories (``spatial``, ``stem``), which :mod:`.zoo` binds.

``__call__(x, train)`` returns ``(logits, features)``, where ``features`` are the four stage outputs that
attention transfer compares (the student's have the teacher's shapes).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from alite_jax.models.local_attention import LocalSelfAttention

Dtype = Any

LAYOUTS = ("cifar", "imagenet")
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
# He normal over fan-out, as torchvision's ResNet initialises its convolutions and the public SASA code
# its attention projections (docs/architectures.md).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled(channels: int, width: float) -> int:
    """Channels of a layer under a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def check_layout(layout: str) -> None:
    """Raises ValueError unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def check_image_size(height: int, width: int, layout: str = "cifar") -> None:
    """Raises ValueError unless a model of ``layout`` can take a height x width image.

    CIFAR layout: three stride-2 stages halve the resolution three times and the head pools globally, so
    any height and width that are positive multiples of 8 work (32x32 for CIFAR, 64x64 for
    Tiny-ImageNet). ImageNet layout: the stride-2 stem conv and max-pool halve it twice more, so height
    and width must be positive multiples of 32 (224x224 for ImageNet).
    """
    check_layout(layout)
    if layout == "imagenet":
        if height < 32 or width < 32 or height % 32 or width % 32:
            raise ValueError(
                f"ImageNet-layout ResNets halve the resolution 5 times (stem conv, max-pool and three "
                f"stages), so they take images whose height and width are positive multiples of 32 "
                f"(e.g. 224x224); got {height}x{width}. Resize, crop or pad the images to such a size.")
        return
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(
            f"these ResNets take images whose height and width are positive multiples of 8 "
            f"(e.g. 32x32 for CIFAR, 64x64 for Tiny-ImageNet, or 40x48); got {height}x{width}. "
            f"Resize, crop or pad the images to such a size.")


# Module factories for the two layers that differ between the teacher and the students (as Flax's own
# ResNet takes ``conv``, ``norm`` and ``block_cls``). Each builds its module under the parameter name
# that layer has always had, so parameter trees (and exported runs) are the same whichever factory built
# them. A student's factories are these with the attention options bound (functools.partial).
SpatialFactory = Callable[[int, int, Dtype], nn.Module]  # (features, stride, dtype) -> layer
StemFactory = Callable[[int, Dtype], nn.Module]  # (features, dtype) -> layer


def conv_spatial(features: int, stride: int, dtype: Dtype) -> nn.Module:
    """The teacher's spatial layer: a 3x3 convolution (PyTorch-style symmetric padding), strided."""
    return nn.Conv(features, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False,
                   dtype=dtype, kernel_init=conv_init, name="conv2")


def attention_spatial(features: int, stride: int, dtype: Dtype, **options: Any) -> nn.Module:
    """The students' spatial layer: local self-attention (``options``: its attributes), then 2x2
    average pooling where the block downsamples."""
    return LocalSelfAttention(features, stride=stride, dtype=dtype, name="attention", **options)


def conv_stem(features: int, dtype: Dtype) -> nn.Module:
    """The teacher's and the hybrid students' stem: a 3x3 stride-1 convolution."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                   kernel_init=conv_init, name="stem_conv")


def imagenet_conv_stem(features: int, dtype: Dtype) -> nn.Module:
    """The ImageNet layout's stem conv (torchvision's ``conv1``): 7x7, stride 2, padding 3, no bias.

    The BN, ReLU and max-pool that follow it are the model's (:class:`ResNet`)."""
    return nn.Conv(features, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype,
                   kernel_init=conv_init, name="stem_conv")


def max_pool_stem(x: jax.Array) -> jax.Array:
    """torchvision's ``MaxPool2d(kernel_size=3, stride=2, padding=1)``: the padding is -inf (flax's
    ``max_pool`` pads with the reduction's initial value), so a border window's max is over the image."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


CONV_STEMS = {"cifar": conv_stem, "imagenet": imagenet_conv_stem}


def attention_stem(features: int, dtype: Dtype, **options: Any) -> nn.Module:
    """The homogeneous students' stem: local self-attention (``options``: its attributes)."""
    return LocalSelfAttention(features, dtype=dtype, name="stem_attention", **options)


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial (``spatial(width, stride, dtype)``) -> 1x1 expand, plus shortcut."""

    width: int
    stride: int
    spatial: SpatialFactory
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_ch = EXPANSION * self.width
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
        y = self.spatial(self.width, self.stride, self.dtype)(y)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv(out_ch, (1, 1), name="conv3")(y))
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = conv(out_ch, (1, 1), strides=self.stride, name="proj_conv")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Bottleneck ResNet in the CIFAR or the ImageNet layout; see the module docstring.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      num_classes: classifier outputs.
      width: multiplier on every layer's channels (1.0 is the paper's model).
      layout: "cifar" (default) or "imagenet": the stem (see the module docstring) and the image sizes
        the model takes (:func:`check_image_size`).
      stem: builds the stem layer, ``stem(features, dtype)``: None (default) for the layout's conv stem
        (:func:`conv_stem` or :func:`imagenet_conv_stem`), or :func:`attention_stem` with the attention
        options bound (CIFAR layout only: the zoo refuses an attention stem in the ImageNet layout).
      spatial: builds each block's spatial layer, ``spatial(features, stride, dtype)``:
        :func:`conv_spatial` (default) or :func:`attention_spatial` with the attention options bound.
      dtype: computation dtype; parameters and logits stay float32.
    """

    stage_sizes: Sequence[int]
    num_classes: int
    width: float = 1.0
    layout: str = "cifar"
    stem: StemFactory | None = None
    spatial: SpatialFactory = conv_spatial
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        chex.assert_rank(x, 4)
        check_image_size(x.shape[1], x.shape[2], self.layout)
        x = x.astype(self.dtype)
        stem = CONV_STEMS[self.layout] if self.stem is None else self.stem
        x = stem(scaled(STAGE_WIDTHS[0], self.width), self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         name="stem_bn")(x)
        x = nn.relu(x)
        if self.layout == "imagenet":
            x = max_pool_stem(x)
        features = []
        for s, (blocks, base) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
            for i in range(blocks):
                stride = 2 if s > 0 and i == 0 else 1
                x = Bottleneck(scaled(base, self.width), stride, self.spatial, self.dtype,
                               name=f"stage{s + 1}_block{i + 1}")(x, train)
            features.append(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
        chex.assert_shape(logits, (x.shape[0], self.num_classes))
        return logits, tuple(features)
