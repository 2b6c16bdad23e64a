"""Benchmark: local self-attention versus the 3x3 convolution it replaces, as a layer and in whole models.

What it measures, in one run:

1. Layer: forward and forward+backward (``jax.grad`` of a scalar loss w.r.t. the input and the
   parameters) of a 3x3 ``nn.Conv`` (the reference, ratio 1.0), of ``LocalSelfAttention`` with every
   implementation in ``alite_jax.models.attention.IMPLS``, and of ``patches_autodiff``: the ``patches``
   math with the plain ``lax.conv_general_dilated_patches`` gather differentiated by JAX itself (no
   custom VJP), registered here only to show why the custom VJP exists. Its backward needs ~0.6 GiB per
   image and gather, so its fwd+bwd runs the batch as sequential calls of ``--autodiff-chunk`` images
   (the time is the whole batch's). Defaults are the shapes of reference.md §7: B=32, 32x32,
   C_in=C_out=64, k=7, 8 heads. Each function is jit-compiled once
   (ahead of time, compile excluded), warmed up, then timed as the median of N calls with
   ``block_until_ready``. Attention outputs and gradients are checked against the ``patches`` impl.
2. Model: images/s of one jitted SGD-with-momentum training step (cross-entropy, BatchNorm in train
   mode) of ``sa_resnet26`` (student) and ``resnet50`` (teacher), and the compile time of each.
3. A summary of the ratios and the machine.

Run from anywhere (the repository root is put on ``sys.path``)::

    python benchmarks/local_attention.py                  # full run, several minutes on 2 CPU cores
    python benchmarks/local_attention.py --quick          # smoke run: small shapes, few repeats
    python benchmarks/local_attention.py --skip-autodiff  # leave out the slow autodiff baseline
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from alite_jax.models import attention as attention_module  # noqa: E402
from alite_jax.models import count_params, create_model, init_model  # noqa: E402
from alite_jax.models.attention import IMPLS, LocalSelfAttention, register_impl  # noqa: E402

# The implementations the package itself registers, captured before this script adds its baseline.
PACKAGE_IMPLS: tuple[str, ...] = tuple(IMPLS)
AUTODIFF_IMPL = "patches_autodiff"
CHECK_IMPL = "patches"  # the impl every other attention entry is compared against


# The patches math with JAX's own transpose of the patches op as its backward (no custom VJP): the same
# function, registered here only to show what the custom VJP saves.
register_impl(AUTODIFF_IMPL)(functools.partial(attention_module.patches_local_attention,
                                               gather=attention_module.extract_patches))


# --------------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Compile time and the median (with min and max) of the timed calls, in seconds."""

    compile_s: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def time_calls(call: Callable[[], Any], *, compile_s: float, repeats: int,
               warmup: int = 1) -> tuple[Timing, Any]:
    """Warms ``call`` up, then times ``repeats`` calls (each waited for); returns the last output too."""
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return Timing(compile_s, statistics.median(times), min(times), max(times), repeats), out


