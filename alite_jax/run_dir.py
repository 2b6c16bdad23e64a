"""Everything on disk about a run, and the rules that keep its history safe.

A run directory (``workdir``) holds:

* ``config.json``: the run's config with the data's class and channel counts (:func:`write_run_config`).
  It is written once the settings, the data, the teacher and the checkpoints have passed every check,
  so a run that is refused leaves an existing run's file as it was.
* ``checkpoints/<step>/``: orbax checkpoints of the whole training state, at every epoch's end and at a
  preemption (:func:`checkpoint_manager`).
* ``metrics.jsonl``: one JSON object per finished epoch (:func:`read_metrics`, :func:`append_metrics`).
* ``tensorboard/``, and at the end ``model/`` (the variables a distillation loads as its teacher,
  :func:`export_model`), ``summary.json`` (:func:`write_summary`), ``table1.md`` and the plots, and the
  files a method adds (:func:`write_json`; e.g. SPViT's ``architecture.json``, the architecture its
  model has).

Rules, so that days of training are never lost to a fault or a slip:

* **One run per directory.** A run started in a directory that holds another run's history (its
  ``config.json`` differs in any field but those of :data:`MAY_CHANGE` and the registered methods'
  ``may_change``, and it has checkpoints, metrics, a summary or a model: :func:`history`) is refused
  before anything is written, naming the fields (:func:`check_same_run`).
* **An unreadable checkpoint is set aside, not trusted and not deleted.** The newest readable
  checkpoint is restored; each newer, unreadable one is reported and renamed ``<step>.corrupt-<n>``, so
  the step is saved again when the run gets there (:func:`restore_checkpoint`).
* **History is never started over unless asked.** Checkpoints none of which can be read, or history
  without a checkpoint to resume from, stop the run with a :class:`RunDirError` that changes nothing.
  Asked to start fresh (``--fresh``), the trainer first moves the whole directory aside to
  ``<workdir>.previous-<n>`` (:func:`set_aside_run`).
* **A partial line is not a lost run.** A kill while a metrics line was written leaves half a line at
  the end of ``metrics.jsonl``: it is reported and ignored. Files are rewritten atomically (a complete
  new file replaces the old one), so a kill during a rewrite leaves the old file whole.

With several processes, every process reads and restores; process 0 alone writes and renames, and the
processes wait for each other around each rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from alite_jax.compact.tree import flatten
from alite_jax.distributed import is_leader, say
from alite_jax.errors import RunDirError
from alite_jax.models import abstract_variables

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
STATE, DATA, RUN_CONFIG = "state", "data", "config"  # the items of a checkpoint step
METRICS = "metrics.jsonl"
MODEL = "model"
LOCK = "lock"  # held by the run working in the directory (workdir_lock)
NEW, OLD = ".new", ".old"  # model/ is written as model.new, then swapped in (the old one as model.old)
SUMMARY = "summary.json"

# Fields that may differ between a run's config.json and the config that resumes it: where files are,
# how often the run logs, checks its health and keeps checkpoints, and which implementation of the same
# attention computes; a method adds its own (Method.may_change: e.g. where its teacher run is). Every
# other field makes it another run.
MAY_CHANGE = ("log_every_steps", "checkpoint_max_to_keep", "health_factor", "baseline_workdir",
              "data.data_dir", "data.manual_dir", "data.download", "model.impl")
FRESH_HINT = ("use another --workdir, or pass --fresh to start over here (the directory is first moved "
              "aside to {aside}, not deleted)")


def _sync(name: str) -> None:
    """All processes reach this point before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"alite_jax.run_dir: {name}")


