"""Benchmark: input pipeline throughput (images/s), before and after the move to grain, and ImageNet-shaped.

Rows, all in one run on this machine:

* **before / after, small data in memory** (digits 8x8x1, CIFAR-shaped 32x32x3, Tiny-ImageNet-shaped
  64x64x3; synthetic uint8 images): the training iterator (shuffle, reflect-pad crop, flip,
  normalisation, transfer to a global sharded jax.Array) and the evaluation iterator. "before" is the
  pipeline as it was before grain (``alite_jax/data/pipeline.py`` and ``sources.py`` of git revision
  ``--before``, loaded from git into a temporary package); "after" is today's.
* **ImageNet-shaped**: records holding JPEG bytes of ImageNet's typical size (500x375, ~100 KB of a
  textured image) decoded with PIL per record as TFDS's data sources do, then the ``imagenet`` or ``deit``
  recipe (random-resized crop 224, flip; DeiT adds RandAugment rand-m9-mstd0.5-inc1 and random erasing),
  batch 128, with 0, 1 and 2 grain worker processes. The per-worker rate gives the number of host cores
  a GPU needs to feed a training rate: ``rate / per-worker rate``.

Run: ``python benchmarks/data_pipeline.py`` (``--gpu_rate`` sets the training rates, images/s, that the
last table divides; defaults from benchmarks/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from alite_jax import data  # noqa: E402
from alite_jax.data.sources import ArrayRecords, SplitSource  # noqa: E402
from alite_jax.distributed import make_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Training rates, images/s: the H200's measured float32 rates at 32x32, batch 128 (RESULTS.md), and the
# ImageNet-layout 224x224 rates they imply scaled by the models' MACs (estimates: SA-ResNet26 0.695 G ->
# 2.242 G MACs, ResNet-50 1.298 G -> 4.089 G; costs.py).
GPU_RATES = ["sa_resnet26_32px_h200=5815", "resnet50_32px_h200=9289", "sa_resnet26_224px_h200_est=1803",
             "resnet50_224px_h200_est=2949"]


def load_old_pipeline(rev: str) -> types.ModuleType:
    """``alite_jax.data.pipeline`` as it was at git revision ``rev`` (with its ``sources``), imported
    from a temporary package so both versions run in this process."""
    tmp = Path(tempfile.mkdtemp())
    package = tmp / "old_data"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("pipeline", "sources"):
        text = subprocess.run(["git", "show", f"{rev}:alite_jax/data/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(text.replace("alite_jax.data.sources", "old_data.sources"))
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("old_data.pipeline", package / "pipeline.py")
    importlib.import_module("old_data")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data.pipeline"] = module
    spec.loader.exec_module(module)
    return module


def synthetic(n: int, size: int, channels: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
            rng.integers(0, classes, n).astype(np.int32))


def old_pipeline(old, images, labels, batch: int, classes: int):
    split = old.Split(images, labels, classes, tuple(map(str, range(classes))))
    n, size = len(labels), images.shape[1]
    return old.InputPipeline(
        train_shards=[split], eval_shards=[split], shard_ids=[0], num_shards=1, batch_size=batch,
        eval_batch_size=batch, image_size=size, seed=0, mean=np.full(images.shape[-1], 0.5, np.float32),
        std=np.full(images.shape[-1], 0.25, np.float32), mesh=make_mesh(), num_classes=classes,
        class_names=split.class_names, steps_per_epoch=n // batch, eval_steps=-(-n // batch),
        num_eval_examples=n)


def new_pipeline(source: SplitSource, batch: int, size: int, recipe: str = "cifar", workers: int = 0,
                 normalization: str = "dataset"):
    cfg = data.default_config("synthetic", image_size=size, batch_size=batch)
    cfg.update(augment=recipe, workers=workers, normalization=normalization)
    return data.build_input_pipeline(cfg, source, source)


def rate(batches, count: int, batch: int, warmup: int = 2) -> float:
    """images/s over ``count`` batches after ``warmup`` (worker start-up is not the steady rate)."""
    batches = iter(batches)
    for _ in range(warmup):
        jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(count):
        jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
    close = getattr(batches, "close", None)
    if close:
        close()
    return count * batch / elapsed


class JpegRecords:
    """Records of JPEG bytes decoded with PIL per read, as TFDS's data sources decode (picklable)."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray):
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = np.asarray(Image.open(io.BytesIO(self.jpegs[i])).convert("RGB"))
        return {"image": image, "label": int(self.labels[i])}


