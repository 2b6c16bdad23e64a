"""Benchmark: local self-attention against the convolution it replaces, as layers and in whole models.

What it measures, in one run (ratios are printed; these machines are noisy):

1. Layers: forward and forward+backward (``jax.grad`` of a mean-square loss w.r.t. the input and the
   parameters) of a 3x3 ``nn.Conv`` of the same width (the reference, ratio 1.0) and of
   ``LocalSelfAttention`` with every implementation that runs natively on the backend ("pallas" only
   off the CPU, where it would run in interpret mode), at every attention shape of SA-ResNet26 at 32x32
   and at 64x64 (stride left out: its 2x2 average pool is the same for all). At 32x32, C=64 also
   ``patches_autodiff`` (the patches math differentiated by JAX
   itself, to show why the custom VJP exists; in chunks, see --autodiff-chunk) and, when PyTorch is
   installed (``pip install torch==2.13.0``), the peer: an unfold-based SASA layer as in the common
   public PyTorch code, same shapes, same machine. Every attention impl's output and gradients are
   checked against ``patches``. Each entry is timed alternating call by call with the conv, and its
   ratio is against those interleaved conv calls, so drifts in the load of this shared machine hit
   both sides of a ratio alike.
2. Models (B=32, 32x32, width 1.0, 10 classes): images/s of the teacher's (ResNet-50) and the
   student's (SA-ResNet26) SGD+momentum cross-entropy training step, of the full sparse-distillation
   step (``alite_jax.train.make_train_step``: student at density 0.1 in ``sparse_learning``, ResNet-50
   forward in inference mode, CE + KD + AT), of the teacher's forward alone (so the student's share of
   the distillation step can be read apart), and inference images/s of both. Peak memory of each is
   XLA's own buffer assignment for the compiled program (arguments + outputs + temporaries, minus
   donated aliases; on GPU also the device allocator's peak).
3. A summary: every ratio and whether the targets of the issue are met, and the machine.

Run from anywhere (the repository root is put on ``sys.path``)::

    python benchmarks/local_attention.py                  # full run, ~15 minutes on 2 CPU cores
    python benchmarks/local_attention.py --quick          # smoke run: small shapes, few repeats
    python benchmarks/local_attention.py --skip-autodiff --skip-patches-model
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

from alite_jax import config as config_lib  # noqa: E402
from alite_jax import train  # noqa: E402
from alite_jax.models import attention as attention_module  # noqa: E402
from alite_jax.models import count_params, create_model, init_model  # noqa: E402
from alite_jax.models.attention import IMPLS, LocalSelfAttention, register_impl  # noqa: E402

AUTODIFF_IMPL = "patches_autodiff"
CHECK_IMPL = "patches"  # the impl every other attention entry is compared against
# The patches math with JAX's own transpose of the patches op as its backward (no custom VJP): the same
# function, registered here only to show what the custom VJP saves.
register_impl(AUTODIFF_IMPL)(functools.partial(attention_module.patches_local_attention,
                                               gather=attention_module.extract_patches))


def native_impls() -> list[str]:
    """The package's implementations that compile natively here ("auto" is one of them by another name)."""
    skip = {"auto", AUTODIFF_IMPL} | ({"pallas"} if jax.default_backend() == "cpu" else set())
    return sorted((name for name in IMPLS if name not in skip), key=lambda n: n != CHECK_IMPL)


# --------------------------------------------------------------------------------------------------
# Timing and memory.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Compile time and the median (with min and max) of the timed calls, in seconds."""

    compile_s: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    peak_bytes: int = 0  # XLA's buffer assignment: arguments + outputs + temporaries - aliases