def _write_atomically(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: a kill leaves the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def aside_name(path: str, label: str) -> str:
    """``<path>.<label>-<n>`` with the smallest n >= 1 that names nothing yet."""
    n = 1
    while os.path.exists(f"{path}.{label}-{n}"):
        n += 1
    return f"{path}.{label}-{n}"


# --------------------------------------------------------------------------------------------------
# config.json: one run per directory.
# --------------------------------------------------------------------------------------------------


def _read_json(path: str, fix: str) -> dict[str, Any] | None:
    """A JSON file's contents, None when it does not exist, or a RunDirError naming it and ``fix``."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}): {fix}") from e


def read_run_config(workdir: str) -> dict[str, Any] | None:
    """The run's ``config.json`` as a dict, or None when there is none."""
    return _read_json(os.path.join(workdir, CONFIG), "restore it from a copy of the run, or "
                      + FRESH_HINT.format(aside=aside_name(workdir, "previous")))


def write_run_config(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                     channels: int, input_stats: tuple[Any, Any] | None = None) -> None:
    """``workdir/config.json``: the run's config with the data's class and channel counts (process 0) and,
    when given, the per-channel (mean, std) its images were normalised with (``input_mean``,
    ``input_std``: what an exported model folds in without reading the data again)."""
    if is_leader():
        extra = {} if input_stats is None else dict(input_mean=[float(v) for v in np.ravel(input_stats[0])],
                                                    input_std=[float(v) for v in np.ravel(input_stats[1])])
        text = json.dumps(dict(config.to_dict(), num_classes=num_classes, channels=channels, **extra),
                          indent=2)
        _write_atomically(os.path.join(workdir, CONFIG), text)


def config_differences(stored: dict[str, Any], config: ml_collections.ConfigDict,
                       may_change: tuple[str, ...] = (), source: str = "its config.json") -> list[str]:
    """The fields, outside :data:`MAY_CHANGE` and ``may_change`` (the methods'), whose values differ
    between a run's stored config and ``config``, as "<field> is <stored> in <source>, <new> now".
    Fields only one of them has (a run written by an older version) are not compared."""
    old = flatten(stored, sep=".")
    new = flatten(json.loads(json.dumps(config.to_dict())), sep=".")  # tuples as JSON lists, like the file
    return [f"{name} is {old[name]!r} in {source}, {new[name]!r} now"
            for name in sorted(old.keys() & new.keys())
            if name not in MAY_CHANGE + may_change and old[name] != new[name]]


def history(workdir: str) -> list[str]:
    """What ``workdir`` holds of a run's history, by name: checkpoints (readable or not, set aside or not),
    metrics rows, summary, model. A directory with a config.json alone (a run that stopped before its
    first epoch ended) has none."""
    found = []
    checkpoints = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(checkpoints) and any(re.fullmatch(r"\d+(\.corrupt-\d+)?", name)
                                          for name in os.listdir(checkpoints)):
        found.append(CHECKPOINTS)  # steps, or steps set aside (not orbax's temporary directories)
    if read_metrics(workdir, warn=lambda message: None):
        found.append(METRICS)
    return found + [name for name in (SUMMARY, MODEL) if os.path.exists(os.path.join(workdir, name))]


def check_same_run(workdir: str, config: ml_collections.ConfigDict, may_change: tuple[str, ...] = ()) -> None:
    """Raises :class:`RunDirError` when ``workdir`` holds the history of another run than ``config``
    describes (a config.json without history is simply replaced); ``may_change``: the methods' fields
    that may differ too (:func:`alite_jax.methods.registered_may_change`)."""
    if not history(workdir):
        return
    stored, source = read_run_config(workdir), "its config.json"
    if stored is None:  # config.json lost: the checkpoints carry the config they were trained with
        stored, source = checkpoint_config(workdir), "its checkpoint"
    if stored is None:
        return
    differences = config_differences(stored, config, may_change, source)
    if differences:
        raise RunDirError(
            f"{workdir} holds another run: {'; '.join(differences)}. To resume it, run it with its own "
            f"config ({source}); to run this config, "
            + FRESH_HINT.format(aside=aside_name(workdir, "previous")) + ".")


def set_aside_run(workdir: str) -> str | None:
    """Moves a non-empty ``workdir`` to ``<workdir>.previous-<n>`` (for a fresh start); returns where,
    or None when there was nothing to move."""
    _sync("before setting a run aside")  # every process has read the directory
    moved = None
    if os.path.isdir(workdir) and set(os.listdir(workdir)) - {LOCK}:
        moved = aside_name(workdir, "previous")
        if is_leader():
            os.rename(workdir, moved)
            if os.path.exists(os.path.join(moved, LOCK)):  # the run's lock (held) comes back with it
                os.makedirs(workdir)
                os.rename(os.path.join(moved, LOCK), os.path.join(workdir, LOCK))
            say(f"starting fresh: the previous contents of {workdir} are now in {moved}")
    _sync("after setting a run aside")
    return moved


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds ``workdir/lock`` for the run: a second run in the same workdir (another terminal, a
    relaunched job, a misconfigured host) is refused with :class:`RunDirError` naming the holder, before
    it reads or writes anything else.

    The lock is the kernel's (``fcntl.flock``): it goes with the process that holds it, however that
    process ends, so a killed run's lock never blocks the next one. The holder's host, pid, start and
    command are written in the file, which is removed on release: a next run that still finds them knows
    the previous one was killed, and says so. In a multi-host run process 0 holds it for all. A workdir
    this created and that holds nothing else when the run ends (a run its checks refused) is removed.
    """
    path = os.path.join(workdir, LOCK)
    created, handle, refusal = not os.path.exists(workdir), None, ""
    if is_leader():
        handle, refusal = _take_lock(workdir, path)
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
        if int(refused) and not refusal:
            refusal = f"process 0 could not take the lock of {workdir}: it is in use by another run"
    if refusal:
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            os.rmdir(workdir)
        raise RunDirError(refusal)
    try:
        yield
    finally:
        if handle is not None:
            os.remove(path)  # before the lock goes: a run that opens the file next finds a new one
            handle.close()
            if created and not os.listdir(workdir):
                os.rmdir(workdir)


def _take_lock(workdir: str, path: str) -> tuple[Any, str]:
    """``(open lock file, "")`` once this process holds ``path``'s lock, or ``(None, why not)``."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {workdir} ({_one_line(e)}); give a --workdir this user can "
                          f"write to") from None
    while True:
        try:
            handle = open(path, "a+")
        except OSError as e:
            raise RunDirError(f"cannot write in {workdir} ({_one_line(e)}); give a --workdir this user "
                              f"can write to") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "its details are not written yet"
            handle.close()
            return None, (f"{workdir} is in use by another run ({holder}); nothing was changed. Wait for "
                          f"it to end, or use another --workdir")
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its holder removed while this one opened it: try the new one
            break
        handle.close()
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        say(f"WARNING: the last run in {workdir} ({previous}) ended without releasing its lock (it was "
            f"killed): taking it over")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}")
    handle.flush()
    return handle, ""


