"""Per-example image augmentation on the host: numpy and PIL only, pure functions of (image, rng).

Every function takes one uint8 HWC numpy image (C = 1 or 3, any height and width) and, where it is
random, a ``np.random.Generator``; it returns a new array and never changes its input. The input
pipeline runs them in worker processes, each example with a Generator derived from (seed, epoch, index),
so a whole epoch is reproducible. Batch-level Mixup/CutMix is not here: it runs inside the jitted
training step (:mod:`alite_jax.data.mixup`).

Public sources (what each function follows; docs/augmentation.md has the details):

* ``cifar_crop_flip``: the CIFAR augmentation of the AttentionLite paper (§4.1), the same as
  :func:`cifar_crop_flip_batch` for one image.
* ``random_resized_crop``: torchvision ``transforms.RandomResizedCrop.get_params``
  (torchvision/transforms/transforms.py), the algorithm exactly, with numpy's Generator in place of
  torch's; the crop is resized with PIL as torchvision does for PIL images.
* ``horizontal_flip``: torchvision ``RandomHorizontalFlip``.
* ``rand_augment``: a port of timm's RandAugment, github.com/huggingface/pytorch-image-models,
  ``timm/data/auto_augment.py`` (``rand_augment_transform``, ``_RAND_TRANSFORMS``,
  ``_RAND_INCREASING_TRANSFORMS``, ``AugmentOp``, the ``*_level_to_arg`` functions and the PIL ops).
  timm is Copyright 2019 Ross Wightman, licensed under the Apache License 2.0; the op functions and the
  magnitude-to-argument mappings below are adapted from that file (random draws come from the
  Generator instead of Python's ``random``).
* ``random_erasing``: a port of timm's ``RandomErasing`` (``timm/data/random_erasing.py``, Apache-2.0),
  on a normalised float32 HWC image.
* ``resize_shorter``, ``center_crop``, ``eval_resize_crop``: torchvision ``Resize(int)`` and
  ``CenterCrop`` as timm's ``transforms_imagenet_eval`` (``timm/data/transforms_factory.py``) uses them:
  the shorter side to ``floor(size / crop_pct)``, then the centre crop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

RECIPES = ("cifar", "imagenet", "deit", "none")

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

IMAGENET_FILL = (124, 116, 104)  # timm: round(255 * IMAGENET_DEFAULT_MEAN), the fill of geometric ops


# ---------------------------------------------------------------------------------------------------------
# numpy <-> PIL


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HWC image with 1 or 3 channels, got {image.dtype} "
                         f"{image.shape}")


def _to_pil(image: np.ndarray) -> Image.Image:
    _check_image(image)
    if image.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def _from_pil(img: Image.Image) -> np.ndarray:
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None].copy() if out.ndim == 2 else out.copy()


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return _INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of "
                         f"{tuple(_INTERPOLATIONS)}") from None


def resize(image: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """PIL resize to (height, width); the image itself (a copy) when it already has that size."""
    _check_image(image)
    if image.shape[:2] == (height, width):
        return image.copy()
    return _from_pil(_to_pil(image).resize((width, height), _resample(interpolation)))


# ---------------------------------------------------------------------------------------------------------
# CIFAR crop and flip, flips


def cifar_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Random crop of the reflect-padded image (shift in [-pad, pad] per axis), then a flip with p 0.5.

    The per-image form of :func:`cifar_crop_flip_batch` (same draws' meaning: dy, dx uniform in
    [0, 2 pad], the window at (dy, dx) of the padded image; flip when ``rng.random() < 0.5``).
    """
    h, w, _ = image.shape
    if pad:
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        dy, dx = rng.integers(0, 2 * pad + 1, 2)
        image = padded[dy:dy + h, dx:dx + w]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def cifar_crop_flip_batch(images: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """:func:`cifar_crop_flip` of every image of an (N, H, W, C) batch at once (vectorised: one padded
    copy and one gather, the shifts and flips drawn for the whole batch)."""
    n, h, w, _ = images.shape
    if pad:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        dy = rng.integers(0, 2 * pad + 1, n)
        dx = rng.integers(0, 2 * pad + 1, n)
        images = np.moveaxis(windows[np.arange(n), dy, dx], 1, -1)  # (n, c, h, w) -> (n, h, w, c)
    flip = rng.random(n) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """torchvision ``RandomHorizontalFlip(p)``: mirrors left-right when ``rng.random() < p``."""
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1])
    return image.copy()


