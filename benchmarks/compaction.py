"""Compaction of pruned SA-ResNet students on this machine: speed, per-layer split, sparse kernels, sizes.

    python benchmarks/compaction.py [--width 1.0] [--reps 5] [--batch 64] [--skip-sparse]

Prints, for SA-ResNet26 (hybrid, CIFAR layout, 32x32, 10 classes, random weights and BN statistics):

1. batch-1 latency and batch-``--batch`` images/s of the dense student, the masked student at column
   density 0.5 (the same network with zero rows) and its compact form (alite_jax.compact.column), the
   three run interleaved in one process (one call of each per round, median over rounds), so that load
   from other processes on a shared machine hits them alike; and the ratios compact / masked;
2. the per-layer split (stem, the 1x1 convolutions and projections, the attention's neighbourhood
   computation, the head) of the compact model and of the same compact code with no row dropped;
3. the k x k conv methods ("gather", "taps", "conv") on the stem and on a 3x3 64->64 conv at d = 0.5;
4. jax.experimental.sparse (BCOO) vs the dense matmul for 1x1 projections and the head at density 0.1,
   batch 1 and ``--batch``;
5. artifact sizes: dense, compact column d = 0.5, irregular d = 0.1 stored as values + bitmask.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from timing import interleaved  # benchmarks/timing.py, beside this script

from alite_jax.compact.column import compact_conv, compact_student, conv_apply, dense_apply, save_compact
from alite_jax.compact.sparse_store import stored_bytes
from alite_jax.models import create_model
from alite_jax.models.local_attention import IMPLS, attention_scales
from alite_jax.models.local_attention.layer import rel_tables
from alite_jax.sparsity import apply_masks, init_masks


def random_batch_stats(batch_stats: Any, rng: np.random.Generator) -> Any:
    """BatchNorm running statistics drawn away from init's (mean 0, var 1), so that eval mode is not
    the identity and folding them is exercised: variances in [0.5, 2], means N(0, 0.2)."""

    def perturb(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        if name == "mean":
            return jnp.asarray(rng.normal(0, 0.2, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, batch_stats)


def random_student(width: float, size: int, density: float, seed: int = 0):
    """SA-ResNet26 (hybrid, CIFAR) with random weights, random BN statistics, and column masks."""
    model = create_model("sa_resnet26", 10, width=width)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    dense = {"params": variables["params"],
             "batch_stats": random_batch_stats(variables["batch_stats"], np.random.default_rng(seed))}
    masks, _ = init_masks(dense["params"], density, "column", seed=seed)
    masked = {"params": apply_masks(dense["params"], masks), "batch_stats": dense["batch_stats"]}
    return model, dense, masked


def model_speed(model, dense, masked, size: int, batch: int, reps: int) -> dict[str, dict[str, float]]:
    compact, params = compact_student(model, masked)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    compact_fn = jax.jit(compact.apply)
    out = {}
    for b in (1, batch):
        x = jax.random.normal(jax.random.key(b), (b, size, size, 3))
        want = forward(masked, x)
        err = float(jnp.max(jnp.abs(compact_fn(params, x) - want)))
        print(f"  batch {b}: max |compact - masked| logits = {err:.2e} (max |logit| "
              f"{float(jnp.max(jnp.abs(want))):.2f})", flush=True)
        out[b] = interleaved({"dense": partial(forward, dense, x), "masked": partial(forward, masked, x),
                              "compact": partial(compact_fn, params, x)}, reps if b > 1 else 4 * reps)
    return out


def layer_split(model, variables, size: int, batch: int, reps: int) -> dict[str, float]:
    """Seconds per batch of each part of the compact model, summed over blocks (each part jitted alone
    on inputs of its real shape)."""
    compact, params = compact_student(model, variables)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    parts: dict[str, float] = {"stem": 0.0, "1x1 convs (conv1, conv3, proj)": 0.0,
                               "q/k/v projections": 0.0, "attention neighbourhood": 0.0, "head": 0.0}
    stem = jax.jit(compact.stem_apply)
    parts["stem"] += interleaved({"s": partial(stem, params, x)}, reps)["s"]
    h = stem(params, x)
    opts = compact.attention
    for s, blocks in enumerate(compact.stage_sizes):
        for i in range(blocks):
            stride = 2 if s > 0 and i == 0 else 1
            p = params[f"stage{s + 1}_block{i + 1}"]
            conv1 = jax.jit(lambda p, x: jax.nn.relu(dense_apply(p["conv1"], x)))
            y = conv1(p, h)
            a = p["attention"]

            def qkv(a, y):
                return dense_apply(a["query"], y), dense_apply(a["key"], y), dense_apply(a["value"], y)

            q, k, v = jax.jit(qkv)(a, y)
            c, n = q.shape[-1], opts.num_heads
            b_, hh, ww = q.shape[:3]

            def attend(a, q, k, v):
                rows, cols = rel_tables(a["rel_rows"], a["rel_cols"], n, opts.rel_layout)
                qk_scale, qr_scale = attention_scales(opts.scaling, c, n)
                shape = (b_, hh, ww, n, c // n)
                out = IMPLS[opts.impl](q.reshape(shape), k.reshape(shape), v.reshape(shape), rows, cols,
                                       kernel_size=opts.kernel_size, qk_scale=qk_scale, qr_scale=qr_scale)
                out = out.reshape(b_, hh, ww, c)
                if stride > 1:
                    out = jax.lax.reduce_window(out, 0.0, jax.lax.add, (1, stride, stride, 1),
                                                (1, stride, stride, 1), "VALID") / stride ** 2
                return out

            att = jax.jit(attend)
            z = att(a, q, k, v)

            def tail(p, z, x):
                out = dense_apply(p["conv3"], jax.nn.relu(z))
                if "proj" in p:
                    x = dense_apply(p["proj"], x[:, ::stride, ::stride])
                return jax.nn.relu(out + x)

            tail_fn = jax.jit(tail)
            t = interleaved({"conv1": partial(conv1, p, h), "qkv": partial(jax.jit(qkv), a, y),
                             "attend": partial(att, a, q, k, v), "tail": partial(tail_fn, p, z, h)}, reps)
            parts["1x1 convs (conv1, conv3, proj)"] += t["conv1"] + t["tail"]
            parts["q/k/v projections"] += t["qkv"]
            parts["attention neighbourhood"] += t["attend"]
            h = tail_fn(p, z, h)
    pooled = jnp.mean(h, axis=(1, 2))
    head = jax.jit(dense_apply)
    parts["head"] += interleaved({"h": partial(head, params["head"], pooled)}, reps)["h"]
    # The whole model once more, for the parts' sum against the whole.
    whole = partial(jax.jit(compact.apply), params, x)
    parts["(whole model, one jit)"] = interleaved({"m": whole}, reps)["m"]
    return parts


def kxk_methods(batch: int, reps: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    out = {}
    for label, (cin, cout, size) in {"stem 3x3 3->64 @32x32": (3, 64, 32),
                                     "conv 3x3 64->64 @32x32": (64, 64, 32)}.items():
        kernel = rng.normal(size=(3, 3, cin, cout))
        kernel[rng.random((3, 3, cin)) < 0.5] = 0
        p = compact_conv(kernel, (np.ones(cout), np.zeros(cout)))  # no BatchNorm to fold: identity
        x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
        dense_k = jnp.asarray(kernel, jnp.float32)
        cases = {m: partial(jax.jit(lambda p, x, m=m: conv_apply(p, x, 3, 1, 1, m)), p, x)
                 for m in ("gather", "taps", "conv")}
        cases["lax.conv (masked dense)"] = partial(jax.jit(lambda k, x: jax.lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))), dense_k, x)
        out[label] = interleaved(cases, reps)
    return out


def sparse_vs_dense(batch: int, reps: int, density: float = 0.1) -> dict[str, dict[str, float]]:
    """BCOO (jax.experimental.sparse) vs dense matmul, SA-ResNet26's 1x1 shapes at 32x32 input."""
    shapes = {"stage1 q/k/v 64x64 @32x32": (64, 64, 32 * 32),
              "stage3 q/k/v 256x256 @8x8": (256, 256, 64),
              "stage3 conv3 256x1024 @8x8": (256, 1024, 64), "stage4 q/k/v 512x512 @4x4": (512, 512, 16),
              "head 2048x10": (2048, 10, 1)}
    rng = np.random.default_rng(0)
    out = {}
    for label, (cin, cout, pixels) in shapes.items():
        w = rng.normal(size=(cin, cout)) * (rng.random((cin, cout)) < density)
        w = jnp.asarray(w, jnp.float32)
        ws = sparse.BCOO.fromdense(w)
        for b in (1, batch):
            x = jax.random.normal(jax.random.key(0), (b * pixels, cin))
            dense_fn = jax.jit(lambda x, w: x @ w)
            sparse_fn = jax.jit(lambda x, ws: x @ ws)
            np.testing.assert_allclose(sparse_fn(x, ws), dense_fn(x, w), atol=1e-3)
            out[f"{label}, batch {b}"] = interleaved({"dense": partial(dense_fn, x, w),
                                                      "bcoo": partial(sparse_fn, x, ws)}, reps)
    return out


