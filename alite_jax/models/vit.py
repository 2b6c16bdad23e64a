"""Vision Transformers: ViT/DeiT as plain Linen modules, the dense models SPViT prunes.

The network is timm's ``VisionTransformer`` (``timm/models/vision_transformer.py``) as DeiT uses it
(Touvron et al., "Training data-efficient image transformers & distillation through attention", 2021;
facebookresearch/deit ``models.py``: ``deit_{tiny,small,base}_patch16_224``, class token, no
distillation token):

* ``patch_embed``: a Conv with kernel = stride = patch size (timm's ``PatchEmbed.proj``), the patch grid
  flattened row by row into N tokens of width D;
* ``cls_token`` (1, 1, D) prepended, ``pos_embed`` (1, N + 1, D) added (learned, no dropout here);
* ``depth`` pre-norm blocks ``block{i}``: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, LayerNorm epsilon
  1e-6 (timm's ``partial(nn.LayerNorm, eps=1e-6)``), MLP ``fc1`` (D -> mlp_ratio D), exact (erf) GELU as
  ``torch.nn.GELU()``'s default, ``fc2``;
* the attention: heads of width D / heads, logits scaled by head_dim ** -0.5, softmax over the keys, the
  heads concatenated and projected by ``proj``. timm computes queries, keys and values with one fused
  Linear ``qkv`` (D -> 3D, output ordered q, k, v, each head-major: ``reshape(B, N, 3, heads, head_dim)``);
  here it is stored SPLIT as ``qk`` (D -> 2D: q then k) and ``v`` (D -> D), as SPViT's supernet
  (ziplab/SPViT, ``SPViT_DeiT/models_pruning.py``) splits it, so the dense model and the supernet share
  one parameter tree. The split changes no output (:mod:`alite_jax.convert.timm` converts timm's ``qkv``);
* the final LayerNorm ``norm`` and the classifier ``head`` on the class token (``x[:, 0]``).

Initialisation follows timm's ``init_weights`` ('' mode): truncated normal std 0.02 for every Linear
kernel and ``pos_embed``; zero Linear biases; LayerNorm ones and zeros. ``cls_token`` is drawn like
``pos_embed`` (timm's current ``init_weights`` uses a normal of std 1e-6 for it; a converted or
pretrained model overwrites it either way). The patch convolution keeps PyTorch's default ``Conv2d``
init, as timm's ``PatchEmbed`` does: kernel and bias uniform in +-1 / sqrt(fan_in). Dropout and the
distillation token are not modelled.

Stochastic depth (:func:`drop_path`, timm's ``DropPath``; Huang et al., "Deep Networks with Stochastic
Depth", 2016), as DeiT trains with it: ``drop_path_rate`` r gives block i the rate
``np.linspace(0, r, depth)[i]`` (timm's ``dpr``) on both residual branches, in training only, drawn from
the Linen rng stream ``"dropout"``. With r = 0 (the default) nothing is drawn and no stream is needed.

``__call__(x, train=False)`` returns ``(logits, features)``, ``features`` the tuple of every block's
output tokens (B, N + 1, D) (the AttentionLite trainer's attention transfer is not used with ViTs; the
tokens are there for token-level distillation and for tests). There is no ``batch_stats`` collection.
"""

from __future__ import annotations

import numbers
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

LAYER_NORM_EPSILON = 1e-6  # timm's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)  # timm: trunc_normal_(std=.02), at +-2
# timm's trunc_normal_ truncates at +-2 absolute (100 std: a plain normal in practice), flax's at +-2 std
# (rescaled to std 0.02): the same std, a thinner tail.


def torch_conv_init(fan_in: int) -> tuple[Any, Any]:
    """PyTorch's default ``Conv2d`` init (kaiming_uniform(a=sqrt(5)) and its bias rule): both uniform in
    +-1 / sqrt(fan_in)."""
    bound = fan_in ** -0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    return uniform, uniform


def embed_tokens(module: nn.Module, x: jax.Array, patch_size: int, dim: int, dtype: Dtype,
                 conv_init: tuple[Any, Any] | None = None) -> jax.Array:
    """Images (B, H, W, C) -> tokens (B, 1 + HW/p^2, D): the patch embedding ``patch_embed`` (a Conv with
    kernel = stride = patch), the ``cls_token`` in front, the learned ``pos_embed`` added.

    Called, with the model itself as ``module``, from the ``nn.compact`` ``__call__`` of a ViT-family
    model (the dense ViT, SPViT's supernet and compact model), so the parameters are that model's own,
    under the dense ViT's names. ``conv_init``: (kernel_init, bias_init) of the patch embedding (None:
    Flax's defaults).
    """
    b = x.shape[0]
    inits = {} if conv_init is None else dict(kernel_init=conv_init[0], bias_init=conv_init[1])
    x = nn.Conv(dim, (patch_size, patch_size), strides=patch_size, padding="VALID", dtype=dtype,
                name="patch_embed", **inits)(x.astype(dtype))
    x = x.reshape(b, -1, dim)  # row-major over the patch grid, as timm's flatten(2).transpose(1, 2)
    cls = module.param("cls_token", trunc_normal, (1, 1, dim), jnp.float32)
    pos = module.param("pos_embed", trunc_normal, (1, x.shape[1] + 1, dim), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, dim)), x], axis=1)
    return x + pos.astype(dtype)