def check_nothing_to_lose(workdir: str) -> None:
    """Raises :class:`RunDirError` when ``workdir`` has history (:func:`history`) that a start from
    scratch would overwrite; called when it has no checkpoint to resume from."""
    found = history(workdir)
    if found:
        raise RunDirError(
            f"{workdir} holds a run's history ({', '.join(found)}) but no checkpoint to resume from; nothing "
            f"was changed. To train it again from scratch, "
            + FRESH_HINT.format(aside=aside_name(workdir, "previous")) + ".")


# --------------------------------------------------------------------------------------------------
# Checkpoints: restore the newest readable one, set the unreadable ones aside.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EpochCheckpoints:
    """Orbax's preservation policy of a run: the newest ``n`` checkpoints taken at an epoch's end (a step
    that is a multiple of ``steps_per_epoch``), and the newest checkpoint whatever its step (a stop's,
    mid-epoch). ``checkpoint_max_to_keep`` counts epoch checkpoints: a checkpoint taken mid-epoch on a
    preemption notice never evicts one, and goes once a newer checkpoint exists."""

    n: int
    steps_per_epoch: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        steps = [c.step for c in checkpoints]
        at_epoch_end = [s for s in steps if s % self.steps_per_epoch == 0]
        keep = set(sorted(at_epoch_end)[-self.n:]) | ({max(steps)} if steps else set())
        return [s in keep for s in steps]