def peak_bytes(compiled: Any) -> int:
    """Bytes XLA assigned to the compiled program's buffers (0 if the backend does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001  (some backends return None or lack fields)
        return 0


def time_calls(call: Callable[[], Any], *, compile_s: float, repeats: int, warmup: int = 1,
               peak: int = 0) -> tuple[Timing, Any]:
    """Warms ``call`` up, then times ``repeats`` calls (each waited for); returns the last output too."""
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return Timing(compile_s, statistics.median(times), min(times), max(times), repeats, peak), out


def compile_jitted(fn: Callable[..., Any], args: tuple, **jit_kwargs: Any) -> tuple[Any, float]:
    """``jax.jit(fn)`` compiled ahead of time for ``args``, and the seconds that took."""
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_jitted(fn: Callable[..., Any], args: tuple, *, repeats: int, **jit_kwargs: Any
                ) -> tuple[Timing, Any]:
    """Compiles ``jax.jit(fn)`` for ``args`` (timed apart), warms it up and times ``repeats`` calls."""
    compiled, compile_s = compile_jitted(fn, args, **jit_kwargs)
    return time_calls(lambda: compiled(*args), compile_s=compile_s, repeats=repeats,
                      peak=peak_bytes(compiled))


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of the same structure."""
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}" if n else "-"


# --------------------------------------------------------------------------------------------------
# 1. Layers.
# --------------------------------------------------------------------------------------------------


def attention_shapes(image_size: int) -> list[tuple[int, int, int]]:
    """(height = width, channels, layers of this shape) of every attention layer of hybrid SA-ResNet26.

    Stage i (blocks 1, 2, 4, 1) has bottleneck width 64 * 2^i; attention runs at the block's input
    resolution (a stride-2 block pools after attention), so a stage's first block runs at the previous
    stage's resolution.
    """
    shapes: dict[tuple[int, int], int] = {}
    size = image_size
    for i, blocks in enumerate((1, 2, 4, 1)):
        width = 64 * 2 ** i
        first = size
        size = size if i == 0 else size // 2
        for b in range(blocks):
            key = (first if b == 0 else size, width)
            shapes[key] = shapes.get(key, 0) + 1
    return [(s, c, n) for (s, c), n in shapes.items()]


@dataclasses.dataclass
class LayerResult:
    """One row of the layer table."""

    name: str
    macs_per_pixel: int
    fwd: Timing
    fwd_bwd: Timing
    check: str  # max |difference| vs the CHECK_IMPL, or "-"
    conv_fwd_s: float = 0.0      # median of the conv's calls interleaved with this entry's (0: none)
    conv_fwd_bwd_s: float = 0.0

    def fwd_ratio(self, conv: "LayerResult") -> float:
        return self.fwd.median_s / (self.conv_fwd_s or conv.fwd.median_s)

    def fwd_bwd_ratio(self, conv: "LayerResult") -> float:
        return self.fwd_bwd.median_s / (self.conv_fwd_bwd_s or conv.fwd_bwd.median_s)


@dataclasses.dataclass
class PreparedLayer:
    """A layer's compiled forward and forward+backward, ready to be called (and timed)."""

    name: str
    macs_per_pixel: int
    fwd: Callable[[], Any]
    fwd_bwd: Callable[[], Any]
    fwd_compile_s: float = 0.0
    fwd_bwd_compile_s: float = 0.0
    fwd_peak: int = 0
    fwd_bwd_peak: int = 0


def prepare_layer(name: str, module: nn.Module, x: jax.Array, macs_per_pixel: int,
                  bwd_chunk: int | None = None) -> PreparedLayer:
    """Compiles one layer's forward and forward+backward (loss: mean square of the output).

    With ``bwd_chunk``, one forward+backward is that many images per call, called once per chunk of the
    batch in turn (the time is the whole batch's); this bounds peak memory and gives the same gradients.
    """
    params = module.init(jax.random.key(0), x)
    out_size = jax.eval_shape(module.apply, params, x).size

    def loss(p: Any, inputs: jax.Array) -> jax.Array:
        return jnp.sum(jnp.square(module.apply(p, inputs))) / out_size

    fwd, fwd_compile_s = compile_jitted(module.apply, (params, x))
    grad, grad_compile_s = compile_jitted(jax.grad(loss, argnums=(0, 1)),
                                          (params, x[:min(bwd_chunk or x.shape[0], x.shape[0])]))
    chunk = min(bwd_chunk or x.shape[0], x.shape[0])
    parts = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]

    def fwd_bwd() -> tuple[Any, jax.Array]:
        outs = [grad(params, part) for part in parts]
        return (jax.tree.map(lambda *g: sum(g), *(param_grads for param_grads, _ in outs)),
                jnp.concatenate([input_grads for _, input_grads in outs]))

    return PreparedLayer(name, macs_per_pixel, lambda: fwd(params, x), fwd_bwd, fwd_compile_s,
                         grad_compile_s, peak_bytes(fwd), peak_bytes(grad))