def classify(x: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
    """Tokens -> logits (B, num_classes), float32: the final LayerNorm ``norm``, then the ``head`` on the
    CLS token (timm's ``global_pool="token"``)."""
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name="norm")(x)
    logits = nn.Dense(num_classes, dtype=jnp.float32, kernel_init=trunc_normal,
                      bias_init=nn.initializers.zeros, name="head")(x[:, 0].astype(jnp.float32))
    chex.assert_shape(logits, (x.shape[0], num_classes))
    return logits


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
    """Per-block drop-path rates: ``np.linspace(0, rate, depth)`` (timm's ``VisionTransformer`` ``dpr``),
    so the first block is never dropped and the last at ``rate``. ValueError unless 0 <= rate < 1."""
    check_drop_path_rate(rate)
    return tuple(float(r) for r in np.linspace(0.0, rate, depth))


def check_drop_path_rate(rate: float) -> None:
    """Raises ValueError unless 0 <= ``rate`` < 1 (a rate of 1 would drop every sample and divide by 0)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth on a residual branch ``x`` (B, ...): timm's ``drop_path`` (scale_by_keep).

    In training with ``rate`` > 0, each sample's branch is zeroed with probability ``rate`` and the kept
    ones are divided by keep = 1 - rate, so the expectation is unchanged; otherwise ``x`` is returned as
    is. The mask (one Bernoulli draw per sample, shared by its tokens and channels) comes from
    ``module``'s rng stream ``"dropout"`` (ValueError when that stream is missing) and is sown as
    ``intermediates/drop_path_keep`` of ``module`` (B,) bool, one entry per call (for tests and
    diagnostics: only when ``intermediates`` is mutable).
    """
    check_drop_path_rate(rate)
    if not train or rate == 0.0:
        return x
    if not module.has_rng("dropout"):
        raise ValueError(f"drop path (rate {rate}) in training needs the 'dropout' rng stream: pass "
                         f"rngs={{'dropout': key}} to apply (or set drop_path_rate=0)")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    module.sow("intermediates", "drop_path_keep", mask.reshape(x.shape[0]))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def check_vit_image_size(height: int, width: int, patch_size: int) -> None:
    """Raises ValueError unless a ViT of ``patch_size`` can take a height x width image (positive
    multiples of the patch size: the patch embedding tiles the image without overlap or remainder)."""
    if patch_size < 1:
        raise ValueError(f"the patch size must be >= 1, got {patch_size}")
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        raise ValueError(
            f"a ViT with {patch_size}x{patch_size} patches takes images whose height and width are "
            f"positive multiples of {patch_size} (e.g. 224x224 for patch 16); got {height}x{width}. "
            f"Resize or crop the images, or choose a patch size that divides the image size.")


class Attention(nn.Module):
    """Multi-head self-attention with the projection split into ``qk`` (D -> 2D) and ``v`` (D -> D)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, kernel_init=trunc_normal,  # noqa: E731
                                                bias_init=nn.initializers.zeros, name=name)
        qk = dense(2 * d, "qk")(x).reshape(b, n, 2, self.num_heads, head_dim)
        q, k = qk[:, :, 0], qk[:, :, 1]  # (B, N, heads, head_dim)
        v = dense(d, "v")(x).reshape(b, n, self.num_heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        return dense(d, "proj")(out)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``; each branch through
    :func:`drop_path` at rate ``drop_path`` in training."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name=name)  # noqa: E731
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, kernel_init=trunc_normal,  # noqa: E731
                                                bias_init=nn.initializers.zeros, name=name)
        x = x + drop_path(self, Attention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x)),
                          self.drop_path, train)
        y = dense(int(d * self.mlp_ratio), "fc1")(norm("norm2")(x))
        y = nn.gelu(y, approximate=False)  # torch.nn.GELU() default: the exact erf form
        return x + drop_path(self, dense(d, "fc2")(y), self.drop_path, train)


class VisionTransformer(nn.Module):
    """ViT/DeiT (see the module docstring).

    Attributes:
      num_classes: classifier outputs.
      image_size: the image side it takes (``pos_embed`` has (image_size / patch_size) ** 2 + 1 rows).
      patch_size: the patch side (kernel and stride of ``patch_embed``).
      dim: token width D.
      depth: number of blocks.
      num_heads: attention heads (D must be a multiple).
      mlp_ratio: the MLP's hidden width over D (4).
      dtype: computation dtype; parameters, softmax and logits stay float32.
      drop_path_rate: stochastic depth of the last block (:func:`drop_path_rates`); training then needs
        the ``"dropout"`` rng stream.
    """

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        chex.assert_rank(x, 4)
        check_vit_image_size(x.shape[1], x.shape[2], self.patch_size)
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}x{self.image_size} images (its "
                             f"position embedding has {self.num_patches} + 1 rows); got "
                             f"{x.shape[1]}x{x.shape[2]}")
        x = embed_tokens(self, x, self.patch_size, self.dim, self.dtype,
                         torch_conv_init(self.patch_size ** 2 * x.shape[-1]))
        features = []
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = Block(self.num_heads, self.mlp_ratio, self.dtype, rate, name=f"block{i}")(x, train)
            features.append(x)
        return classify(x, self.num_classes, self.dtype), tuple(features)
