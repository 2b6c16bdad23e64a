"""Session set-up: one persistent XLA compilation cache for the whole test session.

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

if "jax" in sys.modules:  # imported before this file (by a plugin): set what the variables would have
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
