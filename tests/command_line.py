"""The package's command lines run as a user runs them, in a subprocess from the repository root: what the
tests of ``python -m alite_jax.<module>`` share (exit status, stdout and stderr come back as text)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module: str, *flags: str, without: Sequence[str] = (), env: Mapping[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <module> <flags>`` from the repository root, its output captured.

    ``without`` names packages the command must do without (each import of them fails, as when they are
    not installed): a command line that promises not to need them is tested where they are. ``env`` is
    added to this process's environment.
    """
    if without:
        blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in without)
        command = ["-c", f"import runpy, sys; {blocked}; "
                         f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]
    else:
        command = ["-m", module]
    return subprocess.run([sys.executable, *command, *flags], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def run_convert(*flags: str) -> subprocess.CompletedProcess:
    """``python -m alite_jax.convert`` where torch cannot be imported: the command line needs none."""
    return run_cli("alite_jax.convert", *flags, without=("torch",), env={"JAX_PLATFORMS": "cpu"})
