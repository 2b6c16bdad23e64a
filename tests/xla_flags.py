"""The XLA CPU settings the test session compiles with (tests/conftest.py sets them for every worker and
subprocess), and how a run that executes more than it compiles drops them.

The tests' programs are tiny and run once or a few times: compiling is most of their time. Two settings
cut it without changing what a program computes: LLVM's optimisation level 0 (XLA's own HLO
optimisations, fusion included, still run) and the elemental IR emitters in place of the newer fusion
emitters (the same fused HLO, emitted by the older, cheaper code generator). Their float results may
round differently, as they do between CPUs, which every tolerance allows for. The code they give runs
slower: the few runs that train for many steps (the notebook, the weight-scale regression) drop them.
benchmarks/compile_flags.py measures both sides.
"""

from __future__ import annotations

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_fast_compile(flags: str) -> str:
    """``flags`` (an XLA_FLAGS value) with each fast-compile setting it does not set itself."""
    added = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    return " ".join([flags, *added]).strip()


def without_fast_compile(flags: str) -> str:
    """``flags`` without the fast-compile settings: XLA's defaults for code that runs long."""
    return " ".join(f for f in flags.split() if f not in FAST_COMPILE_FLAGS)