def checkpoint_manager(workdir: str, max_to_keep: int,
                       steps_per_epoch: int | None = None) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``: two items per step, ``state`` (the whole training
    state) and ``data`` (the training iterator's position, grain's own checkpoint format: one small JSON
    file per process). With ``steps_per_epoch`` (a run that saves), ``max_to_keep`` counts the
    checkpoints at epochs' ends (:class:`EpochCheckpoints`); without, the newest ``max_to_keep``.

    The items' handlers are given, not inferred from the newest step directory on disk: an empty one (a
    kill in the first moments of a save) would otherwise make every checkpoint unreadable.
    """
    keep = (dict(preservation_policy=EpochCheckpoints(max_to_keep, steps_per_epoch)) if steps_per_epoch
            else dict(max_to_keep=max_to_keep))
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(create=True, **keep),
        item_names=(STATE, DATA, RUN_CONFIG),
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                       RUN_CONFIG: ocp.JsonCheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
                    force: bool = False, config: ml_collections.ConfigDict | None = None) -> None:
    """Saves the train state, the data iterator's position and (given) the run's config at ``step``
    (asynchronously; orbax waits for the previous save first: :func:`checkpoint_saved` says whether it
    worked). The config in each checkpoint checks a resumption when config.json is gone
    (:func:`check_same_run`)."""
    items = {STATE: ocp.args.StandardSave(state), DATA: grain.checkpoint.CheckpointSave(data_iterator)}
    if config is not None:
        items[RUN_CONFIG] = ocp.args.JsonSave(json.loads(json.dumps(config.to_dict())))
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
        failure = _save_failure(manager, e, step)
        if failure is e:
            raise
        raise failure from e


def checkpoint_saved(manager: ocp.CheckpointManager) -> None:
    """Waits for the checkpoint save in flight. One that failed for lack of space raises
    :class:`RunDirError` (``no space left on <filesystem> while saving step N: the last good checkpoint
    is step M``), with its partial directory removed so that it fills nothing; any other failure
    propagates as it is."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        failure = _save_failure(manager, e)
        if failure is e:
            raise
        raise failure from e


