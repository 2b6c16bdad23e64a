"""Per-example augmentation (alite_jax/data/augment.py): invariants, statistics against the algorithms'
analytic expectations, each RandAugment op against an independent computation, recipes, pickling."""

import math
import pickle

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import alite_jax.data.augment as A

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(h=48, w=64, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _smooth_image(h=60, w=80):
    """A structured RGB image (gradients), so geometric ops and resampling have something to move."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


# --- shapes, dtypes, determinism, grayscale ---------------------------------------------------------------

@pytest.mark.parametrize("c", [1, 3])
def test_every_op_keeps_dtype_and_shape(c):
    img = _image(37, 53, c)
    rng = np.random.default_rng(0)
    assert A.cifar_crop_flip(img, rng, 4).shape == img.shape
    assert A.horizontal_flip(img, rng).shape == img.shape
    assert A.random_resized_crop(img, rng, 24).shape == (24, 24, c)
    assert A.random_resized_crop(img, rng, 24, interpolation="bicubic").dtype == np.uint8
    assert A.rand_augment(img, rng).shape == img.shape
    assert A.resize_shorter(img, 20).shape == (20, int(20 * 53 / 37), c)
    assert A.center_crop(img, 30).shape == (30, 30, c)
    assert A.eval_resize_crop(img, 28).shape == (28, 28, c)
    norm = A.normalize(img, MEAN[:c], STD[:c])
    assert norm.dtype == np.float32 and norm.shape == img.shape
    erased = A.random_erasing(norm, rng, prob=1.0)
    assert erased.dtype == np.float32 and erased.shape == img.shape
    for name in A.RAND_TRANSFORMS + A.RAND_INCREASING_TRANSFORMS:
        for negate in (False, True):
            out = A.apply_rand_augment_op(img, name, 9.0, negate=negate)
            assert out.shape == img.shape and out.dtype == np.uint8, name


@pytest.mark.parametrize("recipe", A.RECIPES)
@pytest.mark.parametrize("c", [1, 3])
def test_recipes_shapes_determinism_and_pickling(recipe, c):
    mean, std = MEAN[:c], STD[:c]
    train = A.make_train_transform(recipe, 32, mean, std)
    evaluate = A.make_eval_transform(recipe, 32, mean, std)
    img = _image(45, 70, c)
    out = train(img, np.random.default_rng(5))
    assert out.shape == (32, 32, c) and out.dtype == np.float32
    np.testing.assert_array_equal(out, train(img, np.random.default_rng(5)))  # a function of the Generator
    ev = evaluate(img, np.random.default_rng(0))
    assert ev.shape == (32, 32, c) and ev.dtype == np.float32
    np.testing.assert_array_equal(ev, evaluate(img, np.random.default_rng(1)))  # eval is deterministic
    for t in (train, evaluate):
        t2 = pickle.loads(pickle.dumps(t))
        assert t2 == t
        np.testing.assert_array_equal(t2(img, np.random.default_rng(3)), t(img, np.random.default_rng(3)))
    if recipe != "none":
        outs = [train(img, np.random.default_rng(s)) for s in range(4)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # the seed matters


def test_recipe_choices_and_interpolation():
    with pytest.raises(ValueError, match="'cifar', 'imagenet', 'deit', 'none'"):
        A.make_train_transform("autoaugment", 32, MEAN, STD)
    with pytest.raises(ValueError, match="choose one of"):
        A.make_eval_transform("x", 32, MEAN, STD)
    assert A.make_train_transform("deit", 224, MEAN, STD).interpolation == "bicubic"
    assert A.make_eval_transform("deit", 224, MEAN, STD).interpolation == "bicubic"
    assert A.make_train_transform("imagenet", 224, MEAN, STD).interpolation == "bilinear"
    bicubic = A.make_train_transform("imagenet", 224, MEAN, STD, interpolation="bicubic")
    assert bicubic.interpolation == "bicubic"
    with pytest.raises(ValueError, match="interpolation"):
        A.resize(_image(), 10, 10, "cubic")
    assert A.fill_from_mean(MEAN) == A.IMAGENET_FILL == (124, 116, 104)


def test_cifar_recipe_is_resize_then_cifar_crop_flip():
    img = _image(40, 40)
    t = A.make_train_transform("cifar", 32, MEAN, STD)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    resized = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR))
    expect = A.normalize(A.cifar_crop_flip(resized, rng_b, 4), MEAN, STD)
    np.testing.assert_array_equal(t(img, rng_a), expect)
    img32 = _image(32, 32)
    e = A.make_eval_transform("cifar", 32, MEAN, STD)
    np.testing.assert_array_equal(e(img32), A.normalize(img32, MEAN, STD))  # same size: no resampling


# --- CIFAR crop + flip, flips -----------------------------------------------------------------------------

def test_cifar_crop_is_a_window_of_the_reflect_padded_image():
    img, pad = _image(32, 32), 4
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        out = A.cifar_crop_flip(img, np.random.default_rng(seed), pad)
        dy, dx = rng.integers(0, 2 * pad + 1, 2)
        flip = rng.random() < 0.5
        window = padded[dy:dy + 32, dx:dx + 32]
        np.testing.assert_array_equal(out, window[:, ::-1] if flip else window)
        seen.add((int(dy) - pad, int(dx) - pad, bool(flip)))
    assert {s[0] for s in seen} == set(range(-pad, pad + 1)) and {s[2] for s in seen} == {False, True}


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_flip_probability(p):
    img = _image(8, 9)
    rng = np.random.default_rng(0)
    n = 4000
    flips = sum(not np.array_equal(A.horizontal_flip(img, rng, p), img) for _ in range(n))
    assert abs(flips / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(A.horizontal_flip(img, np.random.default_rng(0), 1.0), img[:, ::-1])


# --- RandomResizedCrop -----------------------------------------------------------------------------------

def _rrc_grid(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), n=1200):
    """One attempt of get_params on a midpoint grid of (area fraction, log aspect), the exact rounding:
    (probability the attempt fits, mean area fraction of the fitting ones, mean aspect of those)."""
    s = scale[0] + (np.arange(n) + 0.5) / n * (scale[1] - scale[0])
    lr = math.log(ratio[0]) + (np.arange(n) + 0.5) / n * (math.log(ratio[1]) - math.log(ratio[0]))
    s, r = np.meshgrid(s, np.exp(lr), indexing="ij")
    area = s * height * width
    w = np.round(np.sqrt(area * r))
    h = np.round(np.sqrt(area / r))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    frac = (w * h / (height * width))[ok]
    return ok.mean(), frac.mean(), (w / h)[ok].mean()


def test_rrc_params_within_scale_and_ratio():
    rng = np.random.default_rng(0)
    height, width = 375, 500
    for _ in range(3000):
        p = A.random_resized_crop_params(height, width, rng)
        assert 0 <= p.top <= height - p.height and 0 <= p.left <= width - p.width
        if p.fallback:
            continue
        # rounding w and h moves the area and the aspect by at most half a pixel per side
        lo_a = (p.height - 0.5) * (p.width - 0.5) / (height * width)
        hi_a = (p.height + 0.5) * (p.width + 0.5) / (height * width)
        assert lo_a <= 1.0 and hi_a >= 0.08
        assert (p.width + 0.5) / (p.height - 0.5) >= 3 / 4 and (p.width - 0.5) / (p.height + 0.5) <= 4 / 3


def test_rrc_statistics_match_the_algorithm():
    # A 40x400 strip: one attempt fits with probability q (exact grid integral), so the central
    # fallback (h 40, w round(40 * 4/3) = 53, at the centre) happens with probability (1 - q)^10.
    q, _, _ = _rrc_grid(40, 400)
    rng = np.random.default_rng(1)
    n = 6000
    params = [A.random_resized_crop_params(40, 400, rng) for _ in range(n)]
    fallbacks = [p for p in params if p.fallback]
    expect = (1 - q) ** 10
    assert 0.5 < expect < 0.9
    assert abs(len(fallbacks) / n - expect) < 4 * math.sqrt(expect * (1 - expect) / n)
    assert all(p == A.CropParams(0, (400 - 53) // 2, 40, 53, True) for p in fallbacks)
    # 375x500 (H x W): mean area fraction and aspect of the accepted crops equal the conditional means.
    _, mean_area, mean_aspect = _rrc_grid(375, 500)
    rng = np.random.default_rng(2)
    params = [A.random_resized_crop_params(375, 500, rng) for _ in range(8000)]
    areas = np.array([p.height * p.width / (375 * 500) for p in params if not p.fallback])
    aspects = np.array([p.width / p.height for p in params if not p.fallback])
    assert abs(areas.mean() - mean_area) < 4 * areas.std() / math.sqrt(len(areas))
    assert abs(aspects.mean() - mean_aspect) < 4 * aspects.std() / math.sqrt(len(aspects))


def test_rrc_output_is_the_pil_resize_of_the_crop():
    img = _smooth_image(75, 100)
    rng = np.random.default_rng(4)
    p = A.random_resized_crop_params(75, 100, np.random.default_rng(4))
    out = A.random_resized_crop(img, rng, 32, interpolation="bicubic")
    expect = Image.fromarray(img).crop((p.left, p.top, p.left + p.width, p.top + p.height))
    np.testing.assert_array_equal(out, np.asarray(expect.resize((32, 32), Image.Resampling.BICUBIC)))


# --- evaluation resize + crop ----------------------------------------------------------------------------

def test_eval_resize_crop_by_hand():
    img = _smooth_image(300, 500)  # H 300, W 500: shorter side -> 256, longer int(256 * 500 / 300) = 426
    out = A.eval_resize_crop(img, 224, 0.875, "bilinear")
    big = Image.fromarray(img).resize((426, 256), Image.Resampling.BILINEAR)
    # centre crop: top round((256 - 224) / 2) = 16, left round((426 - 224) / 2) = 101
    np.testing.assert_array_equal(out, np.asarray(big.crop((101, 16, 325, 240))))
    assert A.resize_shorter(img, 256).shape == (256, 426, 3)
    assert A.resize_shorter(img.transpose(1, 0, 2), 256).shape == (426, 256, 3)
    assert math.floor(224 / 0.875) == 256 and math.floor(32 / 0.875) == 36
    with pytest.raises(ValueError, match="larger"):
        A.center_crop(img, 400)


# --- RandAugment ------------------------------------------------------------------------------------------

def test_op_arguments_at_magnitude_9():
    """timm's LEVEL_TO_ARG at m = 9 (level 0.9), written out from timm/data/auto_augment.py."""
    expect = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateXRel": 0.405,
              "TranslateYRel": 0.405, "Posterize": 3, "PosterizeIncreasing": 1, "Solarize": 230,
              "SolarizeIncreasing": 26, "SolarizeAdd": 99, "Color": 1.72, "ColorIncreasing": 1.81,
              "ContrastIncreasing": 1.81, "BrightnessIncreasing": 1.81, "SharpnessIncreasing": 1.81,
              "AutoContrast": None, "Equalize": None, "Invert": None}
    for name, value in expect.items():
        got = A.op_argument(name, 9.0)
        assert got == value if value is None or isinstance(value, int) else got == pytest.approx(value), name
    assert A.op_argument("Rotate", 9.0, negate=True) == pytest.approx(-27.0)
    assert A.op_argument("BrightnessIncreasing", 9.0, negate=True) == pytest.approx(0.19)
    assert A.op_argument("BrightnessIncreasing", 10.0, negate=True) == pytest.approx(0.1)
    assert A.op_argument("Posterize", 9.0, negate=True) == 3  # unsigned ops ignore the sign
    assert A.op_argument("SolarizeIncreasing", 0.0) == 256 and A.op_argument("PosterizeIncreasing", 0.0) == 4