def compile_jitted(fn: Callable[..., Any], args: tuple, **jit_kwargs: Any) -> tuple[Any, float]:
    """``jax.jit(fn)`` compiled ahead of time for ``args``, and the seconds that took."""
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_jitted(fn: Callable[..., Any], args: tuple, *, repeats: int) -> tuple[Timing, Any]:
    """Compiles ``jax.jit(fn)`` for ``args`` (timed apart), warms it up and times ``repeats`` calls."""
    compiled, compile_s = compile_jitted(fn, args)
    return time_calls(lambda: compiled(*args), compile_s=compile_s, repeats=repeats)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of the same structure."""
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------------------------------
# 1. Layer benchmark.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerResult:
    """One row of the layer table."""

    name: str
    macs_per_pixel: int
    fwd: Timing
    fwd_bwd: Timing
    check: str  # max |difference| vs the CHECK_IMPL, or "-"


def benchmark_layer(name: str, module: nn.Module, x: jax.Array, macs_per_pixel: int, *,
                    repeats: int, bwd_repeats: int, reference: tuple[jax.Array, Any] | None,
                    bwd_chunk: int | None = None) -> tuple[LayerResult, tuple[jax.Array, Any]]:
    """Times forward and forward+backward of one layer; returns its result and (output, gradients).

    The loss is the mean square of the output. With ``bwd_chunk``, one forward+backward is that many
    images per call, called once per chunk of the batch in turn (the time is the whole batch's); this
    bounds peak memory and gives the same gradients. The chunks are separate top-level calls on purpose:
    inside ``lax.map`` XLA compiles the patches transpose differently (faster), which would not measure
    plain autodiff.
    """
    params = module.init(jax.random.key(0), x)
    out_size = jax.eval_shape(module.apply, params, x).size

    def forward(p: Any, inputs: jax.Array) -> jax.Array:
        return module.apply(p, inputs)

    def loss(p: Any, inputs: jax.Array) -> jax.Array:
        return jnp.sum(jnp.square(module.apply(p, inputs))) / out_size

    grad = jax.grad(loss, argnums=(0, 1))
    fwd, y = time_jitted(forward, (params, x), repeats=repeats)
    chunk = min(bwd_chunk or x.shape[0], x.shape[0])
    parts = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]
    compiled, compile_s = compile_jitted(grad, (params, parts[0]))
    fwd_bwd, outs = time_calls(lambda: [compiled(params, part) for part in parts], compile_s=compile_s,
                               repeats=bwd_repeats)
    grads = (jax.tree.map(lambda *g: sum(g), *(param_grads for param_grads, _ in outs)),
             jnp.concatenate([input_grads for _, input_grads in outs]))
    check = "-"
    if reference is not None:
        check = f"{max(max_abs_diff(y, reference[0]), max_abs_diff(grads, reference[1])):.1e}"
    return LayerResult(name, macs_per_pixel, fwd, fwd_bwd, check), (y, grads)


def run_layer_benchmark(args: argparse.Namespace) -> list[LayerResult]:
    """Section 1: the conv, then every attention impl (``patches`` first, the reference of 'check')."""
    b, s, c, k, heads = args.batch, args.size, args.channels, args.kernel_size, args.heads
    print(f"\n== 1. Layer: B={b}, {s}x{s}, C_in=C_out={c}, k={k}, {heads} heads, float32 ==")
    print(f"   median of {args.repeats} calls after compile and 1 warm-up call; 'check' = max|diff| of "
          f"output and grads vs {CHECK_IMPL!r}")
    if not args.skip_autodiff:
        chunk = min(args.autodiff_chunk, b)
        gib_per_image = s * s * k ** 4 * c * 4 / 2 ** 30  # measured peak: a (k^2 C)-channel im2col per pixel
        print(f"   {AUTODIFF_IMPL}: fwd+bwd median of {args.autodiff_repeats} runs, each {b // chunk} "
              f"sequential call(s) on {chunk} images (its backward takes ~{gib_per_image:.2f} GiB per "
              f"image and gather)")
    x = jax.random.normal(jax.random.key(1), (b, s, s, c), jnp.float32)
    attention_macs = 3 * c * c + 3 * k * k * c
    results = []
    conv, _ = benchmark_layer("3x3 conv (reference)", nn.Conv(c, (3, 3)), x, 9 * c * c,
                              repeats=args.repeats, bwd_repeats=args.repeats, reference=None)
    results.append(conv)
    print_layer_row(conv, conv, header=True)
    impls = list(PACKAGE_IMPLS)
    if not args.skip_autodiff:
        impls.append(AUTODIFF_IMPL)
    reference = None
    for impl in sorted(impls, key=lambda name: name != CHECK_IMPL):
        slow = impl == AUTODIFF_IMPL
        module = LocalSelfAttention(features=c, num_heads=heads, kernel_size=k, impl=impl)
        result, outputs = benchmark_layer(
            f"attention impl={impl}", module, x, attention_macs, repeats=args.repeats,
            bwd_repeats=args.autodiff_repeats if slow else args.repeats, reference=reference,
            bwd_chunk=args.autodiff_chunk if slow else None)
        if impl == CHECK_IMPL:
            reference = outputs
        results.append(result)
        print_layer_row(result, conv)
    return results


def print_layer_row(r: LayerResult, conv: LayerResult, header: bool = False) -> None:
    """Prints one row of the layer table (after the header if asked), its ratios against ``conv``."""
    if header:
        print(f"   {'layer':<33} {'MACs/px':>8} {'fwd ms':>10} {'x conv':>8} {'fwd+bwd ms':>11} "
              f"{'x conv':>8} {'compile s':>10} {'check':>8}")
    ms = 1e3
    print(f"   {r.name:<33} {r.macs_per_pixel:>8,} {r.fwd.median_s * ms:>10,.1f} "
          f"{r.fwd.median_s / conv.fwd.median_s:>8.1f} {r.fwd_bwd.median_s * ms:>11,.1f} "
          f"{r.fwd_bwd.median_s / conv.fwd_bwd.median_s:>8.1f} "
          f"{r.fwd.compile_s + r.fwd_bwd.compile_s:>10.1f} {r.check:>8}", flush=True)


# --------------------------------------------------------------------------------------------------
# 2. Model training-step benchmark.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelResult:
    """One row of the model table."""

    name: str
    params: int
    timing: Timing
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.batch / self.timing.median_s


def benchmark_training_step(name: str, args: argparse.Namespace) -> ModelResult:
    """Times one jitted SGD-with-momentum step (cross-entropy, BatchNorm in train mode) of a zoo model."""
    model = create_model(name, 10, width=args.width)
    variables = init_model(model, jax.random.key(0), args.model_size)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    images = jax.random.normal(jax.random.key(1), (args.model_batch, args.model_size, args.model_size, 3))
    labels = jax.random.randint(jax.random.key(2), (args.model_batch,), 0, 10)

    def train_step(state: tuple, images: jax.Array, labels: jax.Array) -> tuple[tuple, jax.Array]:
        params, batch_stats, opt_state = state

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            (logits, _), updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                               train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    step, compile_s = compile_jitted(train_step, (state, images, labels), donate_argnums=0)

    def one_step() -> tuple[tuple, jax.Array]:
        nonlocal state
        state, loss = step(state, images, labels)
        return state, loss

    timing, (_, loss) = time_calls(one_step, compile_s=compile_s, repeats=args.steps)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"{name}: the training step gave a non-finite loss {float(loss)}")
    return ModelResult(name, count_params(variables["params"]), timing, args.model_batch)


def run_model_benchmark(args: argparse.Namespace) -> tuple[ModelResult, ModelResult]:
    """Section 2: the student's and the teacher's training step; returns (student, teacher)."""
    b, s = args.model_batch, args.model_size
    print(f"\n== 2. Model: SGD+momentum training step, B={b}, {s}x{s}, width {args.width}, 10 classes, "
          f"float32 ==")
    print(f"   median of {args.steps} steps after compile and 1 warm-up step")
    print(f"   {'model':<22} {'params':>12} {'step ms':>10} {'images/s':>9} {'min-max ms':>17} "
          f"{'compile s':>10}")
    results = []
    for name in ("sa_resnet26", "resnet50"):
        r = benchmark_training_step(name, args)
        results.append(r)
        t = r.timing
        print(f"   {name:<22} {r.params:>12,} {t.median_s * 1e3:>10,.0f} {r.images_per_s:>9.2f} "
              f"{f'{t.min_s * 1e3:,.0f}-{t.max_s * 1e3:,.0f}':>17} {t.compile_s:>10.1f}", flush=True)
    student, teacher = results
    print(f"   student/teacher images/s: {student.images_per_s / teacher.images_per_s:.3f}")
    return student, teacher


# --------------------------------------------------------------------------------------------------
# 3. Summary and main.
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_summary(layers: list[LayerResult], models: tuple[ModelResult, ModelResult],
                  args: argparse.Namespace, wall_s: float, load_at_start: float) -> None:
    conv = layers[0]
    print("\n== Summary (ratios vs the 3x3 conv; > 1 is slower) ==")
    print(f"   layer B={args.batch} {args.size}x{args.size} C={args.channels} k={args.kernel_size}: "
          f"conv fwd {conv.fwd.median_s * 1e3:,.1f} ms, fwd+bwd {conv.fwd_bwd.median_s * 1e3:,.1f} ms")
    for r in layers[1:]:
        print(f"   {r.name:<33} fwd {r.fwd.median_s / conv.fwd.median_s:6.1f}x   "
              f"fwd+bwd {r.fwd_bwd.median_s / conv.fwd_bwd.median_s:7.1f}x   "
              f"MACs {r.macs_per_pixel / conv.macs_per_pixel:.2f}x")
    by_name = {r.name.removeprefix("attention impl="): r for r in layers}
    if AUTODIFF_IMPL in by_name and CHECK_IMPL in by_name:
        speedup = by_name[AUTODIFF_IMPL].fwd_bwd.median_s / by_name[CHECK_IMPL].fwd_bwd.median_s
        print(f"   custom VJP speed-up of fwd+bwd ({AUTODIFF_IMPL} / {CHECK_IMPL}): {speedup:.1f}x")
    student, teacher = models
    ratio = student.images_per_s / teacher.images_per_s
    print(f"   training step B={args.model_batch} {args.model_size}x{args.model_size} width "
          f"{args.width}: sa_resnet26 {student.images_per_s:.2f} images/s, resnet50 "
          f"{teacher.images_per_s:.2f} images/s, student/teacher {ratio:.3f}")
    print(f"   machine: processor={platform.processor()!r} ({cpu_model()}), "
          f"os.cpu_count()={os.cpu_count()}, jax.devices()={jax.devices()}")
    print(f"   1-minute load average: {load_at_start:.1f} before, {os.getloadavg()[0]:.1f} at the end "
          f"(this process alone adds up to ~{os.cpu_count()}; more means the cores were shared and the "
          f"times are inflated)")
    print(f"   jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"python {platform.python_version()}; total wall time {wall_s:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: B=8, 16x16 layer, B=8 models at width 0.25, few repeats "
                        "(explicit flags still win)")
    p.add_argument("--batch", type=int, help="layer batch size (default 32; 8 with --quick)")
    p.add_argument("--size", type=int, help="layer height and width (default 32; 16 with --quick)")
    p.add_argument("--channels", type=int, default=64, help="layer C_in = C_out (default 64)")
    p.add_argument("--kernel-size", type=int, default=7, help="attention neighbourhood k (default 7)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--repeats", type=int, help="timed calls per layer entry (default 10; 3 with --quick)")
    p.add_argument("--autodiff-repeats", type=int, default=2,
                   help=f"timed fwd+bwd runs of {AUTODIFF_IMPL} (default 2; about a minute each at "
                        f"full size)")
    p.add_argument("--autodiff-chunk", type=int,
                   help=f"images per sequential call of {AUTODIFF_IMPL}'s fwd+bwd (default 8; 4 with "
                        f"--quick): JAX's transpose of the patches op peaks at about H*W*k^4*C*4 bytes "
                        f"per image and gather (0.6 GiB at 32x32, C=64, k=7), so a batch of 32 at once "
                        f"is killed for memory on a 23 GiB machine")
    p.add_argument("--skip-autodiff", action="store_true", help=f"leave out {AUTODIFF_IMPL}")
    p.add_argument("--model-batch", type=int, help="training-step batch (default 32; 8 with --quick)")
    p.add_argument("--model-size", type=int, default=32,
                   help="training-step image height and width (default 32)")
    p.add_argument("--width", type=float, help="model width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--steps", type=int, help="timed training steps per model (default 5; 2 with --quick)")
    args = p.parse_args(argv)
    defaults = dict(batch=(32, 8), size=(32, 16), repeats=(10, 3), model_batch=(32, 8), width=(1.0, 0.25),
                    steps=(5, 2), autodiff_chunk=(8, 4))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.batch % min(args.autodiff_chunk, args.batch):
        p.error(f"--autodiff-chunk ({args.autodiff_chunk}) must divide --batch ({args.batch})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    print(f"local attention benchmark{' (--quick)' if args.quick else ''}: {jax.devices()}, "
          f"impls {list(PACKAGE_IMPLS)}{'' if args.skip_autodiff else f' + {AUTODIFF_IMPL}'}")
    layers = run_layer_benchmark(args)
    models = run_model_benchmark(args)
    print_summary(layers, models, args, time.perf_counter() - start, load_at_start)


if __name__ == "__main__":
    main()
