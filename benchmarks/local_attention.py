"""Benchmark: local self-attention against the convolution it replaces, as layers and in whole models.

What it measures, in one run (ratios are printed; these machines are noisy), in each compute dtype of
``--dtypes`` (float32, bfloat16; parameters stay float32):

1. Layers: forward and forward+backward (``jax.grad`` of a mean-square loss w.r.t. the input and the
   parameters) of a 3x3 ``nn.Conv`` of the same width (the reference, ratio 1.0) and of
   ``LocalSelfAttention`` with every implementation that runs natively on the backend (the Pallas
   kernels "pallas" and "fused", and the tilings of ``--fused-tilings``, only off the CPU, where they
   would run in interpret mode), at every attention shape of SA-ResNet26 at each
   ``--image-sizes`` entry with its ``--layer-batches`` batch (stride left out: its 2x2 average pool is
   the same for all). At 32x32, C=64 also ``patches_autodiff`` (the patches math differentiated by JAX
   itself, to show why the custom VJP exists; in chunks, see --autodiff-chunk) and, when PyTorch is
   installed (``pip install torch==2.13.0``), the peer: an unfold-based SASA layer as in the common
   public PyTorch code, same shapes, same machine (on the GPU when JAX runs on one). Every attention
   impl's output and gradients are checked against ``patches``. Each entry is timed alternating sample
   by sample with the conv, and its ratio is against those interleaved conv samples, so drifts in the
   load of a shared machine hit both sides of a ratio alike. A sample is enough back-to-back calls to
   last ``--min-time`` (one call on the CPU; many on an accelerator, where one call's host
   synchronisation would otherwise dominate).
2. Models (each ``--model-configs`` BATCHxSIZE, width 1.0, 10 classes): images/s of the teacher's
   (ResNet-50) and the student's (SA-ResNet26, with each of ``--student-impls``) SGD+momentum
   cross-entropy training step, of the full sparse-distillation step
   (``alite_jax.train.make_train_step``: student at density 0.1 in ``sparse_learning``, ResNet-50
   forward in inference mode, CE + KD + AT), and inference images/s of both (the teacher's forward alone
   lets the student's share of the distillation step be read apart). Peak memory of each is XLA's own
   buffer assignment for the compiled program (arguments + outputs + temporaries, minus donated
   aliases). The entries of a setting are compiled together (``--compile-threads``), then timed one by
   one; an entry that fails to compile or run is reported as FAILED and the others go on.
3. A summary: every ratio and whether the targets are met, and the machine. ``--json`` and
   ``--markdown`` write everything (rewritten after each setting, so a run stopped at a time limit keeps
   what it measured); ``--deadline-s`` starts no setting but the first after that many seconds.

Run from anywhere (the repository root is put on ``sys.path``)::

    python benchmarks/local_attention.py                  # full run, ~15 minutes on 2 CPU cores
    python benchmarks/local_attention.py --quick          # smoke run: small shapes, few repeats
    python benchmarks/local_attention.py --skip-autodiff --skip-patches-model
    bash benchmarks/gpu_suite.sh                          # on a GPU machine: tests + GPU-sized runs
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
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

from timing import inner_calls, round_robin, timed_sample  # noqa: E402  (benchmarks/timing.py)

from alite_jax import config as config_lib  # noqa: E402
from alite_jax import train  # noqa: E402
from alite_jax.models import local_attention as attention_module  # noqa: E402
from alite_jax.methods import AttentionLite  # noqa: E402
from alite_jax.models import count_params, create_model, init_model, model_from_config  # noqa: E402
from alite_jax.models.local_attention import IMPLS, LocalSelfAttention, register_impl  # noqa: E402

AUTODIFF_IMPL = "patches_autodiff"
CHECK_IMPL = "patches"  # the impl every other attention entry is compared against
# The patches math with JAX's own transpose of the patches op as its backward (no custom VJP): the same
# function, registered here only to show what the custom VJP saves.
register_impl(AUTODIFF_IMPL)(functools.partial(attention_module.patches_local_attention,
                                               gather=attention_module.extract_patches))


LAYER_TARGET = 2.5  # the GPU target: every attention shape's fwd+bwd within this factor of the conv's
PALLAS_IMPLS = ("pallas", "fused")  # interpreted on the CPU (correct, far too slow to time)
FUSED_TILING_PREFIX = "fused@"


def native_impls() -> list[str]:
    """The package's implementations that compile natively here ("auto" is one of them by another name;
    the Pallas kernels and their tiling variants only off the CPU)."""
    skip = {"auto", AUTODIFF_IMPL}
    if jax.default_backend() == "cpu":
        skip |= set(PALLAS_IMPLS) | {n for n in IMPLS if n.startswith(FUSED_TILING_PREFIX)}
    return sorted((name for name in IMPLS if name not in skip), key=lambda n: n != CHECK_IMPL)


def register_fused_tilings(tilings: list[str]) -> list[str]:
    """Registers ``impl="fused"`` at other GPU tilings, each "TOKENSxWARPS" (e.g. "128x4") as
    ``fused@128x4``, so that the tables time them side by side with the default; returns the names."""
    from alite_jax.models.local_attention.fused import fused_local_attention

    names = []
    for tiling in tilings:
        tokens, warps = (int(x) for x in tiling.split("x"))
        names.append(f"{FUSED_TILING_PREFIX}{tiling}")
        register_impl(names[-1])(functools.partial(fused_local_attention, block_tokens=tokens,
                                                   num_warps=warps))
    return names


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
               peak: int = 0, min_time: float = 0.0) -> tuple[Timing, Any]:
    """Warms ``call`` up, then times ``repeats`` samples (each of enough back-to-back calls to last
    ``min_time``, see :func:`inner_calls`); returns the last output too."""
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(call())
    inner = inner_calls(call, min_time)
    times = []
    for _ in range(repeats):
        t, out = timed_sample(call, inner)
        times.append(t)
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


@dataclasses.dataclass(frozen=True)
class Group:
    """One benchmarked setting: ``batch`` images of ``image_size`` x ``image_size`` in one compute dtype."""

    batch: int
    image_size: int
    dtype: str

    @property
    def label(self) -> str:
        return f"B={self.batch}, {self.image_size}x{self.image_size}, {self.dtype}"


@dataclasses.dataclass
class LayerResult:
    """One row of the layer table (``error`` set, timings None: the entry failed to compile or run)."""

    name: str
    macs_per_pixel: int
    fwd: Timing | None
    fwd_bwd: Timing | None
    check: str  # max |difference| vs the CHECK_IMPL, or "-"
    conv_fwd_s: float = 0.0      # median of the conv's calls interleaved with this entry's (0: none)
    conv_fwd_bwd_s: float = 0.0
    error: str = ""

    def fwd_ratio(self, conv: "LayerResult") -> float:
        if self.fwd is None or conv.fwd is None:
            return float("nan")
        return self.fwd.median_s / (self.conv_fwd_s or conv.fwd.median_s)

    def fwd_bwd_ratio(self, conv: "LayerResult") -> float:
        if self.fwd_bwd is None or conv.fwd_bwd is None:
            return float("nan")
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
    """Compiles one layer's forward and forward+backward (loss: mean square of the output, in float32).

    With ``bwd_chunk``, one forward+backward is that many images per call, called once per chunk of the
    batch in turn (the time is the whole batch's); this bounds peak memory and gives the same gradients.
    """
    params = module.init(jax.random.key(0), x)
    out_size = jax.eval_shape(module.apply, params, x).size

    def loss(p: Any, inputs: jax.Array) -> jax.Array:
        return jnp.sum(jnp.square(module.apply(p, inputs).astype(jnp.float32))) / out_size

    fwd, fwd_compile_s = compile_jitted(module.apply, (params, x))
    grad, grad_compile_s = compile_jitted(jax.grad(loss, argnums=(0, 1)),
                                          (params, x[:min(bwd_chunk or x.shape[0], x.shape[0])]))
    chunk = min(bwd_chunk or x.shape[0], x.shape[0])
    parts = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]

    def fwd_bwd() -> tuple[Any, jax.Array]:
        outs = [grad(params, part) for part in parts]
        if len(outs) == 1:
            return outs[0]
        return (jax.tree.map(lambda *g: sum(g), *(param_grads for param_grads, _ in outs)),
                jnp.concatenate([input_grads for _, input_grads in outs]))

    return PreparedLayer(name, macs_per_pixel, lambda: fwd(params, x), fwd_bwd, fwd_compile_s,
                         grad_compile_s, peak_bytes(fwd), peak_bytes(grad))


def prepare_all(builders: list[Callable[[], Any]], threads: int) -> list[Any]:
    """Runs every builder (trace + compile), ``threads`` at a time; a builder that raises gives its
    exception in its place, so one entry that does not compile does not stop the others. XLA compiles
    outside Python's lock, so on a many-core accelerator host threads cut the wall time of a group."""
    def guarded(build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as e:  # noqa: BLE001  (reported in the entry's row)
            return e
    if threads <= 1:
        return [guarded(b) for b in builders]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(guarded, builders))


def error_text(e: BaseException) -> str:
    """The first line of an exception, with its type: what a table cell can hold."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _timing(times: list[float], compile_s: float, peak: int) -> Timing:
    return Timing(compile_s, statistics.median(times), min(times), max(times), len(times), peak)


def torch_sasa_layer(batch: int, size: int, channels: int, kernel_size: int, heads: int
                     ) -> PreparedLayer | None:
    """An unfold-based SASA layer in PyTorch (the common public implementation: 1x1 q/k/v convs,
    zero-padded unfold of keys and values, row/column relative embeddings added to the keys across
    heads, softmax over the k^2 window), float32, on the GPU when JAX runs on one and torch sees CUDA;
    None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    c, k, n, pad = channels, kernel_size, heads, kernel_size // 2
    d = c // n
    new = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)  # noqa: E731
    x = new(batch, c, size, size)
    wq, wk, wv = (new(c, c, 1, 1) for _ in range(3))
    rel_h = new(c // 2, 1, 1, k, 1)
    rel_w = new(c // 2, 1, 1, 1, k)

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
        sync()

    def fwd() -> None:
        with torch.no_grad():
            forward()
        sync()

    return PreparedLayer(f"PyTorch unfold SASA (peer, {device})", 3 * c * c + 3 * k * k * c, fwd,
                         fwd_bwd)


PEER_PREFIX = "PyTorch unfold SASA"
NATTEN_PREFIX = "NATTEN na2d"


def natten_layer(batch: int, size: int, channels: int, kernel_size: int, heads: int, dtype: str
                 ) -> PreparedLayer | None:
    """NATTEN's fused neighbourhood attention (SHI-Labs/NATTEN, ``natten.functional.na2d``: q, k, v of
    (B, H, W, heads, d), the same window and heads, no relative term; its window is shifted inside the
    map at the borders where this library's is clipped), the fused kernels' speed peer on a GPU: the
    attention alone (the q, k, v projections are left out, so the row is a lower bound of a layer).
    None when NATTEN or a CUDA device for it is missing."""
    try:
        import torch
        from natten.functional import na2d
    except ImportError:
        return None
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        return None
    d = channels // heads
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    new = lambda: torch.randn(batch, size, size, heads, d, device="cuda", dtype=torch_dtype,  # noqa: E731
                              requires_grad=True)
    q, k, v = new(), new(), new()

    def fwd_bwd() -> None:
        for t in (q, k, v):
            t.grad = None
        na2d(q, k, v, kernel_size=kernel_size).float().square().mean().backward()
        torch.cuda.synchronize()

    def fwd() -> None:
        with torch.no_grad():
            na2d(q, k, v, kernel_size=kernel_size)
        torch.cuda.synchronize()

    return PreparedLayer(f"{NATTEN_PREFIX} (peer, attention only)", kernel_size ** 2 * 2 * channels, fwd,
                         fwd_bwd)


def layer_groups(args: argparse.Namespace) -> list[Group]:
    """Every (model input size, layer batch) of the command line, in each dtype, in that order."""
    return [Group(batch, size, dtype) for size, batch in zip(args.image_sizes, args.layer_batches)
            for dtype in args.dtypes]


def run_layer_group(group: Group, args: argparse.Namespace, results: "Results") -> None:
    """Section 1 for one group: per shape, the conv, every attention impl (``patches`` first: the
    reference of 'check') and the PyTorch peer, timed in pairs with the conv; the slow autodiff
    baseline apart."""
    k, heads, dtype = args.kernel_size, args.heads, jnp.dtype(group.dtype)
    for size, c, count in attention_shapes(group.image_size):
        x = jax.random.normal(jax.random.key(1), (group.batch, size, size, c), jnp.float32).astype(dtype)
        print(f"\n   -- {group.label}: layer {size}x{size}, C={c} "
              f"({count} such layer{'s' if count > 1 else ''} in SA-ResNet26) --")
        macs = 3 * c * c + 3 * k * k * c
        builders: list[tuple[str, int, Callable[[], PreparedLayer]]] = [
            ("3x3 conv (reference)", 9 * c * c,
             lambda: prepare_layer("3x3 conv (reference)", nn.Conv(c, (3, 3), dtype=dtype), x, 9 * c * c))]
        for impl in args.layer_impls:
            builders.append((f"attention impl={impl}", macs, functools.partial(
                prepare_layer, f"attention impl={impl}",
                LocalSelfAttention(features=c, num_heads=heads, kernel_size=k, impl=impl, dtype=dtype),
                x, macs)))
        paper_shape = (group.image_size, size, c) == (32, 32, 64)
        if (paper_shape or args.torch_all_shapes) and group.dtype == "float32" and not args.skip_torch:
            builders.append((PEER_PREFIX, macs, lambda: torch_sasa_layer(group.batch, size, c, k, heads)))
        if not args.skip_torch and jax.default_backend() == "gpu":
            builders.append((NATTEN_PREFIX, macs, lambda: natten_layer(group.batch, size, c, k, heads,
                                                                       group.dtype)))
        prepared = prepare_all([b for _, _, b in builders], args.compile_threads)
        rows: list[LayerResult] = []
        reference = None
        for i, ((name, entry_macs, _), layer) in enumerate(zip(builders, prepared)):
            if layer is None:  # a peer whose package is not installed
                print("   (NATTEN not importable with a CUDA device: no NATTEN row)" if name == NATTEN_PREFIX
                      else "   (PyTorch not installed: `pip install torch==2.13.0` adds the peer row)")
                continue
            if isinstance(layer, Exception):
                rows.append(LayerResult(name, entry_macs, None, None, "-", error=error_text(layer)))
                print_layer_row(rows[-1], rows[0], header=i == 0)
                continue
            # Each entry is timed alternating with the conv (pairs, not all entries in one round: a
            # memory-hungry entry such as patches would otherwise slow whichever entry follows it).
            conv = prepared[0]
            pair = [conv] if i == 0 else [conv, layer]
            try:
                fwd_times, fwd_outs = round_robin([e.fwd for e in pair], args.repeats, args.min_time)
                bwd_times, bwd_outs = round_robin([e.fwd_bwd for e in pair], args.repeats, args.min_time)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory at run time)
                rows.append(LayerResult(name, entry_macs, None, None, "-", error=error_text(e)))
                print_layer_row(rows[-1], rows[0], header=i == 0)
                continue
            check = "-"
            if name.startswith("attention") and reference is None:  # CHECK_IMPL, when it runs
                reference = (fwd_outs[-1], bwd_outs[-1])
            elif name.startswith("attention") and reference is not None:
                diff = max(max_abs_diff(fwd_outs[-1], reference[0]),
                           max_abs_diff(bwd_outs[-1], reference[1]))
                check = f"{diff:.1e}"
            rows.append(LayerResult(
                layer.name, layer.macs_per_pixel,
                _timing(fwd_times[-1], layer.fwd_compile_s, layer.fwd_peak),
                _timing(bwd_times[-1], layer.fwd_bwd_compile_s, layer.fwd_bwd_peak), check,
                statistics.median(fwd_times[0]), statistics.median(bwd_times[0])))
            print_layer_row(rows[-1], rows[0], header=i == 0)
        if paper_shape and not args.skip_autodiff and reference is not None:
            slow = prepare_layer(f"attention impl={AUTODIFF_IMPL}",
                                 LocalSelfAttention(features=c, num_heads=heads, kernel_size=k,
                                                    impl=AUTODIFF_IMPL, dtype=dtype), x, macs,
                                 bwd_chunk=args.autodiff_chunk)
            (f_t,), (f_out,) = round_robin([slow.fwd], args.repeats, args.min_time)
            (b_t,), (b_out,) = round_robin([slow.fwd_bwd], args.autodiff_repeats)
            diff = max(max_abs_diff(f_out, reference[0]), max_abs_diff(b_out, reference[1]))
            rows.append(LayerResult(slow.name, macs, _timing(f_t, slow.fwd_compile_s, slow.fwd_peak),
                                    _timing(b_t, slow.fwd_bwd_compile_s, slow.fwd_bwd_peak),
                                    f"{diff:.1e}"))
            print_layer_row(rows[-1], rows[0])
        results.layers[(group, size, c, count)] = rows
        results.write()


def print_layer_row(r: LayerResult, conv: LayerResult, header: bool = False) -> None:
    """Prints one row of the layer table (after the header if asked), its ratios against ``conv``."""
    if header:
        print(f"   {'layer':<33} {'MACs/px':>8} {'fwd ms':>10} {'x conv':>7} {'fwd+bwd ms':>11} "
              f"{'x conv':>7} {'peak GiB':>9} {'compile s':>10} {'check':>8}")
    if r.error:
        print(f"   {r.name:<33} {r.macs_per_pixel:>8,} FAILED: {r.error}", flush=True)
        return
    ms = 1e3
    print(f"   {r.name:<33} {r.macs_per_pixel:>8,} {r.fwd.median_s * ms:>10,.3f} "
          f"{r.fwd_ratio(conv):>7.2f} {r.fwd_bwd.median_s * ms:>11,.3f} "
          f"{r.fwd_bwd_ratio(conv):>7.2f} {gib(r.fwd_bwd.peak_bytes):>9} "
          f"{r.fwd.compile_s + r.fwd_bwd.compile_s:>10.1f} {r.check:>8}", flush=True)


# --------------------------------------------------------------------------------------------------
# 2. Models.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelResult:
    """One row of the model table (``error`` set, timing None: the entry failed)."""

    name: str
    params: int
    timing: Timing | None
    batch: int
    error: str = ""

    @property
    def images_per_s(self) -> float:
        return self.batch / self.timing.median_s if self.timing else float("nan")


@dataclasses.dataclass
class PreparedModel:
    """A compiled whole-model program and a call that runs it once (a step updates its state)."""

    name: str
    params: int
    call: Callable[[], Any]
    compile_s: float
    peak: int
    check_finite: bool = False


def _batch(group: Group) -> dict[str, jax.Array]:
    s = group.image_size
    return dict(image=jax.random.normal(jax.random.key(1), (group.batch, s, s, 3)),
                label=jax.random.randint(jax.random.key(2), (group.batch,), 0, 10))


def _stepper(name: str, params: int, step: Callable, state: Any, extra: tuple) -> PreparedModel:
    """``state = step(state, *extra)[0]`` (state donated) compiled, as a call returning the aux."""
    compiled, compile_s = compile_jitted(step, (state,) + extra, donate_argnums=0)
    holder = [state]

    def one() -> Any:
        holder[0], aux = compiled(holder[0], *extra)
        return aux

    return PreparedModel(name, params, one, compile_s, peak_bytes(compiled), check_finite=True)


def prepare_ce_step(name: str, group: Group, args: argparse.Namespace, **options: Any) -> PreparedModel:
    """One jitted SGD-with-momentum cross-entropy step (BatchNorm in train mode) of a zoo model."""
    model = create_model(name, 10, width=args.width, dtype=group.dtype, **options)
    variables = init_model(model, jax.random.key(0), group.image_size)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    batch = _batch(group)

    def train_step(state: tuple, images: jax.Array, labels: jax.Array) -> tuple[tuple, jax.Array]:
        params, batch_stats, opt_state = state

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            (logits, _), updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                               train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
            return loss.mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, upd), updates["batch_stats"], opt_state), loss

    return _stepper(name, count_params(variables["params"]), train_step, state,
                    (batch["image"], batch["label"]))