def x64_check(width: float, size: int, density: float, batch: int = 4) -> None:
    """How far the masked float32 model and the compact one are from the masked model in float64: the
    scale of float32 rounding that the equality tolerance (docs/compaction.md) has to allow for."""
    model, _, masked = random_student(width, size, density)
    rng = np.random.default_rng(1)
    # Non-trivial BN scales and shifts, so that the logits reach a few units.
    masked = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if path[-1].key == "scale" else leaf, masked)
    compact, params = compact_student(model, masked)
    x = jax.random.normal(jax.random.key(7), (batch, size, size, 3))
    f32 = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(masked, x))
    c32 = np.asarray(jax.jit(compact.apply)(params, x))
    jax.config.update("jax_enable_x64", True)
    v64 = jax.tree.map(lambda t: np.asarray(t, np.float64), masked)
    model64 = model.clone(dtype=jnp.float64)  # float64 up to the pooled features (the head is float32)
    f64 = np.asarray(jax.jit(lambda v, x: model64.apply(v, x)[0])(v64, np.asarray(x, np.float64)))
    jax.config.update("jax_enable_x64", False)
    print(f"max |logit| {np.abs(f64).max():.2f}; max |masked f32 - masked f64| "
          f"{np.abs(f32 - f64).max():.2e}; max |compact f32 - masked f64| {np.abs(c32 - f64).max():.2e}; "
          f"max |compact - masked| (both f32) {np.abs(c32 - f32).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--skip-split", action="store_true")
    parser.add_argument("--x64-check", action="store_true", help="only the float64 check of the rounding")
    args = parser.parse_args()
    if args.x64_check:
        x64_check(args.width, args.size, args.density)
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"SA-ResNet26 hybrid CIFAR, width {args.width}, {args.size}x{args.size}, column density "
          f"{args.density}", flush=True)
    model, dense, masked = random_student(args.width, args.size, args.density)

    print("\n## sizes (uncompressed .npz)")
    dense_bytes = stored_bytes(dense, sparse=False)
    compact, params = compact_student(model, masked)
    with tempfile.TemporaryDirectory() as tmp:
        compact_bytes = save_compact(os.path.join(tmp, "compact.npz"), compact, params)
    masks, _ = init_masks(dense["params"], 0.1, "irregular", seed=1)
    irregular = {"params": apply_masks(dense["params"], masks), "batch_stats": dense["batch_stats"]}
    irregular_bytes = stored_bytes(irregular)
    print(f"dense artifact: {dense_bytes / 1e6:.2f} MB")
    print(f"compact column d={args.density}: {compact_bytes / 1e6:.2f} MB = "
          f"{compact_bytes / dense_bytes:.1%} of dense")
    print(f"irregular d=0.1 as values + bitmask: {irregular_bytes / 1e6:.2f} MB = "
          f"{irregular_bytes / dense_bytes:.1%} of dense")

    print(f"\n## model speed (median of {args.reps} interleaved rounds at batch {args.batch}, "
          f"{4 * args.reps} at batch 1)", flush=True)
    speed = model_speed(model, dense, masked, args.size, args.batch, args.reps)
    for b, t in speed.items():
        if b == 1:
            print("batch-1 latency (ms): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in t.items())
                  + f"; masked/compact = {t['masked'] / t['compact']:.2f}x")
        else:
            print(f"batch-{b} images/s: " + ", ".join(f"{k} {b / v:.1f}" for k, v in t.items())
                  + f"; compact/masked = {t['masked'] / t['compact']:.2f}x")

    if not args.skip_split:
        print(f"\n## per-layer split at batch {args.batch} (ms per batch, each part jitted alone)",
              flush=True)
        unpruned = layer_split(model, dense, args.size, args.batch, args.reps)
        pruned = layer_split(model, masked, args.size, args.batch, args.reps)
        print(f"{'part':40s} {'no row dropped':>15s} {'compact':>10s} {'ratio':>7s}")
        for k in unpruned:
            print(f"{k:40s} {1e3 * unpruned[k]:15.1f} {1e3 * pruned[k]:10.1f} {unpruned[k] / pruned[k]:7.2f}")

    print(f"\n## k x k conv methods at batch {args.batch}, d=0.5 columns (ms)", flush=True)
    for label, t in kxk_methods(args.batch, args.reps).items():
        print(f"{label}: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in t.items()))

    if not args.skip_sparse:
        print("\n## BCOO vs dense matmul at density 0.1 (ms)", flush=True)
        for label, t in sparse_vs_dense(args.batch, args.reps).items():
            print(f"{label}: dense {1e3 * t['dense']:.3f}, bcoo {1e3 * t['bcoo']:.3f}, "
                  f"bcoo/dense = {t['bcoo'] / t['dense']:.1f}x")


if __name__ == "__main__":
    main()
