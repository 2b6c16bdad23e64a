"""Batch-level Mixup/CutMix inside the jitted training step (jax.numpy, traceable, from a PRNG key).

A port of timm's ``Mixup`` in mode ``"batch"`` (github.com/huggingface/pytorch-image-models,
``timm/data/mixup.py``: ``Mixup._params_per_batch``, ``Mixup._mix_batch``, ``rand_bbox``,
``cutmix_bbox_and_lam``, ``mixup_target``; Apache-2.0, Copyright 2019 Ross Wightman). Mixup: Zhang et
al., arXiv:1710.09412; CutMix: Yun et al., arXiv:1905.04899.

DeiT (facebookresearch/deit, ``main.py``) uses timm's defaults: mixup alpha 0.8, cutmix alpha 1.0,
prob 1.0, switch prob 0.5, mode "batch", label smoothing 0.1, correct_lam True. They are the defaults here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
    """One batch's mixing: ``lam`` (after CutMix's box correction), whether CutMix, the box [yl, yh) x
    [xl, xh) (empty for Mixup and for no mixing)."""

    lam: jax.Array
    use_cutmix: jax.Array
    box: tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _concrete(v) -> bool:
    return isinstance(v, (int, float))


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """timm's ``one_hot`` with ``mixup_target``'s values: off = smoothing / num_classes everywhere,
    on = 1 - smoothing + off at the label (each row sums to one). float32 (B, num_classes)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), jnp.float32(on), jnp.float32(off))


def mix_params(key: jax.Array, height: int, width: int, *, mixup_alpha: float = 0.8,
               cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
               correct_lam: bool = True) -> MixParams:
    """timm's ``_params_per_batch`` and ``cutmix_bbox_and_lam`` (``rand_bbox``) for one batch.

    With probability ``prob`` the batch mixes: CutMix with probability ``switch_prob`` when both alphas
    are > 0 (only one > 0: that one), lam ~ Beta(alpha, alpha) of the chosen method; otherwise lam = 1.
    CutMix's box: cut = int(side * sqrt(1 - lam)) per side, centre uniform over the pixels,
    [c - cut // 2, c + (cut + 1) // 2) clipped to the image; with ``correct_lam`` lam becomes
    1 - box area / image area.

    The hyperparameters may be traced values (one compiled program serves every setting); ``height`` and
    ``width`` are static.
    """
    if _concrete(mixup_alpha) and _concrete(cutmix_alpha) and mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mix_params: one of mixup_alpha, cutmix_alpha must be > 0")
    k_apply, k_switch, k_lam, k_cy, k_cx = jax.random.split(key, 5)
    mixup_on, cutmix_on = jnp.asarray(mixup_alpha) > 0, jnp.asarray(cutmix_alpha) > 0
    apply = jax.random.uniform(k_apply) < prob
    # CutMix with probability switch_prob when both are on, otherwise whichever is on (timm's branches)
    use_cutmix = jnp.where(mixup_on & cutmix_on, jax.random.uniform(k_switch) < switch_prob, cutmix_on)
    # one Beta draw per method (one sampler in the program); an alpha of 0 is never used
    alphas = jnp.stack([jnp.where(mixup_on, mixup_alpha, 1.0), jnp.where(cutmix_on, cutmix_alpha, 1.0)])
    lam_mix, lam_cut = jax.random.beta(k_lam, alphas, alphas)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & apply

    ratio = jnp.sqrt(jnp.maximum(1.0 - lam, 0.0))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    zero = jnp.zeros((), jnp.int32)
    yl, yh, xl, xh = (jnp.where(use_cutmix, v, zero) for v in (yl, yh, xl, xh))
    area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
    lam = jnp.where(use_cutmix & jnp.asarray(correct_lam), 1.0 - area / float(height * width), lam)
    return MixParams(lam, use_cutmix, (yl, yh, xl, xh))


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
              switch_prob: float = 0.5, label_smoothing: float = 0.1,
              correct_lam: bool = True) -> tuple[jax.Array, jax.Array]:
    """timm ``Mixup(mode="batch")`` on an NHWC batch: (mixed images, soft targets (B, num_classes)).

    Every example is paired with the batch reversed along axis 0 (``x.flip(0)``). Mixup:
    lam * x + (1 - lam) * flip(x); CutMix: flip(x) inside the box, x outside (see :func:`mix_params`).
    Targets: lam * smooth_one_hot(y) + (1 - lam) * smooth_one_hot(flip(y)).

    Defaults are timm's as DeiT uses them: mixup_alpha 0.8, cutmix_alpha 1.0, prob 1.0, switch_prob 0.5,
    label_smoothing 0.1, correct_lam True. Traceable (masks from iota comparisons, no dynamic shapes),
    deterministic from ``key``. Arithmetic in float32; the images come back in their input dtype (integer
    images rounded). timm asserts an even batch; an odd one works here (the middle example pairs with
    itself).
    """
    _, height, width, _ = images.shape
    p = mix_params(key, height, width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                   switch_prob=switch_prob, correct_lam=correct_lam)
    x = images.astype(jnp.float32)
    x_flip = x[::-1]
    yl, yh, xl, xh = p.box
    iy = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    ix = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    inside = ((iy >= yl) & (iy < yh) & (ix >= xl) & (ix < xh))[None, :, :, None]
    cut = jnp.where(inside, x_flip, x)
    mixed = jnp.where(p.use_cutmix, cut, x * p.lam + x_flip * (1.0 - p.lam))
    if jnp.issubdtype(images.dtype, jnp.integer):
        info = jnp.iinfo(images.dtype)
        mixed = jnp.clip(jnp.round(mixed), info.min, info.max)
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = y * p.lam + y[::-1] * (1.0 - p.lam)
    return mixed.astype(images.dtype), targets
