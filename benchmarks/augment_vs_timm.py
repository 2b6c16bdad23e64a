"""One-off cross-check of alite_jax/data/augment.py and mixup.py against timm and torchvision (not in CI).

Run with a Python that has torch, torchvision and timm (no jax needed):

    <python with torch and timm> benchmarks/augment_vs_timm.py [--jax-python python]

The host-side module is loaded from this worktree by file path (the package's __init__ imports jax).
Compared: seed-free statistics (the random streams differ by design) and, for RandAugment, each op's
output at a fixed magnitude, which must be equal pixel for pixel. Mixup statistics of alite's
``mix_params`` come from a subprocess run with ``--jax-python`` (a Python with jax), timm's from its
``Mixup`` on torch tensors.
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DRAWS = 20000


def load_augment():
    path = os.path.join(ROOT, "alite_jax/data/augment.py")
    spec = importlib.util.spec_from_file_location("alite_augment", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["alite_augment"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def image_500x375():
    y, x = np.mgrid[0:375, 0:500]
    rng = np.random.default_rng(0)
    img = np.stack([x * 255 // 499, y * 255 // 374, (x * y) % 256], -1) + rng.integers(-20, 21, (375, 500, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def stats(a):
    a = np.asarray(a, np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std()), 4)}


def rrc(A):
    import torch
    from torchvision.transforms import RandomResizedCrop
    from PIL import Image

    torch.manual_seed(0)
    pil = Image.fromarray(image_500x375())
    rng = np.random.default_rng(0)
    mine = [A.random_resized_crop_params(375, 500, rng) for _ in range(N_DRAWS)]
    theirs = [RandomResizedCrop.get_params(pil, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N_DRAWS)]
    area = 375 * 500
    out = {}
    for name, ps in (("alite", [(p.height, p.width) for p in mine]),
                     ("torchvision", [p[2:] for p in theirs])):
        hw = np.array(ps, np.float64)
        out[name] = {"area_fraction": stats(hw[:, 0] * hw[:, 1] / area),
                     "aspect_w_over_h": stats(hw[:, 1] / hw[:, 0])}
    return out


def rand_augment_ops(A):
    import timm.data.auto_augment as taa
    from PIL import Image

    img = image_500x375()
    gray = img[..., :1]
    hparams = dict(translate_const=int(224 * 0.45), img_mean=(124, 116, 104), translate_pct=0.45)
    res = {}
    for name in sorted(set(A.RAND_TRANSFORMS + A.RAND_INCREASING_TRANSFORMS)):
        for negate in (False, True):
            taa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
            level_fn = taa.LEVEL_TO_ARG[name]
            args = level_fn(9.0, hparams) if level_fn is not None else ()
            for label, arr in (("rgb", img), ("gray", gray)):
                pil = Image.fromarray(arr if arr.shape[-1] == 3 else arr[..., 0])
                kwargs = dict(fillcolor=(124, 116, 104) if label == "rgb" else 115,
                              resample=Image.Resampling.BICUBIC)
                want = np.asarray(taa.NAME_TO_OP[name](pil, *args, **kwargs)).astype(np.int64)
                got = A.apply_rand_augment_op(arr, name, 9.0, negate=negate).astype(np.int64)
                if want.ndim == 2:
                    want = want[..., None]
                mine_arg = A.op_argument(name, 9.0, negate)
                arg_ok = (not args and mine_arg is None) or (args and math.isclose(args[0], mine_arg))
                key = f"{name}{'(-)' if negate else ''}/{label}"
                res[key] = {"max_abs_diff": int(np.abs(want - got).max()), "arg_equal": bool(arg_ok),
                            "arg": None if mine_arg is None else round(float(mine_arg), 4)}
    return res


def rand_augment_magnitude(A):
    """Distribution of the magnitude actually used: timm's AugmentOp with hparams as DeiT vs our plan."""
    import random

    import timm.data.auto_augment as taa

    random.seed(0)
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    ra = taa.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    seen = []
    for op in ra.ops:  # record the level each op computes by wrapping its level function
        orig = op.level_fn

        def spy(level, hp, _orig=orig):
            seen.append(level)
            return _orig(level, hp) if _orig is not None else ()
        op.level_fn = spy
        op.aug_fn = lambda img, *a, **k: img
    counts = []
    for _ in range(N_DRAWS // 2):
        before = len(seen)
        ra(None)
        counts.append(len(seen) - before)
    rng = np.random.default_rng(0)
    plans = [A.rand_augment_plan(rng, "rand-m9-mstd0.5-inc1") for _ in range(N_DRAWS // 2)]
    ours = [op.magnitude for p in plans for op in p if op.applied]
    return {"timm": {"magnitude": stats(seen), "at_10": round(float(np.mean(np.array(seen) == 10.0)), 4),
                     "applied_ops_per_image": stats(counts)},
            "alite": {"magnitude": stats(ours), "at_10": round(float(np.mean(np.array(ours) == 10.0)), 4),
                      "applied_ops_per_image": stats([sum(op.applied for op in p) for p in plans])}}


def random_erasing(A):
    import random

    import torch
    from timm.data.random_erasing import RandomErasing

    random.seed(0)
    torch.manual_seed(0)
    H, W = 224, 224
    re_ = RandomErasing(probability=0.25, mode="pixel", device="cpu")
    rng = np.random.default_rng(0)
    n = 4000
    res = {}
    for name in ("timm", "alite"):
        erased, areas, aspects = 0, [], []
        for _ in range(n):
            if name == "timm":
                x = torch.full((3, H, W), 100.0)
                changed = (re_(x) != 100.0).any(0).numpy()
            else:
                x = np.full((H, W, 3), 100.0, np.float32)
                changed = (A.random_erasing(x, rng, prob=0.25, mode="pixel") != 100.0).any(-1)
            if changed.any():
                erased += 1
                rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
                h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
                areas.append(h * w / (H * W))
                aspects.append(h / w)
        res[name] = {"erased_fraction": round(erased / n, 4), "area_fraction": stats(areas),
                     "log_aspect_h_over_w": stats(np.log(aspects))}
    return res


def eval_crop(A):
    from PIL import Image
    from timm.data import create_transform

    img = image_500x375()
    res = {}
    for interp in ("bilinear", "bicubic"):
        t = create_transform(224, is_training=False, interpolation=interp, crop_pct=0.875)
        want = (t(Image.fromarray(img)).numpy().transpose(1, 2, 0))
        got = A.make_eval_transform("deit", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                    interpolation=interp)(img)
        res[interp] = {"max_abs_diff_normalised": float(np.abs(want - got).max())}
    return res


def timm_mixup():
    import torch
    from timm.data.mixup import Mixup

    np.random.seed(0)
    B, K, H, W = 8, 10, 32, 32
    res = {}
    for name, kw in (("deit", {}), ("mixup_only", {"cutmix_alpha": 0.0}),
                     ("cutmix_only", {"mixup_alpha": 0.0}), ("prob0.3", {"prob": 0.3})):
        args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                    num_classes=K)
        args.update(kw)
        m = Mixup(**args)
        lams, onmax = [], []
        y = torch.arange(B) % K
        for _ in range(N_DRAWS):
            x = torch.zeros(B, 3, H, W)
            _, t = m(x, y.clone())
            # lam from the targets: t[0, y0] = lam * on + (1 - lam) * off (y0 != flipped y0)
            off, on = 0.1 / K, 0.9 + 0.1 / K
            lams.append(float((t[0, y[0]] - off) / (on - off)))
            onmax.append(float(t.sum(1).max()))
        lams = np.array(lams)
        res[name] = {"lam": stats(lams), "frac_unmixed": round(float(np.mean(np.abs(lams - 1) < 1e-6)), 4),
                     "max_label_mass": round(max(onmax), 6)}
    return res


ALITE_MIXUP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from alite_jax.data.mixup import mix_batch
B, K, H, W, N = 8, 10, 32, 32, int(sys.argv[2])
y = jnp.arange(B) % K
f = jax.jit(jax.vmap(lambda k, kw: mix_batch(k, jnp.zeros((B, H, W, 3)), y, K, **kw)[1], in_axes=(0, None)))
res = {}
for name, kw in (("deit", {}), ("mixup_only", {"cutmix_alpha": 0.0}), ("cutmix_only", {"mixup_alpha": 0.0}),
                 ("prob0.3", {"prob": 0.3})):
    full = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    full.update(kw)
    t = np.asarray(f(jax.random.split(jax.random.key(0), N), full), np.float64)
    off, on = 0.1 / K, 0.9 + 0.1 / K
    lams = (t[:, 0, 0] - off) / (on - off)
    res[name] = {"lam": {"mean": round(float(lams.mean()), 4), "std": round(float(lams.std()), 4)},
                 "frac_unmixed": round(float(np.mean(np.abs(lams - 1) < 1e-6)), 4),
                 "max_label_mass": round(float(t.sum(-1).max()), 6)}
print(json.dumps(res))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jax-python", default="python3", help="a Python with jax, for alite's mixup")
    args = parser.parse_args()
    A = load_augment()
    report = {"rrc_500x375": rrc(A), "rand_augment_ops_m9": rand_augment_ops(A),
              "rand_augment_magnitude": rand_augment_magnitude(A), "random_erasing_224": random_erasing(A),
              "eval_crop_224": eval_crop(A), "mixup": {"timm": timm_mixup()}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "venv-ref" not in p)
    out = subprocess.run([args.jax_python, "-c", ALITE_MIXUP, ROOT, str(N_DRAWS)], capture_output=True,
                         text=True, env=env)
    report["mixup"]["alite"] = json.loads(out.stdout) if out.returncode == 0 else out.stderr[-2000:]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