def time_round_robin(calls: list[Callable[[], Any]], repeats: int) -> tuple[list[list[float]], list]:
    """Calls every function once (warm-up; its output is returned), then ``repeats`` rounds of one call
    of each in turn: every entry sees the same drift in machine load, so their ratios stay meaningful
    on a shared, noisy machine. Returns the seconds per call of each, and the warm-up outputs."""
    outputs = [jax.block_until_ready(call()) for call in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[i].append(time.perf_counter() - start)
    return times, outputs


def _timing(times: list[float], compile_s: float, peak: int) -> Timing:
    return Timing(compile_s, statistics.median(times), min(times), max(times), len(times), peak)


def torch_sasa_layer(batch: int, size: int, channels: int, kernel_size: int, heads: int
                     ) -> PreparedLayer | None:
    """An unfold-based SASA layer in PyTorch (the common public implementation: 1x1 q/k/v convs,
    zero-padded unfold of keys and values, row/column relative embeddings added to the keys across
    heads, softmax over the k^2 window), or None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    c, k, n, pad = channels, kernel_size, heads, kernel_size // 2
    d = c // n
    x = torch.randn(batch, c, size, size, requires_grad=True)
    wq, wk, wv = (torch.randn(c, c, 1, 1, requires_grad=True) for _ in range(3))
    rel_h = torch.randn(c // 2, 1, 1, k, 1, requires_grad=True)
    rel_w = torch.randn(c // 2, 1, 1, 1, k, requires_grad=True)

    def forward() -> Any:
        b, _, h, w = x.shape
        q = F.conv2d(x, wq)
        kk = F.conv2d(F.pad(x, [pad] * 4), wk)
        vv = F.conv2d(F.pad(x, [pad] * 4), wv)
        kk = kk.unfold(2, k, 1).unfold(3, k, 1)  # (b, c, h, w, k, k)
        vv = vv.unfold(2, k, 1).unfold(3, k, 1)
        kh, kw = kk.split(c // 2, dim=1)
        kk = torch.cat((kh + rel_h, kw + rel_w), dim=1)
        kk = kk.contiguous().view(b, n, d, h, w, -1)
        vv = vv.contiguous().view(b, n, d, h, w, -1)
        q = q.view(b, n, d, h, w, 1)
        weights = F.softmax((q * kk).sum(dim=2), dim=-1)
        return torch.einsum("bnhwk,bndhwk->bndhw", weights, vv).reshape(b, c, h, w)

    def fwd_bwd() -> None:
        for t in (x, wq, wk, wv, rel_h, rel_w):
            t.grad = None
        forward().square().mean().backward()

    def fwd() -> None:
        with torch.no_grad():
            forward()

    return PreparedLayer("PyTorch unfold SASA (peer)", 3 * c * c + 3 * k * k * c, fwd, fwd_bwd)


def run_layer_benchmark(args: argparse.Namespace) -> dict[tuple[int, int, int], list[LayerResult]]:
    """Section 1: per shape, the conv, every attention impl (``patches`` first: the reference of
    'check') and the PyTorch peer, timed round-robin; the slow autodiff baseline apart."""
    k, heads = args.kernel_size, args.heads
    print(f"\n== 1. Layers: every attention shape of SA-ResNet26, C_in=C_out=C, k={k}, {heads} heads, "
          f"float32 ==")
    print(f"   median of {args.repeats} calls after compile and 1 warm-up call, each entry alternating "
          f"with the conv ('x conv': against those conv calls); 'check' = max|diff| of output and "
          f"grads vs {CHECK_IMPL!r}; peak = XLA buffers of the fwd+bwd program")
    results: dict[tuple[int, int, int], list[LayerResult]] = {}
    for image_size, batch in zip(args.image_sizes, args.layer_batches):
        for size, c, count in attention_shapes(image_size):
            x = jax.random.normal(jax.random.key(1), (batch, size, size, c), jnp.float32)
            print(f"\n   -- {image_size}x{image_size} model, layer {size}x{size}, C={c}, B={batch} "
                  f"({count} such layer{'s' if count > 1 else ''} in SA-ResNet26) --")
            macs = 3 * c * c + 3 * k * k * c
            layers = [prepare_layer("3x3 conv (reference)", nn.Conv(c, (3, 3)), x, 9 * c * c)]
            layers += [prepare_layer(f"attention impl={impl}",
                                     LocalSelfAttention(features=c, num_heads=heads, kernel_size=k,
                                                        impl=impl), x, macs)
                       for impl in native_impls()]
            paper_shape = (image_size, size, c) == (32, 32, 64)
            if paper_shape or args.torch_all_shapes:
                peer = torch_sasa_layer(batch, size, c, k, heads)
                if peer is None:
                    print("   (PyTorch not installed: `pip install torch==2.13.0` adds the peer row)")
                else:
                    layers.append(peer)
            # Each entry is timed alternating with the conv (pairs, not all entries in one round: a
            # memory-hungry entry such as patches would otherwise slow whichever entry follows it).
            rows = []
            for i, layer in enumerate(layers):
                pair = [layers[0]] if i == 0 else [layers[0], layer]
                fwd_times, fwd_outs = time_round_robin([e.fwd for e in pair], args.repeats)
                bwd_times, bwd_outs = time_round_robin([e.fwd_bwd for e in pair], args.repeats)
                if i == 1:  # layers[1] is the reference impl
                    reference = (fwd_outs[-1], bwd_outs[-1])
                check = "-"
                if layer.name.startswith("attention") and i > 1:
                    diff = max(max_abs_diff(fwd_outs[-1], reference[0]),
                               max_abs_diff(bwd_outs[-1], reference[1]))
                    check = f"{diff:.1e}"
                rows.append(LayerResult(
                    layer.name, layer.macs_per_pixel,
                    _timing(fwd_times[-1], layer.fwd_compile_s, layer.fwd_peak),
                    _timing(bwd_times[-1], layer.fwd_bwd_compile_s, layer.fwd_bwd_peak), check,
                    statistics.median(fwd_times[0]), statistics.median(bwd_times[0])))
                print_layer_row(rows[-1], rows[0], header=i == 0)
            if paper_shape and not args.skip_autodiff:
                slow = prepare_layer(f"attention impl={AUTODIFF_IMPL}",
                                     LocalSelfAttention(features=c, num_heads=heads, kernel_size=k,
                                                        impl=AUTODIFF_IMPL), x, macs,
                                     bwd_chunk=args.autodiff_chunk)
                (f_t,), (f_out,) = time_round_robin([slow.fwd], args.repeats)
                (b_t,), (b_out,) = time_round_robin([slow.fwd_bwd], args.autodiff_repeats)
                diff = max(max_abs_diff(f_out, reference[0]), max_abs_diff(b_out, reference[1]))
                rows.append(LayerResult(slow.name, macs, _timing(f_t, slow.fwd_compile_s, slow.fwd_peak),
                                        _timing(b_t, slow.fwd_bwd_compile_s, slow.fwd_bwd_peak),
                                        f"{diff:.1e}"))
                print_layer_row(rows[-1], rows[0])
            results[(image_size, size, c)] = rows
    return results


def print_layer_row(r: LayerResult, conv: LayerResult, header: bool = False) -> None:
    """Prints one row of the layer table (after the header if asked), its ratios against ``conv``."""
    if header:
        print(f"   {'layer':<33} {'MACs/px':>8} {'fwd ms':>10} {'x conv':>7} {'fwd+bwd ms':>11} "
              f"{'x conv':>7} {'peak GiB':>9} {'compile s':>10} {'check':>8}")
    ms = 1e3
    print(f"   {r.name:<33} {r.macs_per_pixel:>8,} {r.fwd.median_s * ms:>10,.1f} "
          f"{r.fwd_ratio(conv):>7.1f} {r.fwd_bwd.median_s * ms:>11,.1f} "
          f"{r.fwd_bwd_ratio(conv):>7.1f} {gib(r.fwd_bwd.peak_bytes):>9} "
          f"{r.fwd.compile_s + r.fwd_bwd.compile_s:>10.1f} {r.check:>8}", flush=True)


# --------------------------------------------------------------------------------------------------
# 2. Models.
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


def _batch(args: argparse.Namespace) -> dict[str, jax.Array]:
    s = args.model_size
    return dict(image=jax.random.normal(jax.random.key(1), (args.model_batch, s, s, 3)),
                label=jax.random.randint(jax.random.key(2), (args.model_batch,), 0, 10))


def _time_stepper(step: Callable, state: Any, extra: tuple, repeats: int) -> Timing:
    """Times ``state = step(state, *extra)[0]`` (state donated), compile apart."""
    compiled, compile_s = compile_jitted(step, (state,) + extra, donate_argnums=0)
    holder = [state]

    def one() -> Any:
        holder[0], aux = compiled(holder[0], *extra)
        return aux

    timing, aux = time_calls(one, compile_s=compile_s, repeats=repeats, peak=peak_bytes(compiled))
    loss = jax.tree.leaves(aux)[0]
    if not np.all(np.isfinite(np.asarray(loss))):
        raise RuntimeError(f"a benchmarked step gave a non-finite value {loss}")
    return timing


def benchmark_ce_step(name: str, args: argparse.Namespace, **options: Any) -> ModelResult:
    """One jitted SGD-with-momentum cross-entropy step (BatchNorm in train mode) of a zoo model."""
    model = create_model(name, 10, width=args.width, **options)
    variables = init_model(model, jax.random.key(0), args.model_size)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    batch = _batch(args)

    def train_step(state: tuple, images: jax.Array, labels: jax.Array) -> tuple[tuple, jax.Array]:
        params, batch_stats, opt_state = state

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            (logits, _), updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                               train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, upd), updates["batch_stats"], opt_state), loss

    timing = _time_stepper(train_step, state, (batch["image"], batch["label"]), args.steps)
    return ModelResult(name, count_params(variables["params"]), timing, args.model_batch)


def benchmark_distill_step(args: argparse.Namespace) -> ModelResult:
    """The trainer's own sparse-distillation step: SA-ResNet26 at density 0.1 taught by ResNet-50."""
    cfg = config_lib.base_config()
    cfg.model.width = args.width
    cfg.data.image_size = args.model_size
    teacher_cfg = config_lib.teacher_config("cifar10")
    teacher_cfg.model.width = args.width
    student = train.model_from_config(cfg.model, 10)
    teacher = train.model_from_config(teacher_cfg.model, 10)
    teacher_variables = init_model(teacher, jax.random.key(1), args.model_size)
    tx = train.make_optimizer(cfg, 100)
    state = train.create_train_state(student, tx, cfg, jax.random.key(0))
    step = train.make_train_step(student, teacher, tx, cfg, steps_per_epoch=100)
    timing = _time_stepper(step, state, (_batch(args), teacher_variables), args.steps)
    return ModelResult("sparse distillation step", count_params(state["params"]), timing,
                       args.model_batch)


def benchmark_inference(name: str, args: argparse.Namespace) -> ModelResult:
    """Images/s of ``model.apply(..., train=False)`` (BatchNorm from running statistics)."""
    model = create_model(name, 10, width=args.width)
    variables = init_model(model, jax.random.key(0), args.model_size)
    timing, _ = time_jitted(lambda v, x: model.apply(v, x, train=False)[0],
                            (variables, _batch(args)["image"]), repeats=args.steps)
    return ModelResult(f"{name} inference", count_params(variables["params"]), timing, args.model_batch)


def run_model_benchmark(args: argparse.Namespace) -> dict[str, ModelResult]:
    """Section 2: training steps, the distillation step, the teacher's forward and inference."""
    b, s = args.model_batch, args.model_size
    print(f"\n== 2. Models: B={b}, {s}x{s}, width {args.width}, 10 classes, float32; median of "
          f"{args.steps} calls after compile and 1 warm-up ==")
    print(f"   {'what':<40} {'params':>12} {'ms':>9} {'images/s':>9} {'peak GiB':>9} {'compile s':>10}")
    entries: list[tuple[str, Callable[[], ModelResult]]] = [
        ("teacher resnet50 CE training step", lambda: benchmark_ce_step("resnet50", args)),
        ("student sa_resnet26 CE step, impl=auto", lambda: benchmark_ce_step("sa_resnet26", args)),
    ]
    if not args.skip_patches_model:
        entries.append(("student sa_resnet26 CE step, impl=patches",
                        lambda: benchmark_ce_step("sa_resnet26", args, impl="patches")))
    entries += [
        ("sparse-distillation step (d=0.1, kd+at)", lambda: benchmark_distill_step(args)),
        ("teacher resnet50 inference", lambda: benchmark_inference("resnet50", args)),
        ("student sa_resnet26 inference", lambda: benchmark_inference("sa_resnet26", args)),
    ]
    results = {}
    for label, run in entries:
        r = run()
        results[label] = r
        t = r.timing
        print(f"   {label:<40} {r.params:>12,} {t.median_s * 1e3:>9,.0f} {r.images_per_s:>9.2f} "
              f"{gib(t.peak_bytes):>9} {t.compile_s:>10.1f}", flush=True)
    return results


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


def print_summary(layers: dict[tuple[int, int, int], list[LayerResult]],
                  models: dict[str, ModelResult], args: argparse.Namespace, wall_s: float,
                  load_at_start: float) -> None:
    print("\n== Summary ==")
    print("   layers, fwd+bwd time / the same-width 3x3 conv's (lower is better):")
    for (image_size, size, c), rows in layers.items():
        conv = rows[0]
        ratios = "  ".join(f"{r.name.removeprefix('attention impl=').split(' (')[0]} "
                           f"{r.fwd_bwd_ratio(conv):.1f}x" for r in rows[1:])
        print(f"   {image_size}x{image_size} model, {size:>2}x{size:<2} C={c:<3}: {ratios}")
    paper = layers.get((32, 32, 64))
    if paper:
        by_name = {r.name: r for r in paper}
        conv = paper[0]
        best = min((r for r in paper[1:] if r.name.startswith("attention")),
                   key=lambda r: r.fwd_bwd_ratio(conv))
        print(f"   target layer (32x32, C=64): best impl {best.name.removeprefix('attention impl=')} "
              f"fwd+bwd {best.fwd_bwd_ratio(conv):.2f}x the conv (target <= 3x)")
        peer = by_name.get("PyTorch unfold SASA (peer)")
        if peer:
            print(f"   ... and {best.fwd_bwd_ratio(conv) / peer.fwd_bwd_ratio(conv):.2f}x the PyTorch "
                  f"peer's fwd+bwd (target <= 0.5x); fwd "
                  f"{best.fwd_ratio(conv) / peer.fwd_ratio(conv):.2f}x (both via their conv ratios)")
        slow, ref = by_name.get(f"attention impl={AUTODIFF_IMPL}"), by_name.get("attention impl=patches")
        if slow and ref:
            print(f"   custom VJP speed-up of patches fwd+bwd: "
                  f"{slow.fwd_bwd.median_s / ref.fwd_bwd.median_s:.1f}x")
    if models:
        get = lambda key: next(r for label, r in models.items() if label.startswith(key))  # noqa: E731
        teacher, student = get("teacher resnet50 CE"), get("student sa_resnet26 CE step, impl=auto")
        distill, t_inf, s_inf = get("sparse-distillation"), get("teacher resnet50 inf"), get(
            "student sa_resnet26 inf")
        student_share = distill.timing.median_s - t_inf.timing.median_s
        print(f"   training images/s, student CE step / teacher CE step: "
              f"{student.images_per_s / teacher.images_per_s:.2f} (target >= 1)")
        print(f"   sparse-distillation step: {distill.images_per_s:.2f} images/s = "
              f"{distill.images_per_s / teacher.images_per_s:.2f}x the teacher's training step; without "
              f"the teacher's forward ({t_inf.timing.median_s * 1e3:,.0f} ms) the student's share runs at "
              f"{args.model_batch / student_share:.2f} images/s = "
              f"{args.model_batch / student_share / teacher.images_per_s:.2f}x (target >= 1)")
        print(f"   inference images/s, student / teacher: {s_inf.images_per_s / t_inf.images_per_s:.2f}")
        patches = next((r for label, r in models.items() if label.endswith("impl=patches")), None)
        if patches:
            print(f"   student CE step, impl=auto / impl=patches speed-up: "
                  f"{patches.timing.median_s / student.timing.median_s:.2f}x")
    print(f"   machine: processor={platform.processor()!r} ({cpu_model()}), "
          f"os.cpu_count()={os.cpu_count()}, jax.devices()={jax.devices()}")
    print(f"   1-minute load average: {load_at_start:.1f} before, {os.getloadavg()[0]:.1f} at the end "
          f"(this process alone adds up to ~{os.cpu_count()}; more means the cores were shared)")
    print(f"   jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"python {platform.python_version()}; total wall time {wall_s:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16x16 model shapes at B=4, models at B=4, width 0.25, 16x16, few "
                        "repeats (explicit flags still win)")
    p.add_argument("--image-sizes", type=int, nargs="+",
                   help="model input sizes whose attention shapes are benchmarked (default 32 64)")
    p.add_argument("--layer-batches", type=int, nargs="+",
                   help="layer batch per image size (default 32 16)")
    p.add_argument("--kernel-size", type=int, default=7, help="attention neighbourhood k (default 7)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--repeats", type=int, help="timed calls per layer entry (default 5; 2 with --quick)")
    p.add_argument("--autodiff-repeats", type=int, default=1,
                   help=f"timed fwd+bwd runs of {AUTODIFF_IMPL} (default 1; ~35 s each)")
    p.add_argument("--autodiff-chunk", type=int, default=8,
                   help=f"images per sequential call of {AUTODIFF_IMPL}'s fwd+bwd (default 8): JAX's "
                        f"transpose of the patches op needs ~0.6 GiB per image and gather at 32x32, C=64")
    p.add_argument("--skip-autodiff", action="store_true", help=f"leave out {AUTODIFF_IMPL}")
    p.add_argument("--torch-all-shapes", action="store_true",
                   help="time the PyTorch peer at every shape, not only at 32x32 C=64")
    p.add_argument("--skip-models", action="store_true", help="layers only")
    p.add_argument("--skip-patches-model", action="store_true",
                   help="leave out the student's step with impl=patches (the before-and-after row)")
    p.add_argument("--model-batch", type=int, help="model batch (default 32; 4 with --quick)")
    p.add_argument("--model-size", type=int, help="model image size (default 32; 16 with --quick)")
    p.add_argument("--width", type=float, help="model width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--steps", type=int, help="timed calls per model entry (default 5; 2 with --quick)")
    args = p.parse_args(argv)
    defaults = dict(image_sizes=([32, 64], [16]), layer_batches=([32, 16], [4]), repeats=(5, 2),
                    model_batch=(32, 4), model_size=(32, 16), width=(1.0, 0.25), steps=(5, 2))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if len(args.layer_batches) != len(args.image_sizes):
        p.error("--layer-batches needs one batch per --image-sizes entry")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    print(f"local attention benchmark{' (--quick)' if args.quick else ''}: {jax.devices()}, "
          f"impls {native_impls()}, impl='auto' -> {attention_module.select_impl()!r}")
    layers = run_layer_benchmark(args)
    models = {} if args.skip_models else run_model_benchmark(args)
    print_summary(layers, models, args, time.perf_counter() - start, load_at_start)


if __name__ == "__main__":
    main()