def imagenet_shaped(n: int) -> SplitSource:
    """n JPEGs of 500x375 (ImageNet's commonest size), textured so they compress like photos."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    jpegs = []
    for k in range(n):
        base = 128 + 60 * np.sin(xx / (7 + k % 5) + k) * np.cos(yy / (11 + k % 3))
        image = np.clip(base[..., None] + rng.normal(0, 25, (375, 500, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=90)
        jpegs.append(out.getvalue())
    print(f"   ImageNet-shaped JPEGs: 500x375, {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB on average")
    return SplitSource(JpegRecords(jpegs, rng.integers(0, 1000, n)), 1000, tuple(map(str, range(1000))), 3,
                       None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="ed12633", help="git revision of the pre-grain pipeline")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--gpu_rate", nargs="*", default=GPU_RATES,
                        help="name=images/s training rates to divide by the per-worker decode rate")
    args = parser.parse_args()
    print(f"{jax.devices()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    old = load_old_pipeline(args.before)

    print("\n1. small data in memory: train / eval images/s, before (in-memory numpy, prefetch thread) and "
          "after (grain)")
    print(f"   {'data':<28} {'batch':>5} {'train before':>13} {'train after':>12} {'ratio':>6} "
          f"{'eval before':>12} {'eval after':>11} {'ratio':>6}")
    for name, n, size, channels, batch, classes in (
            ("digits 8x8x1", 1438, 8, 1, 64, 10), ("CIFAR-shaped 32x32x3", 20000, 32, 3, 100, 10),
            ("Tiny-ImageNet-shaped 64x64x3", 20000, 64, 3, 32, 200)):
        images, labels = synthetic(n, size, channels, classes)
        before = old_pipeline(old, images, labels, batch, classes)
        source = SplitSource(ArrayRecords(images, labels), classes, tuple(map(str, range(classes))),
                             channels, (size, size))
        after = new_pipeline(source, batch, size)
        steps = min(args.steps, before.steps_per_epoch - 2, before.eval_steps - 2)
        tb, ta = rate(before.train_epoch(0), steps, batch), rate(after.train_epoch(0), steps, batch)
        eb, ea = rate(before.eval_batches(), steps, batch), rate(after.eval_batches(), steps, batch)
        print(f"   {name:<28} {batch:>5} {tb:>13,.0f} {ta:>12,.0f} {ta / tb:>6.2f} {eb:>12,.0f} {ea:>11,.0f} "
              f"{ea / eb:>6.2f}")

    print("\n2. ImageNet-shaped: JPEG decode + augmentation to 224x224, batch 128, train images/s")
    source = imagenet_shaped(640)
    per_worker = {}
    print(f"   {'recipe':<10} {'workers':>7} {'images/s':>9} {'per worker':>10}")
    for recipe in ("imagenet", "deit"):
        for workers in (0, 1, 2):
            pipe = new_pipeline(source, 128, 224, recipe, workers, normalization="imagenet")
            r = rate(pipe.train_iterator(), 4, 128, warmup=1)
            if workers == 1:
                per_worker[recipe] = r
            each = f"{r / workers:>10,.0f}" if workers else f"{'(inline)':>10}"
            print(f"   {recipe:<10} {workers:>7} {r:>9,.0f} {each}")

    print("\n3. host cores a GPU needs to feed its training rate (rate / images/s of one worker)")
    for item in args.gpu_rate:
        name, value = item.split("=")
        print(f"   {name:<24} {float(value):>8,.0f} images/s: " + ", ".join(
            f"{recipe} {float(value) / r:.0f} cores" for recipe, r in per_worker.items()))
    print(f"\nload at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