@pytest.mark.parametrize("c", [3, 1])
def test_each_op_against_an_independent_computation(c):
    img = _smooth_image()[..., :c] if c == 3 else _smooth_image()[..., :1]
    x = img.astype(np.int64)
    pil = Image.fromarray(img if c == 3 else img[..., 0])
    fill = (124, 116, 104) if c == 3 else 115  # grayscale: the mean of the fill colour
    geo = dict(resample=Image.Resampling.BICUBIC, fillcolor=fill)

    def arr(im):
        a = np.asarray(im)
        return a[..., None] if a.ndim == 2 else a

    w, h = pil.size
    f32 = np.float32
    expect = {
        "Invert": 255 - x,
        "SolarizeIncreasing": np.where(x >= 26, 255 - x, x),
        "Solarize": np.where(x >= 230, 255 - x, x),
        "PosterizeIncreasing": x & 0b10000000,
        "Posterize": x & 0b11100000,
        "SolarizeAdd": np.where(x < 128, np.minimum(255, x + 99), x),
        "BrightnessIncreasing": np.clip(np.floor(x.astype(f32) * f32(1.81)), 0, 255),
        "AutoContrast": arr(ImageOps.autocontrast(pil)),
        "Equalize": arr(ImageOps.equalize(pil)),
        "Rotate": arr(pil.rotate(27.0, **geo)),
        "ShearX": arr(pil.transform(pil.size, Image.Transform.AFFINE, (1, 0.27, 0, 0, 1, 0), **geo)),
        "ShearY": arr(pil.transform(pil.size, Image.Transform.AFFINE, (1, 0, 0, 0.27, 1, 0), **geo)),
        "TranslateXRel": arr(pil.transform(pil.size, Image.Transform.AFFINE, (1, 0, 0.405 * w, 0, 1, 0),
                                           **geo)),
        "TranslateYRel": arr(pil.transform(pil.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, 0.405 * h),
                                           **geo)),
        "ContrastIncreasing": arr(ImageEnhance.Contrast(pil).enhance(1.81)),
        "ColorIncreasing": arr(ImageEnhance.Color(pil).enhance(1.81)),
        "SharpnessIncreasing": arr(ImageEnhance.Sharpness(pil).enhance(1.81)),
    }
    for name, want in expect.items():
        got = A.apply_rand_augment_op(img, name, 9.0)
        np.testing.assert_array_equal(got, want, err_msg=name)
    # negated arguments: rotation the other way, brightness 0.19
    np.testing.assert_array_equal(A.apply_rand_augment_op(img, "Rotate", 9.0, negate=True),
                                  arr(pil.rotate(-27.0, **geo)))
    np.testing.assert_array_equal(A.apply_rand_augment_op(img, "BrightnessIncreasing", 9.0, negate=True),
                                  np.clip(np.floor(x.astype(f32) * f32(0.19)), 0, 255))
    # a rotation at 27 degrees uncovers the corners: they take the fill colour
    corner = A.apply_rand_augment_op(img, "Rotate", 9.0)[0, 0]
    np.testing.assert_array_equal(corner, np.atleast_1d(fill))


