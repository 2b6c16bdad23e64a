"""Measured inference: every deployable form side by side, in JAX and through each artifact's
own runtime, on this machine.

    python benchmarks/inference.py [--width 0.5] [--reps 5] [--batch 64] [--skip-tflite]

Rows (random weights and BatchNorm statistics, 32x32 CIFAR-shaped inputs, 10 classes):

* the dense teacher (ResNet-50), the dense student (SA-ResNet26, hybrid), the masked student at column
  density 0.5 and at irregular density 0.1 (zeros in place: the trained form), the compact column
  student (``alite_jax.compact.column``);
* a DeiT-Ti-shaped ViT at 32x32 (patch 4: 64 patches, 12 blocks, D 192) and the SPViT model of the
  released SPViT-DeiT-Ti architecture (two 1x1 conv blocks, then MSA; the released FFN widths) in its
  fine-tuning (unfolded) and inference (folded) forms;
* each JAX row's StableHLO artifact (``jax.export``, deserialized, its ``call`` jitted; the irregular
  student's as the export writes it, its weights stored sparse in a second program run once beforehand)
  and TFLite artifact (LiteRT interpreter, 2 threads), batch 1 latency and batch ``--batch`` images/s,
  with the artifact's size.

The students' local attention is the export's: ``impl="blocked"`` in JAX and StableHLO,
``"blocked_unchunked"`` in TFLite (``alite_jax/models/local_attention/blocked.py``).

Within each batch size every JAX row runs interleaved with the others (one call of each per round, the
median over rounds), so load from other processes hits them alike; the artifacts are timed after them in
the same way. Ratios are printed against the masked column student (the compact one's target: >= 1.5x)
and the dense artifact sizes (target: compact <= 55%).
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compaction import random_batch_stats  # benchmarks/compaction.py, beside this script
from timing import interleaved  # benchmarks/timing.py, beside this script

from alite_jax.compact.column import compact_student
from alite_jax.compact.spvit import fold_variables
from alite_jax.models.spvit_compact import ARCH_FORMAT
from alite_jax.export import formats
from alite_jax.export.inference import PORTABLE_IMPL, TFLITE_IMPL
from alite_jax.models import create_model
from alite_jax.models.spvit_compact import CompactViT
from alite_jax.sparsity import apply_masks, init_masks

SIZE, CLASSES = 32, 10
RELEASED_TI_FFN = (744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145)  # SPViT-DeiT-Ti's release


def random_variables(model: Any, seed: int) -> dict[str, Any]:
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))
    return {"params": variables["params"], "batch_stats": random_batch_stats(
        variables.get("batch_stats", {}), np.random.default_rng(seed))}


def masked(variables: dict[str, Any], density: float, structure: str) -> dict[str, Any]:
    masks, _ = init_masks(variables["params"], density, structure, seed=1)
    return dict(variables, params=apply_masks(variables["params"], masks))


def spvit_models(width: float) -> dict[str, tuple[Callable, Any]]:
    """The dense ViT and the released SPViT-DeiT-Ti architecture at 32x32 (D scaled by ``width``)."""
    dim, heads = int(192 * width) // 3 * 3, 3
    hidden = 4 * dim
    ffn = [max(1, round(w / 768 * hidden)) for w in RELEASED_TI_FFN]
    blocks = [{"attention": "1x1" if i < 2 else "msa", "ffn_units": list(range(w))}
              for i, w in enumerate(ffn)]
    arch = {"format": ARCH_FORMAT, "image_size": SIZE, "patch_size": 4, "in_chans": 3, "dim": dim,
            "depth": 12, "num_heads": heads, "mlp_hidden": hidden, "num_classes": CLASSES, "blocks": blocks}
    dense = create_model("deit_tiny", CLASSES, image_size=SIZE, patch_size=4, dim=dim, num_heads=heads)
    unfolded = CompactViT.from_architecture(arch, folded=False)
    folded = CompactViT.from_architecture(arch)
    uvars = random_variables(unfolded, 3)
    return {"deit (dense ViT)": (apply_of(dense), random_variables(dense, 2)),
            "spvit unfolded": (apply_of(unfolded), uvars),
            "spvit folded": (apply_of(folded), fold_variables(uvars, arch))}


def apply_of(model: Any) -> Callable:
    return lambda v, x: model.apply(v, x, train=False)[0]


def tflite_runner(payload: bytes, x: np.ndarray) -> Callable[[], Any]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's copy of the interpreter
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_content=payload, num_threads=2)
    interpreter.allocate_tensors()
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]

    def run():
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        return interpreter.get_tensor(index_out)

    return run


def artifact_runner(fmt: str, fn: Callable, variables: Any, meta: dict[str, Any], x: np.ndarray,
                    sparse_weights: bool = False) -> tuple[Callable[[], Any], int]:
    """(a call of ``fmt``'s artifact of the function on ``x`` through its runtime, the artifact's bytes).
    ``sparse_weights``: the StableHLO pair of an irregular model (weights program run once, beforehand)."""
    if fmt == "stablehlo" and sparse_weights:
        model, weights, _ = formats.stablehlo_sparse_bytes(fn, variables, meta, batch=None,
                                                           platforms=("cpu",))
        call = jax.jit(jax.export.deserialize(bytearray(model)).call)  # jit: one dispatch, not one per leaf
        dense = jax.export.deserialize(bytearray(weights)).call()
        return (lambda: call(dense, x)), len(model) + len(weights)
    if fmt == "stablehlo":
        payload, _ = formats.stablehlo_bytes(fn, variables, meta, batch=None, platforms=("cpu",))
        call = jax.jit(jax.export.deserialize(bytearray(payload)).call)
        return (lambda: call(x)), len(payload)
    payload, info = formats.tflite_bytes(fn, variables, meta, batch=x.shape[0])
    if info["select_tf_ops"]:
        print(f"  tflite needs Select TF ops {info['select_tf_ops']}", flush=True)
    return tflite_runner(payload, x), len(payload)


def student_rows(width: float, impl: str, variables: Any, column: Any, irregular: Any
                 ) -> dict[str, tuple[Callable, Any]]:
    """The student's rows with local attention ``impl`` (the same weights for every impl)."""
    student = create_model("sa_resnet26", CLASSES, width=width, impl=impl)
    compact, compact_params = compact_student(student, column)
    return {"student dense": (apply_of(student), variables),
            "student masked column d=0.5": (apply_of(student), column),
            "student masked irregular d=0.1": (apply_of(student), irregular),
            "student compact column d=0.5": (compact.apply, compact_params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=0.5, help="the ResNets' width multiplier; the ViTs' D "
                        "is 192 x width")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-tflite", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; width {args.width}, {SIZE}x{SIZE}, "
          f"batch 1 and {args.batch}, median of {args.reps} interleaved rounds", flush=True)

    teacher = create_model("resnet50", CLASSES, width=args.width)
    student_vars = random_variables(create_model("sa_resnet26", CLASSES, width=args.width), 1)
    column = masked(student_vars, 0.5, "column")
    irregular = masked(student_vars, 0.1, "irregular")
    teacher_row = {"teacher (ResNet-50)": (apply_of(teacher), random_variables(teacher, 0))}
    vits = spvit_models(args.width)
    rows = {**teacher_row, **student_rows(args.width, PORTABLE_IMPL, student_vars, column, irregular), **vits}
    # TFLite takes the students with the unchunked attention (its converter cannot lower the chunk loop)
    tflite_rows = {**teacher_row, **student_rows(args.width, TFLITE_IMPL, student_vars, column, irregular),
                   **vits}
    jitted = {name: jax.jit(fn) for name, (fn, _) in rows.items()}

    x1 = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    xb = np.random.default_rng(1).normal(size=(args.batch, SIZE, SIZE, 3)).astype(np.float32)
    want = {name: np.asarray(jitted[name](v, x1)) for name, (_, v) in rows.items()}
    err = float(np.abs(want["student compact column d=0.5"] - want["student masked column d=0.5"]).max())
    print(f"compact vs masked column student: max |logit difference| {err:.2e}", flush=True)
    err = float(np.abs(want["spvit folded"] - want["spvit unfolded"]).max())
    print(f"folded vs unfolded SPViT: max |logit difference| {err:.2e}", flush=True)

    results: dict[str, dict[str, float]] = {name: {} for name in rows}
    for label, x, reps in (("b1", x1, 4 * args.reps), ("bN", xb, args.reps)):
        cases = {name: (lambda f=jitted[name], v=v, x=x: f(v, x)) for name, (_, v) in rows.items()}
        for name, seconds in interleaved(cases, reps).items():
            results[name][f"jax {label}"] = seconds

    meta = {"input": {"shape": [None, SIZE, SIZE, 3]}, "model": {"name": "benchmark"}}
    sizes: dict[str, dict[str, int]] = {name: {} for name in rows}
    for fmt in ("stablehlo",) + (() if args.skip_tflite else ("tflite",)):
        for label, x, reps in (("b1", x1, 4 * args.reps), ("bN", xb, args.reps)):
            cases = {}
            for name, (fn, v) in (tflite_rows if fmt == "tflite" else rows).items():
                try:
                    cases[name], sizes[name][fmt] = artifact_runner(fmt, fn, v, meta, x,
                                                                    sparse_weights="irregular" in name)
                except Exception as e:  # a format that cannot represent a model: say so, go on
                    print(f"  {name}: {fmt} failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                          flush=True)
            for name, seconds in interleaved(cases, reps).items():
                results[name][f"{fmt} {label}"] = seconds

    base = results["student masked column d=0.5"]
    kinds = [k for k in ("jax", "stablehlo", "tflite") if any(f"{k} b1" in r for r in results.values())]
    print("\n| model | " + " | ".join(f"{k} b1 ms | {k} b{args.batch} img/s" for k in kinds)
          + " | stablehlo MB | tflite MB |")
    print("|---|" + "---|---|" * len(kinds) + "---|---|")
    for name, r in results.items():
        cells = []
        for k in kinds:
            b1, bn = r.get(f"{k} b1"), r.get(f"{k} bN")
            cells.append("-" if b1 is None else f"{1e3 * b1:.2f}")
            cells.append("-" if bn is None else f"{args.batch / bn:,.0f}")
        mb = [f"{sizes[name][f] / 1e6:.2f}" if f in sizes[name] else "-" for f in ("stablehlo", "tflite")]
        print(f"| {name} | " + " | ".join(cells + mb) + " |")
    print("\nRatios against the masked column student (images/s at batch N; latency at batch 1):")
    for name in ("student compact column d=0.5", "student dense", "student masked irregular d=0.1"):
        for k in kinds:
            if f"{k} bN" in results[name] and f"{k} bN" in base:
                print(f"  {name}, {k}: throughput {base[f'{k} bN'] / results[name][f'{k} bN']:.2f}x, "
                      f"latency {base[f'{k} b1'] / results[name][f'{k} b1']:.2f}x")
    for fmt in ("stablehlo", "tflite"):
        dense_size = sizes["student dense"].get(fmt)
        for name in ("student compact column d=0.5", "student masked irregular d=0.1"):
            if dense_size and fmt in sizes[name]:
                print(f"  {name} artifact / dense artifact ({fmt}): {sizes[name][fmt] / dense_size:.1%}")
    for k in kinds:
        if f"{k} bN" in results["spvit folded"] and f"{k} bN" in results["deit (dense ViT)"]:
            print(f"  SPViT folded vs dense ViT, {k}: throughput "
                  f"{results['deit (dense ViT)'][f'{k} bN'] / results['spvit folded'][f'{k} bN']:.2f}x")


if __name__ == "__main__":
    main()