def prepare_distill_step(group: Group, args: argparse.Namespace, impl: str) -> PreparedModel:
    """The trainer's own sparse-distillation step: SA-ResNet26 at density 0.1 taught by ResNet-50,
    both computing in the group's dtype."""
    cfg = config_lib.base_config()
    cfg.model.width = args.width
    cfg.model.impl = impl
    cfg.model.dtype = group.dtype
    cfg.data.image_size = group.image_size
    teacher_cfg = config_lib.teacher_config("cifar10")
    teacher_cfg.model.width = args.width
    teacher_cfg.model.dtype = group.dtype
    student = model_from_config(cfg.model, 10)
    teacher = model_from_config(teacher_cfg.model, 10)
    teacher_variables = init_model(teacher, jax.random.key(1), group.image_size)
    method = AttentionLite(cfg, 10)
    tx = method.optimizer(100)
    state = train.create_train_state(method, student, tx, jax.random.key(0), group.image_size)
    step = train.make_train_step(method, student, teacher, tx, steps_per_epoch=100)
    return _stepper("sparse distillation step", count_params(state["params"]), step, state,
                    (_batch(group), teacher_variables))


def prepare_inference(name: str, group: Group, args: argparse.Namespace, **options: Any
                      ) -> PreparedModel:
    """``model.apply(..., train=False)`` (BatchNorm from running statistics), compiled."""
    model = create_model(name, 10, width=args.width, dtype=group.dtype, **options)
    variables = init_model(model, jax.random.key(0), group.image_size)
    images = _batch(group)["image"]
    compiled, compile_s = compile_jitted(lambda v, x: model.apply(v, x, train=False)[0],
                                         (variables, images))
    return PreparedModel(f"{name} inference", count_params(variables["params"]),
                         lambda: compiled(variables, images), compile_s, peak_bytes(compiled))