def test_config_parser():
    cfg = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert cfg == A.RandAugmentConfig(magnitude=9.0, num_layers=2, prob=0.5, magnitude_std=0.5,
                                      magnitude_max=None, increasing=True)
    assert cfg.ops == A.RAND_INCREASING_TRANSFORMS and len(cfg.ops) == 15
    assert A.parse_rand_augment("rand-n3-m7-mmax15-p0.3").ops == A.RAND_TRANSFORMS
    cfg = A.parse_rand_augment("rand-n3-m7-mmax15-p0.3")
    assert cfg == A.RandAugmentConfig(7.0, 3, 0.3, 0.0, 15.0, False)
    assert A.parse_rand_augment("rand-mstd101").magnitude_std == math.inf
    for bad in ("rand-m9-x3", "rand-tweights", "rand-m", "augmix-m9", "rand-m9.5"):
        with pytest.raises(ValueError):
            A.parse_rand_augment(bad)


def test_rand_augment_plan_statistics():
    rng = np.random.default_rng(0)
    plans = [A.rand_augment_plan(rng, "rand-m9-mstd0.5-inc1") for _ in range(10000)]
    assert all(len(p) == 2 for p in plans)
    ops = [op for p in plans for op in p]
    n = len(ops)
    applied = np.array([op.applied for op in ops])
    assert abs(applied.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    counts = np.array([sum(op.name == name for op in ops) for name in A.RAND_INCREASING_TRANSFORMS])
    assert counts.sum() == n and np.all(np.abs(counts / n - 1 / 15) < 4 * math.sqrt((1 / 15) * (14 / 15) / n))
    negate = np.array([op.negate for op in ops])
    assert abs(negate.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    mags = np.array([op.magnitude for op in ops])
    assert mags.min() >= 0.0 and mags.max() <= 10.0
    # N(9, 0.5) clipped to [0, 10]: P(at 10) = 1 - Phi(2); mean = 9 - E[(X - 10)+]
    tail = 0.5 * math.erfc(2 / math.sqrt(2))
    excess = 0.5 * math.exp(-2) / math.sqrt(2 * math.pi) - 1.0 * tail
    assert abs((mags == 10.0).mean() - tail) < 4 * math.sqrt(tail * (1 - tail) / n)
    assert 8.99 < 9 - excess < 9.0
    assert abs(mags.mean() - (9 - excess)) < 4 * 0.5 / math.sqrt(n)
    assert abs(mags.std() - 0.5) < 0.02
    # without noise the magnitude is m exactly; mmax lifts the upper clip
    assert {op.magnitude for op in A.rand_augment_plan(rng, "rand-m9-inc1")} == {9.0}
    hi = [op.magnitude for _ in range(300) for op in A.rand_augment_plan(rng, "rand-m10-mstd2-mmax20")]
    assert max(hi) > 10.0 and max(hi) <= 20.0


def test_rand_augment_applies_its_plan():
    img = _smooth_image(40, 50)
    for seed in range(20):
        plan = A.rand_augment_plan(np.random.default_rng(seed), "rand-m9-mstd0.5-inc1")
        expect = img
        for op in plan:
            if op.applied:
                expect = A.apply_rand_augment_op(expect, op.name, op.magnitude, negate=op.negate)
        out = A.rand_augment(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, expect)


# --- random erasing ---------------------------------------------------------------------------------------

def test_random_erasing_statistics():
    H, W = 48, 64
    img = A.normalize(_image(H, W), MEAN, STD)
    rng = np.random.default_rng(0)
    n, erased = 3000, 0
    for _ in range(n):
        out = A.random_erasing(img, rng)
        changed = np.any(out != img, axis=-1)
        if not changed.any():
            continue
        erased += 1
        rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed.sum() == h * w  # one box
        assert (h + 0.5) * (w + 0.5) / (H * W) >= 0.02 and (h - 0.5) * (w - 0.5) / (H * W) <= 1 / 3
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        assert h < H and w < W
    assert abs(erased / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


def test_random_erasing_modes_and_purity():
    img = np.zeros((20, 30, 3), np.float32)
    before = img.copy()
    out = A.random_erasing(img, np.random.default_rng(0), prob=1.0, mode="pixel")
    np.testing.assert_array_equal(img, before)  # the input is untouched
    box = out[np.any(out != 0, axis=-1)]
    assert len(box) > 0 and abs(box.mean()) < 0.5 and 0.5 < box.std() < 1.5  # N(0, 1) noise
    rand = A.random_erasing(img + 5, np.random.default_rng(0), prob=1.0, mode="rand")
    colours = rand[np.any(rand != 5, axis=-1)]
    assert len(np.unique(colours, axis=0)) == 1  # one colour per box
    const = A.random_erasing(img + 5, np.random.default_rng(0), prob=1.0, mode="const")
    assert (const == 0).any() and set(np.unique(const)) <= {0.0, 5.0}
    np.testing.assert_array_equal(A.random_erasing(img, np.random.default_rng(1), prob=0.0), img)
    np.testing.assert_array_equal(A.random_erasing(img, np.random.default_rng(3), prob=1.0),
                                  A.random_erasing(img, np.random.default_rng(3), prob=1.0))
    with pytest.raises(ValueError, match="mode"):
        A.random_erasing(img, np.random.default_rng(0), mode="noise")
    multi = A.random_erasing(img, np.random.default_rng(2), prob=1.0, max_count=3)
    assert multi.shape == img.shape


def test_posterize_increasing_at_the_top_magnitude_keeps_no_bits():
    """PosterizeIncreasing at magnitude 10 (2% of rand-m9-mstd0.5 draws clip there) keeps 4 - 4 = 0 bits:
    a black image, what Pillow gave timm before Pillow refused bits < 1 (it raised here before)."""
    img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    assert A.op_argument("PosterizeIncreasing", 10.0) == 0
    out = A.apply_rand_augment_op(img, "PosterizeIncreasing", 10.0)
    assert out.shape == img.shape and out.dtype == np.uint8 and not out.any()
    np.testing.assert_array_equal(A.apply_rand_augment_op(img, "PosterizeIncreasing", 9.0), img & 0b10000000)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_works_at_every_magnitude_and_sign(channels):
    """The whole range mstd noise reaches (clipped to [0, 10]), both signs: no op refuses its argument."""
    img = np.random.default_rng(1).integers(0, 256, (9, 11, channels), dtype=np.uint8)
    for name in sorted(set(A.RAND_TRANSFORMS) | set(A.RAND_INCREASING_TRANSFORMS)):
        for magnitude in np.linspace(0.0, 10.0, 21):
            for negate in (False, True):
                out = A.apply_rand_augment_op(img, name, float(magnitude), negate=negate)
                assert out.shape == img.shape and out.dtype == np.uint8, (name, magnitude, negate)


def test_cifar_crop_flip_batch_is_a_crop_of_reflect_padding_and_flip():
    """The vectorised batch form (what the pipeline runs for images already at the output size)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = A.cifar_crop_flip_batch(images, np.random.default_rng(1), pad=1)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifts, flips = set(), 0
    for k in range(64):
        matches = [(dy, dx, f) for dy in range(3) for dx in range(3) for f in (0, 1)
                   if np.array_equal(out[k], (lambda c: c[:, ::-1] if f else c)(
                       padded[k, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {k} is not a crop of its reflect-padded original"
        shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(shifts) == 9  # every shift in [-1, 1]^2 occurs
    assert 16 < flips < 48  # about half are flipped
    batch = A.make_batch_train_transform("cifar", 8, (0.5,) * 3, (0.25,) * 3, (8, 8))
    assert batch(images, np.random.default_rng(2)).dtype == np.float32
    assert A.make_batch_train_transform("cifar", 16, (0.5,) * 3, (0.25,) * 3, (8, 8)) is None  # a resize
    assert A.make_batch_train_transform("deit", 8, (0.5,) * 3, (0.25,) * 3, (8, 8)) is None