def _save_failure(manager: ocp.CheckpointManager, error: BaseException,
                  step: int | None = None) -> BaseException:
    """``error`` as a :class:`RunDirError` when it is a full disk (or quota), else ``error`` itself."""
    chain, cause = [], error
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    full = any(getattr(c, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
               or "no space left on device" in str(c).lower() or "quota exceeded" in str(c).lower()
               for c in chain)
    if not full:
        return error
    directory = str(manager.directory)
    partial = [name for name in os.listdir(directory) if ".orbax-checkpoint-tmp" in name]
    if step is None:
        steps = [int(name.split(".")[0]) for name in partial if name.split(".")[0].isdigit()]
        step = max(steps) if steps else None
    for name in partial:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    manager.reload()
    good = sorted(manager.all_steps())
    mount = os.path.abspath(directory)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    what = f"step {step}" if step is not None else "a checkpoint"
    last = f"the last good checkpoint is step {good[-1]}" if good else "no checkpoint has been saved"
    return RunDirError(f"no space left on {mount} while saving {what}: {last}. Free space there (or "
                       f"move the workdir) and run the same command again to resume")


def checkpoint_config(workdir: str) -> dict[str, Any] | None:
    """The config saved with the newest checkpoint of ``workdir`` that holds one, or None."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=(RUN_CONFIG,),
                                    item_handlers={RUN_CONFIG: ocp.JsonCheckpointHandler()})
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return manager.restore(step, args=ocp.args.Composite(
                    **{RUN_CONFIG: ocp.args.JsonRestore()}))[RUN_CONFIG]
            except Exception:  # an older checkpoint without one, or a damaged one: try the previous
                continue
    finally:
        manager.close()
    return None


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any,
                       data_iterator: Any | None = None, up_to: int | None = None) -> Any | None:
    """The newest readable checkpoint of ``manager`` (at a step <= ``up_to``, if given) restored into
    ``abstract_state``'s structure, shapes and shardings, and ``data_iterator`` (if given) moved to its
    position; None when there is no checkpoint.

    Each newer checkpoint that cannot be read is reported and set aside (renamed ``<step>.corrupt-<n>``
    in the same directory, kept for inspection), so that step is saved afresh when the run reaches it.
    When no checkpoint can be read, raises :class:`RunDirError` and changes nothing: the likeliest cause
    is then a config that does not match the checkpoints, not a fault of every one of them.
    """
    failures = []
    state = None
    for step in sorted((s for s in manager.all_steps() if up_to is None or s <= up_to), reverse=True):
        try:
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = manager.restore(step, args=ocp.args.Composite(**items))
            state = restored[STATE]
            break
        except Exception as e:  # any fault of the files: try the previous step
            failures.append((step, e))
    if state is None:
        if failures:
            workdir = os.path.dirname(str(manager.directory))
            steps = ", ".join(str(step) for step, _ in failures)
            raise RunDirError(
                f"{workdir} holds a run, but none of its checkpoints (steps {steps}) can be read with this "
                f"config (step {failures[0][0]}: {_one_line(failures[0][1])}); nothing was changed. If "
                f"they were written by another model or optimizer, run that config; otherwise "
                + FRESH_HINT.format(aside=aside_name(workdir, "previous")) + ".")
        return None
    if failures:
        _sync("before setting checkpoints aside")  # no process still reads them
        for step, error in failures:
            path = os.path.join(str(manager.directory), str(step))
            aside = aside_name(path, "corrupt")
            logging.error("checkpoint %d in %s is unreadable: %s", step, manager.directory, error)
            if is_leader():
                os.rename(path, aside)
            say(f"WARNING: checkpoint at step {step} in {manager.directory} is unreadable "
                f"({_one_line(error)}); set aside as {os.path.basename(aside)}, resuming from the "
                f"previous checkpoint")
        _sync("after setting checkpoints aside")
        manager.reload()
    return state


# --------------------------------------------------------------------------------------------------
# metrics.jsonl, the exported model, summary.json.
# --------------------------------------------------------------------------------------------------


def read_metrics(workdir: str, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` ([] when there is none).

    A last line that is not a complete JSON object with an ``epoch`` (a kill while it was written) is
    reported through
    ``warn`` and left out; any other bad line raises :class:`RunDirError` naming the file and line.
    """
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
        elif number == lines[-1][0]:
            warn(f"WARNING: {path}: its last line is incomplete (a write was interrupted) and is ignored: "
                 f"{line.strip()[:80]!r}")
        else:
            raise RunDirError(f"{path}, line {number}, is not a JSON object with an epoch: "
                              f"{line.strip()[:80]!r}. Repair or delete that line (each line holds one "
                              f"epoch's metrics).")
    return rows


def epochs_without_rows(workdir: str, epoch: int) -> list[int]:
    """The epochs before ``epoch`` (which a checkpoint in ``epoch`` has finished) that metrics.jsonl has
    no row for: a cut last line, or a kill between the checkpoint's save and the row's write."""
    return sorted(set(range(epoch)) - {r["epoch"] for r in read_metrics(workdir, warn=lambda _: None)})


def drop_checkpoints_after(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Deletes the checkpoints of ``manager`` after ``step`` (a run resumed from ``step`` saves them again,
    the same); returns their steps."""
    later = sorted(s for s in manager.all_steps() if s > step)
    for s in later:
        manager.delete(s)
    return later


def resume_metrics(workdir: str, epoch: int, step: int) -> list[dict[str, Any]]:
    """The metrics rows of the epochs a state restored at ``step`` (in ``epoch``) has finished; later
    rows (written before a checkpoint that is not there) are dropped and computed again, the same."""
    history = [r for r in read_metrics(workdir, warn=say) if r["epoch"] < epoch]
    missing = sorted(set(range(epoch)) - {r["epoch"] for r in history})
    if missing:
        say(f"WARNING: {os.path.join(workdir, METRICS)} has no row for epochs {missing}, which the "
            f"checkpoint at step {step} has finished: the summary and plots will lack them")
    return history


def write_metrics(workdir: str, rows: list[dict[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` with ``rows`` (process 0), atomically."""
    if is_leader():
        _write_atomically(os.path.join(workdir, METRICS), "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(workdir: str, row: dict[str, Any]) -> None:
    """Appends one epoch's row to ``metrics.jsonl`` (process 0)."""
    if is_leader():
        with open(os.path.join(workdir, METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")


def export_model(workdir: str, variables: dict[str, Any]) -> None:
    """``workdir/model``: a model's variables ({'params', 'batch_stats'}), what a distillation loads.

    With :func:`write_run_config` this makes a run directory a distillation can take as its teacher,
    e.g. a ResNet-50 trained elsewhere and converted to this zoo's parameter tree. Every process takes
    part (orbax saves collectively). An existing export is replaced, never deleted first: the new one
    is written whole beside it (``model.new``), then swapped in by two renames, and a kill between them
    is finished by the next reader (:func:`recover_model`).
    """
    path = os.path.abspath(os.path.join(workdir, MODEL))
    new, old = path + NEW, path + OLD
    if is_leader():
        recover_model(workdir)
        for leftover in (new, old):  # a kill before the swap: the old export is whole in model/
            shutil.rmtree(leftover, ignore_errors=True)
    _sync("before exporting the model")
    with ocp.StandardCheckpointer() as checkpointer:  # orbax renames its temporary directory when done
        checkpointer.save(new, variables, force=True)
    _sync("model exported")
    if is_leader():
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    _sync("model replaced")


def recover_model(workdir: str) -> None:
    """Finishes an export that a kill cut between its two renames (``model/`` moved to ``model.old``,
    the whole new one still in ``model.new``): moves the new one in. Nothing else changes."""
    path = os.path.abspath(os.path.join(workdir, MODEL))
    if not os.path.exists(path) and os.path.exists(path + NEW) and os.path.exists(path + OLD):
        try:
            os.rename(path + NEW, path)
        except FileNotFoundError:  # another process finished it
            return
        shutil.rmtree(path + OLD, ignore_errors=True)


def is_finished_run(workdir: str) -> bool:
    """Whether ``workdir`` holds a finished run's model: ``config.json`` and ``model/``."""
    recover_model(workdir)
    return all(os.path.exists(os.path.join(workdir, name)) for name in (CONFIG, MODEL))


def restore_model(workdir: str, model: Any, mesh: jax.sharding.Mesh | None, image_size: int,
                  channels: int, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The variables of the finished run in ``workdir`` (its ``model/``), for ``model`` (the module they
    belong to: :func:`alite_jax.methods.run_model` rebuilds it from the run's config), read outside
    ``jit`` and replicated on ``mesh`` (the run may have been trained on another number of devices), or
    placed with ``sharding`` when given. A ``model/`` that cannot be read as ``model``'s variables (empty,
    damaged, another model's) raises :class:`RunDirError`."""
    placement = sharding if sharding is not None else NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement),
                            abstract_variables(model, image_size, channels))
    recover_model(workdir)
    path = os.path.abspath(os.path.join(workdir, MODEL))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract)
    except Exception as e:  # an empty or damaged model/, or another model's
        raise RunDirError(f"{path} cannot be read as the model its config.json describes "
                          f"({_one_line(e)}); run that run again to export it (its checkpoints are "
                          f"kept), or point at another run") from None


def write_json(workdir: str, name: str, data: Any) -> None:
    """``workdir/<name>``: a method's file of plain data (process 0), atomically."""
    if is_leader():
        _write_atomically(os.path.join(workdir, name), json.dumps(data, indent=1) + "\n")


def read_summary(workdir: str) -> dict[str, Any] | None:
    """``workdir/summary.json`` (None when there is none), with an error naming the file if it is bad."""
    return _read_json(os.path.join(workdir, SUMMARY), f"run the trainer again in {workdir} to rewrite it")


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """``workdir/summary.json`` (process 0), atomically."""
    if is_leader():
        _write_atomically(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=2))
