"""How the benchmarks time JAX calls: every call's outputs are waited for (``jax.block_until_ready``)
before the clock stops, each call is warmed up (compiled, caches filled) before it is timed, and the
figure kept is the median of the repeats.

Calls compared with each other run interleaved (:func:`round_robin`, :func:`interleaved`): one sample of
each in turn, round after round, so that load from other processes on a shared machine hits them alike
and their ratios stay meaningful.

The benchmarks run as scripts (``python benchmarks/<name>.py``) and import this module from beside them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax


def seconds(call: Callable[[], Any]) -> float:
    """Seconds of one call, its outputs waited for."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def inner_calls(call: Callable[[], Any], min_time: float) -> int:
    """How many back-to-back calls make one timed sample last at least ``min_time`` seconds (1 on a CPU,
    where one call already takes milliseconds; up to 100 on an accelerator, where the per-call host
    synchronisation would otherwise dominate a fast kernel). Makes one call to find out."""
    one = seconds(call)
    return int(min(100, max(1, -(-min_time // max(one, 1e-6)))))


def timed_sample(call: Callable[[], Any], inner: int) -> tuple[float, Any]:
    """Seconds per call of ``inner`` back-to-back calls, waited for at the end, and the last output."""
    start = time.perf_counter()
    for _ in range(inner):
        out = call()
    out = jax.block_until_ready(out)
    return (time.perf_counter() - start) / inner, out


def round_robin(calls: Sequence[Callable[[], Any]], repeats: int, min_time: float = 0.0
                ) -> tuple[list[list[float]], list[Any]]:
    """Calls every function once (warm-up; its output is returned), then ``repeats`` rounds of one
    sample of each in turn (a sample: enough back-to-back calls to last ``min_time``, see
    :func:`inner_calls`). Returns the seconds per call of each sample of each function, and the warm-up
    outputs."""
    outputs = [jax.block_until_ready(call()) for call in calls]
    inner = [inner_calls(call, min_time) for call in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            times[i].append(timed_sample(call, inner[i])[0])
    return times, outputs


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each case, timed by :func:`round_robin`."""
    times, _ = round_robin(list(cases.values()), repeats, min_time)
    return {name: statistics.median(t) for name, t in zip(cases, times)}


def first_and_median(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(the first call's seconds, compilation included; the median of ``repeats`` later calls)."""
    first = seconds(call)
    return first, statistics.median(seconds(call) for _ in range(repeats))