TEACHER_STEP, STUDENT_STEP, DISTILL_STEP = ("teacher resnet50 CE step", "student sa_resnet26 CE step",
                                            "sparse-distillation step")
TEACHER_INFERENCE, STUDENT_INFERENCE = "teacher resnet50 inference", "student sa_resnet26 inference"


def model_groups(args: argparse.Namespace) -> list[Group]:
    """Every model configuration of the command line, in each dtype, in that order."""
    return [Group(batch, size, dtype) for batch, size in args.model_configs for dtype in args.dtypes]


def run_model_group(group: Group, args: argparse.Namespace, results: "Results") -> None:
    """Section 2 for one group: training steps (the student's with each impl), the distillation step,
    inference; compiled together (``--compile-threads``), then timed one after another."""
    entries: list[tuple[str, Callable[[], PreparedModel]]] = [
        (TEACHER_STEP, lambda: prepare_ce_step("resnet50", group, args))]
    entries += [(f"{STUDENT_STEP}, impl={impl}",
                 functools.partial(prepare_ce_step, "sa_resnet26", group, args, impl=impl))
                for impl in args.student_impls]
    entries += [(f"{DISTILL_STEP}, impl={impl}", functools.partial(prepare_distill_step, group, args, impl))
                for impl in args.distill_impls]
    entries += [(TEACHER_INFERENCE, lambda: prepare_inference("resnet50", group, args))]
    entries += [(f"{STUDENT_INFERENCE}, impl={impl}",
                 functools.partial(prepare_inference, "sa_resnet26", group, args, impl=impl))
                for impl in args.student_impls]
    print(f"\n   -- {group.label}: width {args.width}, 10 classes --")
    print(f"   {'what':<46} {'params':>12} {'ms':>9} {'images/s':>9} {'peak GiB':>9} {'compile s':>10}")
    prepared = prepare_all([build for _, build in entries], args.compile_threads)
    rows: dict[str, ModelResult] = {}
    for (label, _), entry in zip(entries, prepared):
        if not isinstance(entry, Exception):
            try:
                timing, aux = time_calls(entry.call, compile_s=entry.compile_s, repeats=args.steps,
                                         peak=entry.peak, min_time=args.min_time)
                loss = jax.tree.leaves(aux)[0]
                if entry.check_finite and not np.all(np.isfinite(np.asarray(loss, np.float32))):
                    raise RuntimeError(f"the step gave a non-finite value {loss}")
                rows[label] = ModelResult(label, entry.params, timing, group.batch)
            except Exception as e:  # noqa: BLE001  (reported in the row)
                entry = e
        if isinstance(entry, Exception):
            rows[label] = ModelResult(label, 0, None, group.batch, error=error_text(entry))
            print(f"   {label:<46} FAILED: {rows[label].error}", flush=True)
            continue
        t = rows[label].timing
        print(f"   {label:<46} {entry.params:>12,} {t.median_s * 1e3:>9,.2f} "
              f"{rows[label].images_per_s:>9,.0f} {gib(t.peak_bytes):>9} {t.compile_s:>10.1f}", flush=True)
    results.models[group] = rows
    results.write()


