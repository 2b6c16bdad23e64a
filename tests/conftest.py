"""Session set-up: one persistent XLA compilation cache for the whole test session, cheaper CPU compiles,
longest files first.

The trainer tests start many runs (subprocesses, notebook kernels, multi-host processes) that compile
the same step functions; with a shared cache each program is compiled once per session. The cache is a
fresh directory per session (created here in the controlling process; pytest-xdist workers and every
subprocess inherit the variable), so no result of an earlier session is reused. Set
JAX_COMPILATION_CACHE_DIR yourself to keep a cache across sessions.
"""

import os
import sys
import tempfile

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="alite_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs repeat too
# The tests' programs are tiny and run once or a few times: compiling is most of their time, and LLVM's
# optimisation of the CPU code most of that. Level 0 keeps XLA's own (HLO) optimisations, fusion included,
# so the programs compute the same; it cut the CPU time of the files tried by about 30%.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

if "jax" in sys.modules:  # imported before this file (by a plugin): set what the variables would have
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# The files that take longest (minutes of compiling and end-to-end runs on 2 cores), longest first.
# pytest-xdist's --dist loadfile hands out whole files in collection order; started last (they sort late
# by name), the longest would run alone at the end while the other worker idles.
# Measured with --durations on the whole suite (-n 2, 2 cores), seconds of a worker: test_train 428,
# test_training_health 369, test_multihost 280, test_attention 233, test_notebook about 135, test_sparsity
# 140, test_export 130, test_models 127, test_attention_impls 112, test_compaction 109.
LONGEST_FIRST = ("test_train.py", "test_training_health.py", "test_multihost.py", "test_attention.py",
                 "test_notebook.py", "test_sparsity.py", "test_export.py", "test_models.py",
                 "test_attention_impls.py", "test_compaction.py", "test_method_plugin.py",
                 "test_mixed_precision.py")


def pytest_collection_modifyitems(session, config, items):
    """Runs the longest files first (a stable sort: every file keeps its own order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
