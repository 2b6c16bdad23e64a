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

from xla_flags import with_fast_compile

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="alite_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs repeat too
# Cheaper CPU compiles for the whole session (tests/xla_flags.py says which and why).
os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))

if "jax" in sys.modules:  # imported before this file (by a plugin): set what the variables would have
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# The files that take longest (minutes of compiling and end-to-end runs on 2 cores), longest first.
# pytest-xdist's --dist loadfile hands out whole files in collection order (setup.cfg turns off its
# default reordering by the number of tests per file, which started the few-test end-to-end files last,
# to run alone while the other worker idled). Worker-seconds measured with --durations on the whole
# suite (-n 2, 2 cores): test_training_health 300, test_train 300, test_notebook 220, test_multihost
# 190, test_attention 115, test_main 85, test_export 70, test_sparsity 65, test_models 60,
# test_compaction 60, test_attention_impls 55, test_convert 40, test_method_plugin 40.
LONGEST_FIRST = ("test_training_health.py", "test_train.py", "test_notebook.py", "test_multihost.py",
                 "test_attention.py", "test_main.py", "test_export.py", "test_sparsity.py", "test_models.py",
                 "test_compaction.py", "test_attention_impls.py", "test_convert.py", "test_method_plugin.py",
                 "test_spvit_finetune.py", "test_mixed_precision.py", "test_costs.py")


def pytest_collection_modifyitems(session, config, items):
    """Runs the longest files first (a stable sort: every file keeps its own order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