# --------------------------------------------------------------------------------------------------
# 3. Summary, outputs and main.
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


def machine() -> dict[str, Any]:
    """What ran the benchmark: devices, software versions, CPU, date."""
    device = jax.devices()[0]
    try:
        platform_version = device.client.platform_version
    except Exception:  # noqa: BLE001
        platform_version = "unknown"
    import jaxlib
    return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), backend=jax.default_backend(),
                device_kind=device.device_kind, devices=len(jax.devices()),
                platform_version=platform_version, jax=jax.__version__,
                jaxlib=getattr(jaxlib, "__version__", "?"), flax=flax.__version__, optax=optax.__version__,
                python=platform.python_version(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                default_matmul_precision=str(jax.config.jax_default_matmul_precision))


def best_attention(rows: list[LayerResult]) -> LayerResult | None:
    """The attention entry with the lowest fwd+bwd ratio to the conv (None if none ran)."""
    ran = [r for r in rows[1:] if r.name.startswith("attention") and r.fwd_bwd is not None
           and not r.name.endswith(AUTODIFF_IMPL)]
    return min(ran, key=lambda r: r.fwd_bwd_ratio(rows[0])) if ran and rows[0].fwd_bwd else None


def summary_lines(results: "Results", args: argparse.Namespace) -> list[str]:
    """Every ratio and whether the targets are met, as printable lines."""
    lines = ["layers, fwd+bwd time / the same-width 3x3 conv's (lower is better):"] if results.layers else []
    worst: dict[Group, float] = {}
    for (group, size, c, _), rows in results.layers.items():
        conv = rows[0]
        ratios = "  ".join(f"{r.name.removeprefix('attention impl=').split(' (')[0]} "
                           + (f"{r.fwd_bwd_ratio(conv):.2f}x" if not r.error else "FAILED")
                           for r in rows[1:])
        lines.append(f"{group.label}, {size:>2}x{size:<2} C={c:<3}: {ratios}")
        best = best_attention(rows)
        worst[group] = max(worst.get(group, 0.0), best.fwd_bwd_ratio(conv) if best else float("inf"))
    for group, ratio in worst.items():
        lines.append(f"{group.label}: best impl's fwd+bwd within {ratio:.2f}x the conv at every shape "
                     f"(GPU target <= {LAYER_TARGET}x: {'met' if ratio <= LAYER_TARGET else 'not met'})")
    for (group, size, c, _), rows in results.layers.items():
        if (group.image_size, size, c) != (32, 32, 64):
            continue
        conv, best = rows[0], best_attention(rows)
        by_name = {r.name.split(" (")[0]: r for r in rows}
        peer = next((r for r in rows if r.name.startswith(PEER_PREFIX) and not r.error), None)
        if best and peer:
            lines.append(f"{group.label}, 32x32 C=64: best impl "
                         f"{best.name.removeprefix('attention impl=')} fwd+bwd "
                         f"{best.fwd_bwd_ratio(conv) / peer.fwd_bwd_ratio(conv):.2f}x the PyTorch peer's; "
                         f"fwd {best.fwd_ratio(conv) / peer.fwd_ratio(conv):.2f}x (both via their conv "
                         f"ratios)")
        slow, ref = by_name.get(f"attention impl={AUTODIFF_IMPL}"), by_name.get("attention impl=patches")
        if slow and ref and slow.fwd_bwd and ref.fwd_bwd:
            lines.append(f"custom VJP speed-up of patches fwd+bwd: "
                         f"{slow.fwd_bwd.median_s / ref.fwd_bwd.median_s:.1f}x")
    for group, rows in results.models.items():
        ok = {label: r for label, r in rows.items() if r.timing is not None}
        teacher, t_inf = ok.get(TEACHER_STEP), ok.get(TEACHER_INFERENCE)
        students = {label: r for label, r in ok.items() if label.startswith(STUDENT_STEP)}
        if not teacher or not students:
            lines.append(f"{group.label}: models incomplete (see the table)")
            continue
        s_label, student = min(students.items(), key=lambda kv: kv[1].timing.median_s)
        impl = s_label.split("impl=")[-1]
        each = ", ".join(f"{label.split('impl=')[-1]} {r.images_per_s / teacher.images_per_s:.2f}"
                         for label, r in students.items())
        lines.append(f"{group.label}: student CE step / teacher CE step images/s: {each} (best "
                     f"{impl}: {student.images_per_s / teacher.images_per_s:.2f}, target >= 1.0)")
        s_inf = {label.split("impl=")[-1]: r for label, r in ok.items()
                 if label.startswith(STUDENT_INFERENCE)}
        if t_inf and s_inf:
            best_inf = max(s_inf.values(), key=lambda r: r.images_per_s)
            each = ", ".join(f"{i} {r.images_per_s / t_inf.images_per_s:.2f}" for i, r in s_inf.items())
            lines.append(f"{group.label}: inference images/s student / teacher: {each} (best "
                         f"{best_inf.images_per_s / t_inf.images_per_s:.2f}, GPU target >= 1.5)")
        for label, distill in ok.items():
            if not label.startswith(DISTILL_STEP):
                continue
            share = ""
            if t_inf:
                student_s = distill.timing.median_s - t_inf.timing.median_s
                share = (f"; without the teacher's forward the student's share runs at "
                         f"{teacher.timing.median_s / student_s:.2f}x the teacher step's images/s")
            lines.append(f"{group.label}: {label}: {distill.timing.median_s / teacher.timing.median_s:.2f}x "
                         f"the teacher's CE step time (GPU target <= 1.5x){share}")
        failed = [label for label, r in rows.items() if r.error]
        if failed:
            lines.append(f"{group.label}: FAILED: {', '.join(failed)}")
    m = results.meta
    lines.append(f"machine: {m['device_kind']} x{m['devices']} ({m['backend']}, {m['platform_version']}), "
                 f"CPU {m['cpu']} x{m['cpu_count']}; jax {m['jax']}, jaxlib {m['jaxlib']}, "
                 f"flax {m['flax']}, optax {m['optax']}, python {m['python']}; matmul precision "
                 f"{m['default_matmul_precision']}")
    if results.skipped:
        lines.append(f"skipped at the deadline (--deadline-s {args.deadline_s:.0f}): "
                     f"{'; '.join(results.skipped)}")
    return lines


