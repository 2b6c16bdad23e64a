"""``python -m alite_jax.main --config=configs/<file>.py --workdir=<dir>``: train, distil, report.

A config is an ml_collections file (``configs/``); ``--config.<field>=value`` overrides a field and
``--config=configs/<file>.py:smoke`` shrinks the run. A config with ``phases`` (the demo) runs each
phase in ``<workdir>/<phase>``, in ``phase_order``, after checking every phase's settings; relative
teacher, baseline, pretrained and architecture paths of a phase are taken inside the workdir. Running
again in the same workdir resumes where it stopped; ``--fresh`` starts over instead, moving what the
workdir held aside first.

Exit status: 0 when the run finished, and also when a preemption notice (SIGTERM, SIGINT) stopped it
after a checkpoint: the last line then says to run the same command again, which resumes it. 2 for a
user error (a bad setting, a missing or mismatched file, a workdir holding another run, a diverged
run): one line ``error: <what and how to fix it>`` on stderr. Any other error is a bug: its traceback
is printed and the status is 1.

Multi-host (several TPU hosts, GPU hosts or one process per GPU): start the same command in every
process; ``--distributed`` (``auto``, ``on``, ``off``; see :mod:`alite_jax.distributed`) starts JAX's
multi-controller runtime first, when the environment asks for it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from alite_jax import distributed, methods, train
from alite_jax.errors import (UserError, exit_on_user_error, exit_with_user_error, quiet_failed_saves,
                              user_input)

# The trainer's fields naming another run's directory, relative to a phased run's workdir (a method adds
# its own: Method.path_fields).
PHASE_PATHS = ("baseline_workdir",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "Start jax.distributed: 'auto' when the environment names several processes (JAX_COORDINATOR_ADDRESS "
    "with JAX_NUM_PROCESSES and JAX_PROCESS_ID, Slurm, Open MPI, a GKE TPU slice), 'on' always (JAX's "
    "cluster detection, e.g. a multi-host Cloud TPU slice), 'off' never.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Start over even though the workdir holds a run (another config, or checkpoints that "
    "cannot be read): its contents are first moved aside to <workdir>.previous-<n>, not deleted.")


def resolve_phase_paths(phase: ml_collections.ConfigDict, workdir: str) -> None:
    """Makes a phase's relative paths (:data:`PHASE_PATHS` and its method's ``path_fields``) relative to
    the phased run's ``workdir``, in place."""
    for field in PHASE_PATHS + methods.class_fields(methods.method_class(phase.mode), "path_fields"):
        section, _, key = field.rpartition(".")
        holder = phase[section] if section else phase
        if holder.get(key) and not os.path.isabs(holder[key]):
            holder[key] = os.path.join(workdir, holder[key])


def run(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False,
        preemption: train.Preemption | None = None) -> dict[str, Any]:
    """Runs a config (or each phase of a phased config) in ``workdir``; ``preemption``: the caller's
    :class:`alite_jax.train.Preemption`, so that a notice before a phase's first step stops it too.

    Returns the (last phase's) summary, or ``{"preempted_at_step": step}`` (with ``"phase": name`` for a
    phased config) when a preemption notice stopped a run after its checkpoint: the phases after it do
    not start, and running the same command again resumes the interrupted one. A phased config's
    phases are all checked before the first one runs.
    """
    if "phases" not in config:
        return train.train_and_evaluate(config, workdir, fresh=fresh, preemption=preemption)
    num_devices = distributed.make_mesh().devices.size
    for name in config.phase_order:
        phase = config.phases[name]
        with user_input(f"phase {name}"):
            resolve_phase_paths(phase, workdir)
            train.check_fields(phase, num_devices)
    result: dict[str, Any] = {}
    for name in config.phase_order:
        phase = config.phases[name]
        distributed.say(f"=== phase {name}: {phase.mode} {phase.model.name} -> {os.path.join(workdir, name)}")
        try:
            result = train.train_and_evaluate(phase, os.path.join(workdir, name), fresh=fresh,
                                              preemption=preemption)
        except UserError as e:  # say which phase (other errors keep their own type and traceback)
            raise type(e)(f"phase {name}: {e}") from e
        if "preempted_at_step" in result:
            return dict(result, phase=name)
    return result


def _innermost_user_error(error: BaseException | None) -> UserError | None:
    """The innermost :class:`UserError` in an exception's chain: config_flags re-raises an exception of a
    config file's ``get_config`` (e.g. an unknown ``:switch``) with its traceback as the message."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the user's errors on one line and exit status 2: a config file that
    cannot be loaded, a :class:`UserError` raised while building the config, a ``--config.<field>``
    override naming no field or giving a value of the wrong type, an unknown or malformed flag. An error
    inside a config file's own code keeps its traceback."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        user_error = _innermost_user_error(e)
        exit_with_user_error(f"--config: {user_error}" if user_error is not None else str(e))
    except (KeyError, AttributeError) as e:  # config_flags applying an override to a missing field
        missing = unknown_override(argv, e)
        if missing is None:
            raise
        exit_with_user_error(missing)
    config = _CONFIG.value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
        try:  # config_flags keeps a file it could not load as an object that raises when used
            config.to_dict()
        except OSError as e:
            exit_with_user_error(f"--config: {e.__cause__ or e}")
    return rest


def unknown_override(argv: list[str], error: BaseException) -> str | None:
    """The one-line message for a ``--config.<path>=<value>`` whose path the config does not have
    (``error`` is what ml_collections raised: it names the missing key, with a suggestion), or None
    when ``error`` names no part of an override's path (then it is not the user's)."""
    detail: Any = error
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(message))
        detail = detail.args[0]
    lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
    missing = lines[0].strip("'\"") if lines else ""
    hint = "".join(f"; {line[0].lower()}{line[1:]}" for line in lines[1:])
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--config.") and missing in flag[len("--config."):].split("."):
            return (f"{flag}: the config has no field {missing!r}{hint} (the fields are those of "
                    f"alite_jax/config.py; a phased config's are under config.phases.<phase>)")
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # hide the backend probing chatter
    quiet_failed_saves()  # a full disk: the trainer's one line, not orbax's hundreds
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("give --config=configs/<file>.py and --workdir=<dir> "
                             "(try --config=configs/demo.py --workdir=/tmp/alite_demo)")
    distributed.initialize(_DISTRIBUTED.value)  # before anything uses a device
    start = time.perf_counter()
    # a notice (SIGTERM, Ctrl-C) from here on stops the command cleanly, during the set-up too
    with exit_on_user_error(), train.Preemption() as preemption:
        result = run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value, preemption=preemption)
    seconds = time.perf_counter() - start
    if "preempted_at_step" in result:
        again = " without --fresh" if _FRESH.value else ""
        distributed.say(f"stopped by a preemption notice: run the same command again{again} to resume "
                        f"({seconds:.0f}s)")
    else:
        distributed.say(f"done in {seconds:.0f}s; results in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
