"""Benchmark: input pipeline throughput (images/s) for CIFAR-shaped and Tiny-ImageNet-shaped data.

Times, on this machine, the training iterator (permutation, reflect-pad crop, flip, normalisation,
transfer to a global sharded jax.Array, with the background prefetch thread) and the evaluation
iterator, on synthetic uint8 images of the real shapes held in memory as the pipeline holds real data.
Compare the numbers with the training step rate (benchmarks/RESULTS.md) to see whether input can be the
bottleneck. Run: ``python benchmarks/data_pipeline.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alite_jax.data.pipeline import InputPipeline  # noqa: E402
from alite_jax.distributed import make_mesh  # noqa: E402
from alite_jax.data.sources import Split  # noqa: E402


def pipeline(n: int, size: int, batch: int, classes: int) -> InputPipeline:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                  rng.integers(0, classes, n).astype(np.int32), classes, tuple(map(str, range(classes))))
    return InputPipeline(
        train_shards=[split], eval_shards=[split], shard_ids=[0], num_shards=1, batch_size=batch,
        eval_batch_size=batch, image_size=size, seed=0, mean=np.full(3, 0.5, np.float32),
        std=np.full(3, 0.25, np.float32), mesh=make_mesh(), num_classes=classes,
        class_names=split.class_names, steps_per_epoch=n // batch, eval_steps=-(-n // batch),
        num_eval_examples=n)


def rate(batches, count: int, batch: int) -> float:
    start = time.perf_counter()
    for i, b in enumerate(batches):
        jax.block_until_ready(b)
        if i + 1 == count:
            break
    return count * batch / (time.perf_counter() - start)


def main() -> None:
    print(f"{jax.devices()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"   {'data':<28} {'batch':>5} {'train img/s':>12} {'eval img/s':>11}")
    for name, n, size, batch, classes in (("CIFAR-shaped 32x32x3", 20000, 32, 100, 10),
                                          ("Tiny-ImageNet-shaped 64x64x3", 20000, 64, 32, 200)):
        pipe = pipeline(n, size, batch, classes)
        steps = min(150, pipe.steps_per_epoch)
        train = rate(pipe.train_epoch(0), steps, batch)
        evals = rate(pipe.eval_batches(), steps, batch)
        print(f"   {name:<28} {batch:>5} {train:>12,.0f} {evals:>11,.0f}")
    print(f"load at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