@dataclasses.dataclass
class Results:
    """Everything measured so far; :meth:`write` saves it as JSON and Markdown (after every group, so a
    run stopped at a time limit still leaves what it measured)."""

    args: argparse.Namespace
    meta: dict[str, Any]
    layers: dict[tuple[Group, int, int, int], list[LayerResult]] = dataclasses.field(default_factory=dict)
    models: dict[Group, dict[str, ModelResult]] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        timing = lambda t: dataclasses.asdict(t) if t else None  # noqa: E731
        layers = [dict(dataclasses.asdict(g), layer_size=size, channels=c, layers_of_this_shape=count,
                       name=r.name, macs_per_pixel=r.macs_per_pixel, fwd=timing(r.fwd),
                       fwd_bwd=timing(r.fwd_bwd), fwd_x_conv=r.fwd_ratio(rows[0]),
                       fwd_bwd_x_conv=r.fwd_bwd_ratio(rows[0]), check=r.check, error=r.error)
                  for (g, size, c, count), rows in self.layers.items() for r in rows]
        models = [dict(dataclasses.asdict(g), name=label, params=r.params, timing=timing(r.timing),
                       images_per_s=r.images_per_s, error=r.error)
                  for g, rows in self.models.items() for label, r in rows.items()]
        return dict(meta=self.meta, args=vars(self.args), layers=layers, models=models,
                    summary=summary_lines(self, self.args), skipped=self.skipped)

    def markdown(self) -> str:
        m = self.meta
        out = [f"# Local attention benchmark, {m['date']}", "",
               f"{m['device_kind']} ({m['backend']}, {m['platform_version']}); jax {m['jax']}, flax "
               f"{m['flax']}; matmul precision {m['default_matmul_precision']}.", ""]
        if self.layers:
            out += ["## Layers (k=7, 8 heads; ms = median per call; x conv = time / the same-width 3x3 "
                    "conv's)", "",
                    "| setting | layer | C | entry | fwd ms | x conv | fwd+bwd ms | x conv | peak GiB "
                    "| check |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for (g, size, c, _), rows in self.layers.items():
                for r in rows:
                    if r.error:
                        out.append(f"| {g.label} | {size}x{size} | {c} | {r.name} | FAILED: {r.error} "
                                   "| | | | | |")
                        continue
                    out.append(f"| {g.label} | {size}x{size} | {c} | {r.name} | {r.fwd.median_s * 1e3:.3f} | "
                               f"{r.fwd_ratio(rows[0]):.2f} | {r.fwd_bwd.median_s * 1e3:.3f} | "
                               f"{r.fwd_bwd_ratio(rows[0]):.2f} | {gib(r.fwd_bwd.peak_bytes)} | {r.check} |")
            out.append("")
        if self.models:
            out += ["## Models (width 1.0, 10 classes)", "",
                    "| setting | what | params | ms | images/s | peak GiB | compile s |",
                    "|---|---|---|---|---|---|---|"]
            for g, rows in self.models.items():
                for label, r in rows.items():
                    if r.error:
                        out.append(f"| {g.label} | {label} | FAILED: {r.error} | | | | |")
                        continue
                    t = r.timing
                    out.append(f"| {g.label} | {label} | {r.params:,} | {t.median_s * 1e3:.2f} | "
                               f"{r.images_per_s:,.0f} | {gib(t.peak_bytes)} | {t.compile_s:.1f} |")
            out.append("")
        out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(self, self.args)]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.as_dict(), f, indent=1, default=str)
        if self.args.markdown:
            with open(self.args.markdown, "w") as f:
                f.write(self.markdown())


