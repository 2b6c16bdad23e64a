"""What the test suite's XLA CPU settings (tests/conftest.py) save: one tiny sparse-distillation run of the
trainer (SA-ResNet26 at width 0.25 from a ResNet-50 at width 0.125, the digits at 8x8, 3 epochs of 4
steps: the trainer tests' run), started cold (an empty compilation cache) under each setting, side by
side.

Settings: XLA's defaults; LLVM's optimisation level 0 (``--xla_backend_optimization_level=0``); level 0
and the elemental IR emitters (``--xla_cpu_use_fusion_emitters=false``). Each run is a fresh
``python -m alite_jax.main`` with its own empty cache; the teacher run it distils from is trained once,
beforehand. Printed per setting: the median wall-clock and CPU seconds (the suite runs on 2 cores, so CPU
seconds are what it pays), their ratio to the defaults', and the largest difference of the runs' final
parameters from the defaults' (relative to the parameter's largest magnitude): how differently the code
rounds, which the tests' tolerances must allow for as they do for another CPU.

    python benchmarks/compile_flags.py [--repeats=2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tiny_runs import final_params, write_config  # noqa: E402  (the trainer tests' own tiny run)

SETTINGS = {
    "defaults": "",
    "level 0": "--xla_backend_optimization_level=0",
    "level 0, elemental emitters": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}


def run(config: str, workdir: str, flags: str, cache: str) -> tuple[float, float]:
    """One cold run: (wall seconds, CPU seconds of the child)."""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alite_jax.main", f"--config={config}", f"--workdir={workdir}"],
                   check=True, capture_output=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def max_relative_difference(a, b) -> float:
    import jax
    import numpy as np

    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = float(np.max(np.abs(x))) or 1.0
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import pathlib

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        teacher = str(tmp / "teacher")
        run(write_config(tmp / "teacher.py", "teacher"), teacher, SETTINGS["level 0"], str(tmp / "c"))
        config = write_config(tmp / "distill.py", "distill", teacher=teacher)
        times = {name: [] for name in SETTINGS}
        for r in range(args.repeats):  # interleaved: the machine's drift hits every setting alike
            for i, (name, flags) in enumerate(SETTINGS.items()):
                workdir, cache = str(tmp / f"run{i}_{r}"), str(tmp / f"cache{i}_{r}")
                times[name].append(run(config, workdir, flags, cache))
                shutil.rmtree(cache)
        base = [statistics.median(t[k] for t in times["defaults"]) for k in (0, 1)]
        reference = final_params(str(tmp / "run0_0"))
        print(f"cold tiny distillation run, median of {args.repeats}, on {os.cpu_count()} CPU(s)")
        print("| setting | wall s | CPU s | wall / defaults | CPU / defaults | max param difference |")
        print("|---|---|---|---|---|---|")
        for i, name in enumerate(SETTINGS):
            wall, cpu = (statistics.median(t[k] for t in times[name]) for k in (0, 1))
            diff = max_relative_difference(reference, final_params(str(tmp / f"run{i}_0")))
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / base[0]:.2f} | {cpu / base[1]:.2f} | "
                  f"{diff:.1e} |")


if __name__ == "__main__":
    main()
