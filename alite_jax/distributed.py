"""Multi-host runs: start JAX's multi-controller runtime when the environment asks for it.

JAX scales past one machine by running the same program once per host (one process per TPU host, per
GPU host, or per GPU); ``jax.distributed.initialize()`` connects the processes, after which
``jax.devices()`` lists the devices of all of them and a jitted step over a mesh of those devices runs
its collectives across hosts. alite_jax adds nothing to that engine: this module only decides whether
to start it, and with which arguments, before anything touches a device.

``initialize(mode)`` with ``mode``:

* ``"auto"`` (the default of ``python -m alite_jax.main --distributed``): start it when the environment
  says this process is one of several: ``JAX_COORDINATOR_ADDRESS`` is set (then ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID`` give the job's size and this process's rank; JAX itself reads the address and
  ``JAX_LOCAL_DEVICE_IDS``), a Slurm job step or an Open MPI job has more than one task, or a TPU slice
  on GKE lists more than one worker host. Otherwise the run stays single-process.
* ``"on"``: always start it, with the values above where set and JAX's own cluster detection for the
  rest (Cloud TPU VMs, Slurm, Open MPI, Kubernetes, mpi4py). Use this on a multi-host Cloud TPU slice
  created with ``gcloud``, whose workers are found through the TPU metadata server, not the environment.
* ``"off"``: never (one process, whatever the environment says).

Once started, every process reads its own shard of the data (``alite_jax.data``), all of them run
the same jitted step over one mesh, process 0 alone writes metrics and reports, and every process
takes part in each orbax checkpoint (so the workdir must be a directory all hosts share). A preemption
notice (SIGTERM) on any host is agreed by all of them through JAX's preemption service, so every process
checkpoints at the same step.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

MODES = ("auto", "on", "off")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number") from None


def requested_by(environ: Mapping[str, str] | None = None) -> str | None:
    """What in the environment makes this process one of several, or None for a one-process run."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS", "").strip():
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in environ and (_env_int(environ, "SLURM_STEP_NUM_TASKS")
                                      or _env_int(environ, "SLURM_NTASKS") or 1) > 1:
        return "Slurm"
    if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("TPU_PROCESS_ADDRESSES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU slice"
    return None


def explicit_arguments(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """``jax.distributed.initialize`` keyword arguments set through ``JAX_*`` environment variables.

    Raises ValueError when ``JAX_COORDINATOR_ADDRESS`` is set without a usable process count and rank
    and no cluster manager (Slurm, Open MPI) is there to supply them.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
    process_id = _env_int(environ, "JAX_PROCESS_ID")
    if address and ":" not in address:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} needs a port: host:port, e.g. "
                         f"{address}:1234 (the same on every process)")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"JAX_NUM_PROCESSES={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES={num_processes})")
    managed = any(name in environ for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                               "TPU_PROCESS_ADDRESSES"))
    if address and not managed and (num_processes is None or process_id is None):
        raise ValueError(
            "JAX_COORDINATOR_ADDRESS is set, so this is one process of a multi-process run, but "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not both set: set them on every process (the "
            "number of processes, and this process's rank from 0), or unset JAX_COORDINATOR_ADDRESS "
            "for a one-process run")
    arguments: dict[str, object] = {}
    if address:
        arguments["coordinator_address"] = address
    if num_processes is not None:
        arguments["num_processes"] = num_processes
    if process_id is not None:
        arguments["process_id"] = process_id
    return arguments


def initialize(mode: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Starts ``jax.distributed`` if ``mode`` and the environment call for it; True if it did.

    Call it first, before anything uses a device: JAX refuses to connect processes whose backends have
    already started. See the module docstring for the modes.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    reason = requested_by(environ)
    if mode == "off" or (mode == "auto" and reason is None):
        return False
    arguments = explicit_arguments(environ)
    try:
        jax.distributed.initialize(**arguments)
    except ValueError as e:  # JAX found no cluster to fill in what the environment left unset
        raise ValueError(
            f"cannot start jax.distributed ({e}): no cluster (Cloud TPU, Slurm, Open MPI, Kubernetes) was "
            f"detected and JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are not all set. "
            f"Set them on every process, or run with --distributed=auto (or off) for one process") from e
    print(f"process {jax.process_index()} of {jax.process_count()} ({reason or 'JAX cluster detection'}): "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    return True


def is_leader() -> bool:
    """True on the process that writes metrics, reports and logs (process 0)."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """Prints ``message`` on process 0 only: every process runs the same loop, one of them reports."""
    if is_leader():
        print(message, flush=True)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices (of all processes) with the axis name ``"data"``: the batch is
    sharded over it, the state replicated."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