# ---------------------------------------------------------------------------------------------------------
# RandomResizedCrop


class CropParams(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    fallback: bool  # True: none of the 10 attempts fitted, the central crop was taken


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> CropParams:
    """torchvision ``RandomResizedCrop.get_params``: 10 attempts, then the central crop.

    Each attempt draws the area fraction uniform in ``scale`` and the aspect ratio (w / h) log-uniform in
    ``ratio``; w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first that fits
    (0 < w <= width, 0 < h <= height) is placed uniformly. Otherwise the whole image, clamped to the
    ratio range, is cropped at the centre.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return CropParams(i, j, h, w, False)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return CropParams((height - h) // 2, (width - w) // 2, h, w, True)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> np.ndarray:
    """torchvision ``RandomResizedCrop(size, scale, ratio)``: crop, then PIL resize to (size, size)."""
    _check_image(image)
    p = random_resized_crop_params(image.shape[0], image.shape[1], rng, scale, ratio)
    crop = image[p.top:p.top + p.height, p.left:p.left + p.width]
    return resize(crop, size, size, interpolation)


# ---------------------------------------------------------------------------------------------------------
# Evaluation resize and crop


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """torchvision ``Resize(size)``: the shorter side to ``size``, the longer to int(size * long / short)."""
    h, w, _ = image.shape
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return resize(image, new_h, new_w, interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)``: top = round((H - size) / 2), left = round((W - size) / 2)."""
    h, w, _ = image.shape
    if size > h or size > w:
        raise ValueError(f"center_crop: crop {size} is larger than the image {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size].copy()


def eval_resize_crop(image: np.ndarray, size: int = 224, crop_ratio: float = 0.875,
                     interpolation: str = "bilinear") -> np.ndarray:
    """timm's eval transform: shorter side to floor(size / crop_ratio) (256 for 224), centre crop size."""
    return center_crop(resize_shorter(image, math.floor(size / crop_ratio), interpolation), size)


# ---------------------------------------------------------------------------------------------------------
# Normalisation and random erasing


def normalize(image: np.ndarray, mean: Sequence[float] | np.ndarray,
              std: Sequence[float] | np.ndarray) -> np.ndarray:
    """uint8 -> float32 with zero mean and unit variance per channel: (x / 255 - mean) / std."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((image.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float = 0.25, mode: str = "pixel",
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_count: int = 1) -> np.ndarray:
    """timm ``RandomErasing`` on one normalised float HWC image (a new array; the input is unchanged).

    With probability ``prob``, erases ``count`` boxes (count = 1, or uniform in [1, max_count]); each box
    tries 10 times: area fraction uniform in [min_area, max_area] / count, aspect (h / w) log-uniform in
    [min_aspect, 1 / min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the
    first with h < H and w < W is placed uniformly and filled with per-pixel N(0, 1) noise ('pixel'),
    one N(0, 1) colour per channel ('rand') or zeros ('const').
    """
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random_erasing: unknown mode {mode!r}; choose 'pixel', 'rand' or 'const'")
    out = np.array(image, dtype=image.dtype, copy=True)
    if rng.random() > prob:
        return out
    img_h, img_w, chan = out.shape
    area = img_h * img_w
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 1 if max_count <= 1 else int(rng.integers(1, max_count + 1))
    for _ in range(count):
        for _ in range(10):
            target_area = rng.uniform(min_area, max_area) * area / count
            aspect = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < img_w and h < img_h:
                top = int(rng.integers(0, img_h - h + 1))
                left = int(rng.integers(0, img_w - w + 1))
                if mode == "pixel":
                    fill = rng.standard_normal((h, w, chan), dtype=np.float32)
                elif mode == "rand":
                    fill = rng.standard_normal((1, 1, chan), dtype=np.float32)
                else:
                    fill = np.zeros((1, 1, chan), np.float32)
                out[top:top + h, left:left + w] = fill
                break
    return out


# ---------------------------------------------------------------------------------------------------------
# RandAugment (port of timm/data/auto_augment.py, Apache-2.0)

_LEVEL_DENOM = 10.0

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ('Cutout' is random erasing, done separately).
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                              "TranslateXRel", "TranslateYRel")

# Ops whose argument timm negates with probability 0.5 (_randomly_negate).
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
                        "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"})


def op_argument(name: str, magnitude: float, negate: bool = False, translate_pct: float = 0.45):
    """timm's ``LEVEL_TO_ARG[name](magnitude)``, with ``negate`` in place of ``_randomly_negate``.

    Returns None for the ops without an argument (AutoContrast, Equalize, Invert).
    """
    level = magnitude / _LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * translate_pct
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return max(0.1, 1.0 + sign * level * 0.9)
    known = RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS[4:11]
    raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")


def _fill_for(img: Image.Image, fill: Sequence[int]):
    if img.mode == "L":
        return int(round(sum(fill) / len(fill)))
    if len(fill) == 1:
        return (int(fill[0]),) * 3
    return tuple(int(v) for v in fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _apply_pil_op(img: Image.Image, name: str, arg, fill, resample) -> Image.Image:
    geo = dict(fillcolor=_fill_for(img, fill), resample=resample)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **geo)
    if name in ("Posterize", "PosterizeIncreasing"):
        if arg <= 0:  # magnitude 10 of the increasing op keeps 0 bits: Pillow 13 refuses them; older
            return Image.new(img.mode, img.size)  # Pillow (timm's results) masked every bit: black
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        return _solarize_add(img, arg)
    if name in ("Color", "ColorIncreasing"):
        return ImageEnhance.Color(img).enhance(arg)
    if name in ("Contrast", "ContrastIncreasing"):
        return ImageEnhance.Contrast(img).enhance(arg)
    if name in ("Brightness", "BrightnessIncreasing"):
        return ImageEnhance.Brightness(img).enhance(arg)
    if name in ("Sharpness", "SharpnessIncreasing"):
        return ImageEnhance.Sharpness(img).enhance(arg)
    if name == "ShearX":
        return img.transform(img.size, Image.Transform.AFFINE, (1, arg, 0, 0, 1, 0), **geo)
    if name == "ShearY":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, arg, 1, 0), **geo)
    if name == "TranslateXRel":
        pixels = arg * img.size[0]
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, pixels, 0, 1, 0), **geo)
    if name == "TranslateYRel":
        pixels = arg * img.size[1]
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, pixels), **geo)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_rand_augment_op(image: np.ndarray, name: str, magnitude: float, *, negate: bool = False,
                          fill: Sequence[int] = IMAGENET_FILL, interpolation: str = "bicubic",
                          translate_pct: float = 0.45) -> np.ndarray:
    """One RandAugment op at a fixed magnitude (0 to 10 scale), deterministic: timm's ``AugmentOp``
    after its random draws (application, magnitude noise, sign).

    ``fill`` is the colour of the area a geometric op uncovers (a grayscale image gets its mean);
    ``interpolation`` the resampling of geometric ops (timm: the train interpolation, DeiT: bicubic).
    """
    arg = op_argument(name, magnitude, negate, translate_pct)
    img = _apply_pil_op(_to_pil(image), name, arg, fill, _resample(interpolation))
    return _from_pil(img)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """The parsed RandAugment config string (timm's ``rand_augment_transform`` keys)."""

    magnitude: float = 10.0  # m: mean magnitude, 0 to 10 (timm's default 10)
    num_layers: int = 2  # n: ops per image, chosen with replacement
    prob: float = 0.5  # p: probability of applying each chosen op
    magnitude_std: float = 0.0  # mstd: gaussian noise on the magnitude (inf: uniform in [0, m])
    magnitude_max: float | None = None  # mmax: upper clip of the magnitude (default 10)
    increasing: bool = False  # inc: the ops whose severity increases with the magnitude

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(config_str: str) -> RandAugmentConfig:
    """Parses timm's RandAugment config string, e.g. ``"rand-m9-mstd0.5-inc1"``.

    Sections after ``rand`` (any order): ``m<int>`` magnitude, ``n<int>`` ops per image, ``p<float>``
    probability per op, ``mstd<float>`` magnitude std (> 100: uniform sampling), ``mmax<int>`` magnitude
    upper bound, ``inc<0|1>`` increasing-severity ops. Anything else (timm's ``t`` transform sets
    included) raises ValueError.
    """
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config_str!r} must start with 'rand'")
    fields: dict = {}
    for c in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", c)
        key, val = match.groups() if match else (c, None)
        try:
            if key == "m":
                fields["magnitude"] = float(int(val))
            elif key == "n":
                fields["num_layers"] = int(val)
            elif key == "p":
                fields["prob"] = float(val)
            elif key == "mstd":
                mstd = float(val)
                fields["magnitude_std"] = math.inf if mstd > 100 else mstd
            elif key == "mmax":
                fields["magnitude_max"] = float(int(val))
            elif key == "inc":
                fields["increasing"] = bool(int(val))
            else:
                raise KeyError(key)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"RandAugment config {config_str!r}: cannot read section {c!r}; known "
                             "sections: m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>") from None
    return RandAugmentConfig(**fields)


class PlannedOp(NamedTuple):
    name: str
    applied: bool  # the op's own coin (prob p) came up
    magnitude: float  # after noise and clipping to [0, mmax or 10]
    negate: bool  # the sign draw of signed ops (ignored by the others)


def rand_augment_plan(rng: np.random.Generator, config: str | RandAugmentConfig) -> list[PlannedOp]:
    """The random part of RandAugment for one image: which ops, whether each applies, magnitude, sign.

    timm's ``RandAugment.__call__`` and ``AugmentOp.__call__``: n ops chosen uniformly with replacement;
    each applies unless a uniform draw exceeds p; the magnitude is N(m, mstd) (uniform in [0, m] for
    mstd = inf) clipped to [0, mmax or 10]; a signed argument is negated when a uniform draw > 0.5.
    """
    cfg = parse_rand_augment(config) if isinstance(config, str) else config
    ops = cfg.ops
    plan = []
    for k in rng.integers(0, len(ops), cfg.num_layers):
        applied = not (cfg.prob < 1.0 and rng.random() > cfg.prob)
        magnitude = cfg.magnitude
        if cfg.magnitude_std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif cfg.magnitude_std > 0:
            magnitude = rng.normal(magnitude, cfg.magnitude_std)
        upper = cfg.magnitude_max or _LEVEL_DENOM
        magnitude = float(max(0.0, min(magnitude, upper)))
        negate = bool(rng.random() > 0.5)
        plan.append(PlannedOp(ops[int(k)], bool(applied), magnitude, negate))
    return plan


def rand_augment(image: np.ndarray, rng: np.random.Generator, config_str: str = "rand-m9-mstd0.5-inc1", *,
                 fill: Sequence[int] = IMAGENET_FILL, interpolation: str = "bicubic",
                 translate_pct: float = 0.45) -> np.ndarray:
    """timm's ``rand_augment_transform(config_str, hparams)`` on one uint8 HWC image.

    DeiT's setting is the default: 2 ops of the increasing set at magnitude N(9, 0.5) clipped to [0, 10],
    each with probability 0.5, geometric ops bicubic with fill (124, 116, 104) (timm's ``img_mean``:
    round(255 * the normalisation mean)), translations up to 0.45 of the image size.
    """
    _check_image(image)
    resample = _resample(interpolation)
    img = _to_pil(image)
    for op in rand_augment_plan(rng, config_str):
        if op.applied:
            arg = op_argument(op.name, op.magnitude, op.negate, translate_pct)
            img = _apply_pil_op(img, op.name, arg, fill, resample)
    return _from_pil(img)


# ---------------------------------------------------------------------------------------------------------
# Recipes


def fill_from_mean(mean: Sequence[float]) -> tuple[int, ...]:
    """timm's ``img_mean`` hparam: min(255, round(255 * m)) per channel ((124, 116, 104) for ImageNet)."""
    return tuple(min(255, int(round(255 * float(m)))) for m in mean)


def _default_interpolation(recipe: str) -> str:
    return "bicubic" if recipe == "deit" else "bilinear"


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; choose one of {RECIPES}")


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """A recipe's training transform: uint8 HWC image, Generator -> normalised float32 (S, S, C).

    A frozen dataclass of plain values, so it pickles (grain sends it to worker processes).
    """

    recipe: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    erase_prob: float = 0.25

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s, interp = self.image_size, self.interpolation
        if self.recipe == "cifar":
            image = cifar_crop_flip(resize(image, s, s, interp), rng, s // 8)
        elif self.recipe in ("imagenet", "deit"):
            image = horizontal_flip(random_resized_crop(image, rng, s, interpolation=interp), rng)
            if self.recipe == "deit":
                image = rand_augment(image, rng, self.rand_augment, fill=fill_from_mean(self.mean),
                                     interpolation=interp)
        else:
            image = resize(image, s, s, interp)
        out = normalize(image, self.mean, self.std)
        if self.recipe == "deit":
            out = random_erasing(out, rng, prob=self.erase_prob, mode="pixel")
        return out


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """A recipe's evaluation transform: uint8 HWC image (the Generator is ignored) -> float32 (S, S, C)."""

    recipe: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_ratio: float = 0.875

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        s = self.image_size
        if self.recipe in ("imagenet", "deit"):
            image = eval_resize_crop(image, s, self.crop_ratio, self.interpolation)
        else:
            image = resize(image, s, s, self.interpolation)
        return normalize(image, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class BatchTrainTransform:
    """The ``cifar`` and ``none`` recipes over a whole batch of images that already have the output size:
    uint8 (N, S, S, C), Generator -> normalised float32, vectorised (what a per-image transform costs in
    Python calls, this pays once per batch; small data sets need it to stay fast)."""

    recipe: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.recipe == "cifar":
            images = cifar_crop_flip_batch(images, rng, self.image_size // 8)
        return normalize(images, self.mean, self.std)


def make_batch_train_transform(recipe: str, image_size: int, mean, std,
                               source_size: tuple[int, int] | None) -> BatchTrainTransform | None:
    """The vectorised training transform of ``recipe`` for a source whose images are all
    ``source_size``, or None when the recipe needs work per image (``imagenet``, ``deit``, or a resize)."""
    _check_recipe(recipe)
    if recipe not in ("cifar", "none") or source_size != (image_size, image_size):
        return None
    return BatchTrainTransform(recipe, int(image_size), _floats(mean), _floats(std))


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, np.float64).reshape(-1))


def make_train_transform(recipe: str, image_size: int, mean, std, *,
                         interpolation: str | None = None) -> TrainTransform:
    """The training transform of ``recipe`` (one of :data:`RECIPES`):

    * ``"cifar"``: resize to image_size if the source differs (bilinear), reflect-pad crop with pad
      image_size // 8 and a flip;
    * ``"imagenet"``: RandomResizedCrop (bilinear) and a flip;
    * ``"deit"``: RandomResizedCrop (bicubic), a flip, RandAugment rand-m9-mstd0.5-inc1, normalisation,
      random erasing (p 0.25, per-pixel noise);
    * ``"none"``: resize only.

    ``interpolation`` overrides the recipe's (for every resize, crop and geometric op).
    """
    _check_recipe(recipe)
    return TrainTransform(recipe, int(image_size), _floats(mean), _floats(std),
                          interpolation or _default_interpolation(recipe))


def make_eval_transform(recipe: str, image_size: int, mean, std, *, crop_ratio: float = 0.875,
                        interpolation: str | None = None) -> EvalTransform:
    """The evaluation transform of ``recipe``: "imagenet" (bilinear) and "deit" (bicubic) resize the
    shorter side to floor(image_size / crop_ratio) and crop the centre; "cifar" and "none" resize only.
    """
    _check_recipe(recipe)
    return EvalTransform(recipe, int(image_size), _floats(mean), _floats(std),
                         interpolation or _default_interpolation(recipe), float(crop_ratio))
