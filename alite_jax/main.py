"""``python -m alite_jax.main --config=configs/<file>.py --workdir=<dir>``: train, distil, report.

A config is an ml_collections file (``configs/``); ``--config.<field>=value`` overrides a field and
``--config=configs/<file>.py:smoke`` shrinks the run. A config with ``phases`` (the demo) runs each
phase in ``<workdir>/<phase>``, in ``phase_order``; relative teacher and baseline paths of a phase are
taken inside the workdir. Running again in the same workdir resumes where it stopped.

Multi-host (several TPU hosts, GPU hosts or one process per GPU): start the same command in every
process; ``--distributed`` (``auto``, ``on``, ``off``; see :mod:`alite_jax.distributed`) starts JAX's
multi-controller runtime first, when the environment asks for it.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from alite_jax import distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "Start jax.distributed: 'auto' when the environment names several processes (JAX_COORDINATOR_ADDRESS "
    "with JAX_NUM_PROCESSES and JAX_PROCESS_ID, Slurm, Open MPI, a GKE TPU slice), 'on' always (JAX's "
    "cluster detection, e.g. a multi-host Cloud TPU slice), 'off' never.")


def run(config, workdir: str) -> None:
    """Runs a config (or each phase of a phased config) in ``workdir``."""
    if "phases" not in config:
        train.train_and_evaluate(config, workdir)
        return
    for name in config.phase_order:
        phase = config.phases[name]
        for field in ("teacher.workdir", "baseline_workdir"):
            section, _, key = field.rpartition(".")
            holder = phase[section] if section else phase
            if holder[key] and not os.path.isabs(holder[key]):
                holder[key] = os.path.join(workdir, holder[key])
        distributed.say(f"=== phase {name}: {phase.mode} {phase.model.name} -> {os.path.join(workdir, name)}")
        train.train_and_evaluate(phase, os.path.join(workdir, name))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # hide the backend probing chatter
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("give --config=configs/<file>.py and --workdir=<dir> "
                             "(try --config=configs/demo.py --workdir=/tmp/alite_demo)")
    distributed.initialize(_DISTRIBUTED.value)  # before anything uses a device
    start = time.perf_counter()
    run(_CONFIG.value, _WORKDIR.value)
    distributed.say(f"done in {time.perf_counter() - start:.0f}s; results in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