def parse_model_config(text: str) -> tuple[int, int]:
    """'128x32' -> (batch 128, image size 32)."""
    try:
        batch, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"model config {text!r}: expected BATCHxSIZE, e.g. 128x32") from None
    return batch, size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16x16 model shapes at B=4, models at B=4, width 0.25, 16x16, few "
                        "repeats (explicit flags still win)")
    p.add_argument("--image-sizes", type=int, nargs="+",
                   help="model input sizes whose attention shapes are benchmarked (default 32 64)")
    p.add_argument("--layer-batches", type=int, nargs="+",
                   help="layer batch per image size (default 32 16)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="compute dtypes of layers and models (parameters stay float32; default float32)")
    p.add_argument("--kernel-size", type=int, default=7, help="attention neighbourhood k (default 7)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--repeats", type=int, help="timed samples per layer entry (default 5; 2 with --quick)")
    p.add_argument("--min-time", type=float, default=0.02,
                   help="seconds one timed sample lasts at least: fast calls are repeated back to back "
                        "(up to 100) and averaged (default 0.02)")
    p.add_argument("--autodiff-repeats", type=int, default=1,
                   help=f"timed fwd+bwd runs of {AUTODIFF_IMPL} (default 1; ~35 s each)")
    p.add_argument("--autodiff-chunk", type=int, default=8,
                   help=f"images per sequential call of {AUTODIFF_IMPL}'s fwd+bwd (default 8): JAX's "
                        f"transpose of the patches op needs ~0.6 GiB per image and gather at 32x32, C=64")
    p.add_argument("--skip-autodiff", action="store_true", help=f"leave out {AUTODIFF_IMPL}")
    p.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch peer")
    p.add_argument("--torch-all-shapes", action="store_true",
                   help="time the PyTorch peer at every shape, not only at 32x32 C=64")
    p.add_argument("--skip-layers", action="store_true", help="models only")
    p.add_argument("--skip-models", action="store_true", help="layers only")
    p.add_argument("--skip-patches-model", action="store_true",
                   help="leave out the student's step with impl=patches (the before-and-after row)")
    p.add_argument("--layer-impls", nargs="+",
                   help=f"attention impls of the layer table (default: every native one); 'check' is "
                        f"against the first ({CHECK_IMPL!r} by default)")
    p.add_argument("--student-impls", nargs="+",
                   help="impls of the student's CE step and inference (default: auto and patches on the "
                        "CPU; every native impl elsewhere)")
    p.add_argument("--distill-impls", nargs="+", default=["auto"],
                   help="impls of the sparse-distillation step's student (default auto)")
    p.add_argument("--fused-tilings", nargs="+", default=[],
                   help="GPU tilings of impl='fused' to time as well, each TOKENSxWARPS (e.g. 128x4 512x8; "
                        "the default is 256 tokens, 4 warps), added to the layer table as fused@TOKENSxWARPS")
    p.add_argument("--model-configs", type=parse_model_config, nargs="+",
                   help="BATCHxSIZE of each model setting, e.g. 128x32 256x32 64x64 (default: "
                        "--model-batch x --model-size)")
    p.add_argument("--model-batch", type=int, help="model batch (default 32; 4 with --quick)")
    p.add_argument("--model-size", type=int, help="model image size (default 32; 16 with --quick)")
    p.add_argument("--width", type=float, help="model width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--steps", type=int, help="timed samples per model entry (default 5; 2 with --quick)")
    p.add_argument("--compile-threads", type=int,
                   help="entries of a group compiled at once (default 1 on the CPU, where compiling "
                        "competes with nothing else worth doing; min(8, cores) on an accelerator)")
    p.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="start no setting but the first after this many seconds (what ran is kept and "
                        "written)")
    p.add_argument("--json", help="write every number (and the machine) to this JSON file")
    p.add_argument("--markdown", help="write the tables and the summary to this Markdown file")
    args = p.parse_args(argv)
    try:
        tiling_impls = register_fused_tilings(args.fused_tilings)
    except ValueError:
        p.error(f"--fused-tilings takes TOKENSxWARPS entries such as 128x4; got {args.fused_tilings}")
    defaults = dict(image_sizes=([32, 64], [16]), layer_batches=([32, 16], [4]), repeats=(5, 2),
                    model_batch=(32, 4), model_size=(32, 16), width=(1.0, 0.25), steps=(5, 2))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if len(args.layer_batches) != len(args.image_sizes):
        p.error("--layer-batches needs one batch per --image-sizes entry")
    if args.model_configs is None:
        args.model_configs = [(args.model_batch, args.model_size)]
    if args.student_impls is None:
        args.student_impls = (["auto"] + ([] if args.skip_patches_model else ["patches"])
                              if jax.default_backend() == "cpu" else native_impls())
    if args.layer_impls is None:
        args.layer_impls = native_impls()
    args.layer_impls += [name for name in tiling_impls if name not in args.layer_impls]
    unknown = sorted(set(args.student_impls + args.distill_impls + args.layer_impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown impl(s) {unknown}; choose from {sorted(IMPLS)}")
    if args.compile_threads is None:
        args.compile_threads = 1 if jax.default_backend() == "cpu" else min(8, os.cpu_count() or 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    results = Results(args, machine())
    print(f"local attention benchmark{' (--quick)' if args.quick else ''}: {jax.devices()}, "
          f"impls {native_impls()}, impl='auto' -> {attention_module.select_impl()!r}")
    sections = []
    if not args.skip_layers:
        sections += [("layers", g, run_layer_group) for g in layer_groups(args)]
    if not args.skip_models:
        sections += [("models", g, run_model_group) for g in model_groups(args)]
    printed = set()
    for i, (section, group, run) in enumerate(sections):
        if i and time.perf_counter() - start > args.deadline_s:  # the first setting always runs
            results.skipped.append(f"{section} {group.label}")
            continue
        if section not in printed:
            printed.add(section)
            print("\n== 1. Layers: every attention shape of SA-ResNet26, C_in=C_out=C, "
                  f"k={args.kernel_size}, {args.heads} heads ==" if section == "layers" else
                  f"\n== 2. Models: median of {args.steps} samples after compile and 1 warm-up ==")
            if section == "layers":
                print(f"   median of {args.repeats} samples after compile and 1 warm-up call, each entry "
                      f"alternating with the conv ('x conv': against those conv calls); 'check' = "
                      f"max|diff| of output and grads vs {args.layer_impls[0]!r}; peak = XLA buffers of the "
                      f"fwd+bwd program")
        run(group, args, results)
    results.write()
    print("\n== Summary ==")
    for line in summary_lines(results, args):
        print(f"   {line}")
    print(f"   1-minute load average: {load_at_start:.1f} before, {os.getloadavg()[0]:.1f} at the end "
          f"(this process alone adds up to ~{os.cpu_count()}; more means the cores were shared); "
          f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
