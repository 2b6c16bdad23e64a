"""The trainer: one loop for every method, with checkpoints, resume, evaluation and preemption.

``config.mode`` picks the method (:mod:`alite_jax.methods`: its registry lists the modes). The loop knows
steps, evaluation, checkpoints and preemption, and no mode by name; the models, the loss, the optimizer,
the end-of-epoch round, the summary fields and the method's config fields are the method's.
Run-directory I/O is :mod:`alite_jax.run_dir`'s; console, jsonl and TensorBoard output is
:mod:`alite_jax.metric_writers`'.

The step is ``jax.jit`` over a 1-D device mesh: the batch is sharded over ``"data"``, the state (params,
BatchNorm statistics, optimizer state with the masks, step, the epoch's running metric sums) is a plain
replicated tree, and BatchNorm statistics are global over the batch. A method's frozen teacher runs in
inference mode inside the step.

Starting in an existing run directory resumes from its newest readable checkpoint. Everything the user
gave (config, data, teacher run, run directory) is checked before anything is written or compiled; what
is refused raises an :class:`alite_jax.errors.UserError`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from alite_jax import activity, batch_norm_stats, costs, data, health, report, run_dir
from alite_jax.config import check_ranges
from alite_jax.data import mixup
from alite_jax.distributed import is_leader, make_mesh, say
from alite_jax.errors import DivergedError, RunDirError, user_input
from alite_jax.methods import Method, State, class_fields, get_method, method_class, registered_may_change
from alite_jax.metric_writers import MetricWriter, Progress
from alite_jax.models import STUDENTS, check_model_image_size, count_params, init_model, model_from_config

GATES_STREAM = 1  # folded into the step's key for the method's rng streams (the mixing key is the step's)
RECOMPUTE_STREAM = 2  # folded into the epoch's key for the rng streams of BatchNorm's recomputation
PROBE_STREAM = 3  # folded into the epoch's key for the rng streams of the end-of-epoch probe


# --------------------------------------------------------------------------------------------------
# Validation before anything is compiled or read.
# --------------------------------------------------------------------------------------------------


def check_fields(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Raises :class:`ConfigError` for settings that cannot run, reading no file but the data set's
    metadata; returns the number of classes. :func:`check_config` adds the method's inputs (a teacher)."""
    with user_input():
        method_class(config.mode)  # a registered mode, or an error listing them
        check_ranges(config)
        num_classes = data.num_classes_of(config.data.dataset, config.data.data_dir)
        # unknown model, dtype or options raise here (a ViT: an image size it cannot take too)
        model = model_from_config(config.model, num_classes, image_size=config.data.image_size)
        check_model_image_size(model, config.data.image_size, config.data.image_size)
        data.check_data_config(config.data, num_devices, jax.process_count())
        get_method(config, num_classes).check()
    return num_classes


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Raises a :class:`alite_jax.errors.UserError` (a ValueError or FileNotFoundError too) for a config
    that cannot run: a field outside its range, unknown names, a missing teacher run or one trained on
    other data. Returns the number of classes."""
    num_classes = check_fields(config, num_devices)
    with user_input():
        get_method(config, num_classes).check_inputs()
    return num_classes


# --------------------------------------------------------------------------------------------------
# Steps.
# --------------------------------------------------------------------------------------------------


def create_train_state(method: Method, model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_size: int, channels: int = 3, inputs: Any = None) -> State:
    """The trainer's state, a plain tree: params (as the method prepares them from ``inputs``, its
    :meth:`~alite_jax.methods.Method.initial_inputs`: e.g. masked, or pretrained), batch_stats, opt_state,
    step, and epoch_sums (the running sums of the method's loss terms and the accuracy over the current
    epoch)."""
    variables = init_model(model, key, image_size, channels)
    opt_state = tx.init(variables["params"])
    return dict(params=method.prepare_params(variables["params"], opt_state, inputs),
                batch_stats=variables["batch_stats"], opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                epoch_sums={k: jnp.zeros((), jnp.float32) for k in method.loss_terms + ("accuracy",)})


def make_train_step(method: Method, model: nn.Module, teacher: nn.Module | None,
                    tx: optax.GradientTransformation, steps_per_epoch: int, mix: Mix | None = None,
                    seed: int = 0) -> Callable[[State, dict, Any], tuple[State, dict]]:
    """The jitted-to-be step: one update with the method's loss, and the epoch's running metric sums.

    ``mix`` (:func:`batch_mixing`), when given, mixes the batch and makes the targets soft first, with a
    key folded from ``seed`` and the step (deterministic, and the same after a resume); the teacher sees
    the mixed images too, and the accuracy is against the targets' argmax. The method's rng streams
    (:meth:`Method.apply_rngs`) get that key folded once more with :data:`GATES_STREAM`.
    ``state["epoch_sums"]`` restarts at each epoch's first step; being part of the checkpointed state, a
    run resumed mid-epoch reports the same epoch averages as one that never stopped.
    """

    def train_step(state: State, batch: dict, teacher_variables: Any) -> tuple[State, dict]:
        images, labels = batch["image"], batch["label"]
        if mix is not None:
            images, labels = mix(jax.random.fold_in(jax.random.key(seed), state["step"]), images, labels)

        # The method's random streams (e.g. SPViT's sampled gates): a key of their own per step, folded
        # from the seed and the step as the mixing key is; no rngs at all when the method asks none.
        rngs = method.apply_rngs(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state["step"]),
                                                    GATES_STREAM))
        extra = {"rngs": rngs} if rngs else {}

        def loss_fn(params):
            (logits, features), updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, images, train=True,
                mutable=["batch_stats"], **extra)
            teacher_out = None if teacher is None else teacher.apply(teacher_variables, images, train=False)
            total, terms = method.loss(params, logits, features, labels, teacher_out)
            # a model without batch statistics (a ViT) returns no "batch_stats" collection
            return total, (terms, logits, updates.get("batch_stats", {}))

        (_, (terms, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        hard = jnp.argmax(labels, -1) if labels.ndim == 2 else labels
        metrics = {**terms, "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard)}
        first = state["step"] % steps_per_epoch == 0
        sums = jax.tree.map(lambda s, m: jnp.where(first, m, s + m), state["epoch_sums"], metrics)
        return dict(params=params, batch_stats=batch_stats, opt_state=opt_state,
                    step=state["step"] + 1, epoch_sums=sums), metrics

    return train_step


Mix = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def batch_mixing(config: ml_collections.ConfigDict, num_classes: int) -> Mix | None:
    """``(key, images, labels) -> (images, soft targets)``: Mixup/CutMix and label smoothing as the data
    config asks (DeiT's recipe), or None when it asks for none (hard labels, unmixed images)."""
    d = config.data
    alphas, smoothing = (d.get("mixup_alpha", 0.0), d.get("cutmix_alpha", 0.0)), d.get("label_smoothing", 0.0)
    if not any(alphas):
        if not smoothing:
            return None
        return lambda key, images, labels: (images, mixup.smooth_one_hot(labels, num_classes, smoothing))
    return functools.partial(mixup.mix_batch, num_classes=num_classes, mixup_alpha=alphas[0],
                             cutmix_alpha=alphas[1], prob=d.mix_prob, switch_prob=d.mix_switch_prob,
                             label_smoothing=d.label_smoothing)


def make_eval_step(model: nn.Module) -> Callable[[State, dict], dict]:
    def eval_step(state: State, batch: dict) -> dict:
        logits, _ = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                                batch["image"], train=False)
        mask = batch["mask"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
        return dict(correct=jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & mask),
                    loss=jnp.sum(jnp.where(mask, nll, 0.0)), count=jnp.sum(mask))

    return eval_step


def evaluate(eval_step, state: State, pipe: data.InputPipeline) -> dict[str, float]:
    totals = None
    for batch in pipe.eval_batches():
        out = eval_step(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return dict(test_accuracy=float(totals["correct"]) / count, test_loss=float(totals["loss"]) / count)


# --------------------------------------------------------------------------------------------------
# Preemption and divergence.
# --------------------------------------------------------------------------------------------------


class Preemption:
    """Decides, the same way on every process, when to checkpoint and stop for a preemption notice.

    One process: SIGTERM and SIGINT set a flag. Several processes: a notice may reach one host only, and a
    process that stopped alone would leave the others waiting in the step's collectives, so the decision
    is JAX's preemption service's (started by ``jax.distributed.initialize``): it catches SIGTERM on any
    host and makes :meth:`should_stop` true on every process at the same step. No Python handler is
    installed then, since it would replace the service's.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._multiprocess = False

    def __enter__(self):
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        print(f"signal {signum}: checkpointing and stopping after this step", flush=True)

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after ``step``; call it after every step (all processes)."""
        if self._multiprocess:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_and_stop(manager: ocp.CheckpointManager, step: int, state: State, batches: Any,
                         config: ml_collections.ConfigDict) -> dict[str, int]:
    """Saves ``state`` and the data position at ``step`` (if not saved yet) and reports the preemption."""
    if manager.latest_step() != step:
        run_dir.save_checkpoint(manager, step, state, batches, force=True, config=config)
    run_dir.checkpoint_saved(manager)
    print(f"preempted: checkpoint at step {step}; run again to resume", flush=True)
    return {"preempted_at_step": step}


def _diverged(problem: str, manager: ocp.CheckpointManager) -> DivergedError:
    """The error for a NaN or infinite loss or model: what happened and where, the last good checkpoint,
    what to do."""
    step = manager.latest_step()
    last = (f"The last good checkpoint is step {step} in {manager.directory}." if step is not None
            else "No checkpoint has been saved yet.")
    return DivergedError(f"{problem}; stopped. {last} Lower config.optimizer.lr and start over (another "
                         f"--workdir, or --fresh), or check the data.")


def with_recomputed_batch_stats(recompute: Callable, state: State, pipe: data.InputPipeline, epoch: int,
                                batches: int, seed: int = 0) -> State:
    """``state`` with BatchNorm's statistics recomputed from the first ``batches`` training batches of
    ``epoch`` under its weights (:mod:`alite_jax.batch_norm_stats`; 0: unchanged). The batches are read
    apart from the training iterator, so training and its resumption are untouched; a method's random
    streams get a key of the seed and the epoch (the same after a resume)."""
    if not batches:
        return state
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), RECOMPUTE_STREAM)
    with contextlib.closing(pipe.train_epoch(epoch)) as epoch_batches:
        stats = recompute({"params": state["params"], "batch_stats": state["batch_stats"]},
                          itertools.islice(epoch_batches, batches), key)
    return dict(state, batch_stats=stats)


def epoch_probe(variance: Callable, pipe: data.InputPipeline, epoch: int,
                seed: int = 0) -> Callable[[State], Any]:
    """The ``probe`` a method's ``end_of_epoch`` gets: ``state -> variances`` of every Conv / Dense
    layer's output channels (:func:`alite_jax.activity.output_variance`, jitted as ``variance``) over
    the first training batch of ``epoch``, read when first called, apart from the training iterator (as
    :func:`with_recomputed_batch_stats` reads its batches)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), PROBE_STREAM)
    images: list[jax.Array] = []

    def probe(state: State) -> Any:
        if not images:
            with contextlib.closing(pipe.train_epoch(epoch)) as epoch_batches:
                images.append(next(iter(epoch_batches))["image"])
        return variance({"params": state["params"], "batch_stats": state["batch_stats"]}, images[0], key)

    return probe


def watch_health(run: Run, row: dict[str, Any], writer: MetricWriter) -> None:
    """Warns (one line a layer) about parameters or statistics that grew more than
    ``config.health_factor`` in the epoch; stops on a non-finite one, before its checkpoint is saved."""
    bad = health.nonfinite(row)
    if bad is not None:
        raise _diverged(f"{bad} became non-finite in epoch {row['epoch']}", run.manager)
    previous = run.history[-1] if run.history else None
    for line in health.check(previous, row, run.config.get("health_factor", 0.0)):
        writer.write_text(line)


# --------------------------------------------------------------------------------------------------
# Setting a run up, the loop, the end.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Programs:
    """A run's method, student and jitted functions (the optimizer inside them): everything its config
    decides before any weight is read. Built by :func:`run_programs`, which hands the same object to
    every later run of the same config in the process, so that a run started again there (the
    notebook's "run this cell again to resume", a resumed preemption, a sweep that repeats a setting)
    traces and compiles nothing anew: jax keeps each jitted function's traces and executables with the
    function object."""

    method: Method
    model: nn.Module
    init_state: Callable[[jax.Array, Any], State]  # (key, the method's initial inputs) -> replicated state
    train_step: Callable[[State, dict, Any], tuple[State, dict]]
    eval_step: Callable[[State, dict], dict]
    recompute: Callable[..., Any]
    variance: Callable[..., Any]


PROGRAMS_KEPT = 4  # the configs whose programs a process keeps (a notebook alternates teacher and student)
_programs: collections.OrderedDict[tuple, Programs] = collections.OrderedDict()


def named_files(config: ml_collections.ConfigDict) -> tuple[tuple[str, int, int], ...]:
    """(path, size, modification time) of each file the method's ``path_fields`` name (e.g. SPViT's found
    architecture): a run whose config is unchanged but whose file was edited gets programs of its own."""
    found = []
    for field in class_fields(method_class(config.mode), "path_fields"):
        section, _, name = field.rpartition(".")
        value = (config.get(section, {}) if section else config).get(name, "")
        if isinstance(value, str) and value and os.path.isfile(value):
            stat = os.stat(value)
            found.append((value, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def run_programs(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int, channels: int,
                 teacher: nn.Module | None, mesh: jax.sharding.Mesh) -> Programs:
    """The :class:`Programs` of a run, the same object for the same inputs: the whole config (as JSON;
    its mode names the method), the files it names (:func:`named_files`), the data's shape, the
    teacher's architecture and the mesh. The
    :data:`PROGRAMS_KEPT` most recently used are kept; what jax traced for them (for the shapes and
    shardings they were called with) goes with them, and a change of jax's own configuration (e.g. the
    matmul precision) jax checks itself at each call."""
    key = (json.dumps(config.to_dict(), sort_keys=True, default=repr), named_files(config), num_classes,
           steps_per_epoch, channels, teacher, mesh)
    if key in _programs:
        _programs.move_to_end(key)
        return _programs[key]
    method = get_method(config, num_classes)
    model, tx = method.student(), method.optimizer(steps_per_epoch)
    replicated = NamedSharding(mesh, PartitionSpec())

    def init_state(rng, inputs):
        return create_train_state(method, model, tx, rng, config.data.image_size, channels, inputs)

    step = make_train_step(method, model, teacher, tx, steps_per_epoch, batch_mixing(config, num_classes),
                           config.data.seed)
    programs = Programs(
        method=method, model=model, init_state=jax.jit(init_state, out_shardings=replicated),
        train_step=jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated)),  # no recompile
        eval_step=jax.jit(make_eval_step(model), out_shardings=replicated),
        recompute=batch_norm_stats.make_recompute(model, replicated, method.apply_rngs),
        variance=activity.make_output_variance(model, replicated, method.apply_rngs))
    _programs[key] = programs
    while len(_programs) > PROGRAMS_KEPT:
        _programs.popitem(last=False)
    return programs


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built and checked by :func:`setup`."""

    config: ml_collections.ConfigDict
    workdir: str
    teacher_variables: Any
    pipe: data.InputPipeline
    batches: Any  # the training iterator (grain), positioned at the state's step
    manager: ocp.CheckpointManager
    programs: Programs
    state: State
    history: list[dict[str, Any]]
    channels: int
    mesh: jax.sharding.Mesh

    @property
    def method(self) -> Method:
        return self.programs.method

    @property
    def model(self) -> nn.Module:
        return self.programs.model


def setup(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False) -> Run:
    """Checks everything, then builds the method, the data, the models and the state (restored from the
    newest readable checkpoint, or new), and writes config.json and the kept metrics history."""
    mesh = make_mesh()
    num_classes = check_config(config, mesh.devices.size)
    if not fresh:
        run_dir.check_same_run(workdir, config, registered_may_change())
    with user_input():  # data sets that cannot be read, splits too small for the batch
        pipe = data.create_input_pipeline(config.data, mesh)
    channels = pipe.channels
    teacher, teacher_variables = get_method(config, num_classes).teacher(mesh) or (None, None)
    programs = run_programs(config, num_classes, pipe.steps_per_epoch, channels, teacher, mesh)
    method = programs.method
    if fresh:
        run_dir.set_aside_run(workdir)
    os.makedirs(workdir, exist_ok=True)
    replicated = NamedSharding(mesh, PartitionSpec())
    manager = run_dir.checkpoint_manager(workdir, config.checkpoint_max_to_keep, pipe.steps_per_epoch)
    abstract = jax.eval_shape(programs.init_state, jax.random.key(config.seed), None)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    batches = pipe.train_iterator()
    state = run_dir.restore_checkpoint(manager, abstract, batches)
    if state is None:
        run_dir.check_nothing_to_lose(workdir)
        # what the method builds the state from (e.g. pretrained weights), read only for a new state and
        # passed as an argument: read and placed outside jit, not baked into the program as constants
        inputs = method.initial_inputs()
        state = programs.init_state(jax.random.key(config.seed), inputs)
    epoch = int(state["step"]) // pipe.steps_per_epoch
    missing = run_dir.epochs_without_rows(workdir, epoch)
    if missing:  # a cut metrics.jsonl: train those epochs again from a checkpoint before them, if any
        start = missing[0] * pipe.steps_per_epoch
        try:
            older = run_dir.restore_checkpoint(manager, abstract, batches, up_to=start)
        except RunDirError:  # none of them readable: go on from the newest (read again), without those rows
            older, state = None, run_dir.restore_checkpoint(manager, abstract, batches)
        if older is not None:
            dropped = run_dir.drop_checkpoints_after(manager, int(older["step"]))
            say(f"WARNING: {os.path.join(workdir, run_dir.METRICS)} has no row for epochs {missing}, which "
                f"the checkpoint at step {int(state['step'])} has finished: resuming from step "
                f"{int(older['step'])} to compute them again (the checkpoints at steps {dropped} are saved "
                f"again, the same)")
            state = older
            epoch = int(state["step"]) // pipe.steps_per_epoch
    history = run_dir.resume_metrics(workdir, epoch, int(state["step"]))
    run_dir.write_run_config(workdir, config, num_classes, channels, (pipe.mean, pipe.std))
    if jax.process_count() > 1:  # every process has read the file before process 0 rewrites it
        multihost_utils.sync_global_devices("alite_jax: metrics read")
    run_dir.write_metrics(workdir, history)
    return Run(config, workdir, teacher_variables, pipe, batches, manager, programs, state, history, channels,
               mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False,
                       preemption: Preemption | None = None) -> dict[str, Any]:
    """Trains and evaluates per ``config`` in ``workdir``, resuming from its newest readable checkpoint.

    Everything is checked before anything is written or compiled: the config, the data, the teacher
    run, that ``workdir`` holds no other run (:func:`alite_jax.run_dir.check_same_run`) and that no other
    run works in it now (:func:`alite_jax.run_dir.workdir_lock`, taken first). A workdir
    with history (checkpoints, metrics, results) is never started over from scratch, unless ``fresh``:
    then its contents are first moved aside to ``<workdir>.previous-<n>``.

    Returns the summary (also written to ``workdir/summary.json``), or ``{"preempted_at_step": step}``
    when a preemption notice stopped the run after checkpointing it, or before its first step (then
    nothing needed saving). ``preemption``: a :class:`Preemption` already entered by the caller (the
    CLI's, from its start), else one for this call.
    """
    with contextlib.ExitStack() as stack:
        if preemption is None:
            preemption = stack.enter_context(Preemption())
        stack.enter_context(run_dir.workdir_lock(workdir))
        run = setup(config, workdir, fresh)
        writer = MetricWriter(workdir)
        try:
            if preemption.requested:  # a notice during the set-up (reading data, the teacher, restoring)
                step = int(run.state["step"])
                say(f"preempted before step {step + 1}: nothing new to save; run again to go on")
                return {"preempted_at_step": step}
            return loop(run, writer, preemption)
        finally:
            writer.close()
            run.batches.close()
            run.manager.close()
            checkpoints = os.path.join(workdir, run_dir.CHECKPOINTS)
            if is_leader() and os.path.isdir(checkpoints) and not os.listdir(checkpoints):
                os.rmdir(checkpoints)  # a run stopped before its first checkpoint leaves no empty directory


def loop(run: Run, writer: MetricWriter, preemption: Preemption) -> dict[str, Any]:
    """The epochs: steps, evaluation, the method's end-of-epoch round, metrics, checkpoints; a notice
    ``preemption`` has caught checkpoints and stops them."""
    config, method, pipe, manager, state = run.config, run.method, run.pipe, run.manager, run.state
    steps_per_epoch, num_epochs = pipe.steps_per_epoch, config.num_epochs
    step = int(state["step"])
    epoch, start_step = divmod(step, steps_per_epoch)
    train_step, eval_step = run.programs.train_step, run.programs.eval_step
    recompute, variance = run.programs.recompute, run.programs.variance
    lr = method.learning_rate(steps_per_epoch)
    progress = Progress(steps_per_epoch * num_epochs, config.data.batch_size)
    if step:
        say(f"resuming {run.workdir} at step {step} (epoch {epoch}, step {start_step} of {steps_per_epoch})")
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"{config.model.name} ({config.mode}): {num_epochs} epochs x {steps_per_epoch} steps, batch "
        f"{config.data.batch_size} on {run.mesh.devices.size} device(s){processes}, "
        f"{count_params(state['params']):,} params")
    while epoch < num_epochs:
        timer, stop = time.perf_counter(), False
        for _ in range(start_step, steps_per_epoch):
            state, metrics = train_step(state, next(run.batches), run.teacher_variables)
            step += 1
            if progress.start_step is None:  # the first step compiles: time from after it
                jax.block_until_ready(state["step"])
                progress.started(step)
            stop = preemption.should_stop(step)
            if step % config.log_every_steps == 0 or stop:
                loss = float(metrics["total"])
                if not np.isfinite(loss):
                    raise _diverged(f"the loss became {loss} at step {step} (epoch {epoch})", manager)
                writer.write_text(f"epoch {epoch} step {step}/{progress.total_steps} loss {loss:.4f} "
                                  f"{progress.line(step)}")
            if stop and step % steps_per_epoch:  # mid-epoch (at its end the epoch is finished first)
                return _checkpoint_and_stop(manager, step, state, run.batches, config)
        train = {f"train_{k}": float(v) / steps_per_epoch
                 for k, v in jax.device_get(state["epoch_sums"]).items()}
        if not np.isfinite(train["train_total"]):
            raise _diverged(f"the loss became {train['train_total']} in epoch {epoch}", manager)
        # Evaluate the model this epoch trained, before the method's round changes it, with
        # BatchNorm statistics of its own weights (the running averages lag behind them).
        state = with_recomputed_batch_stats(recompute, state, pipe, epoch, config.get("bn_batches", 0),
                                            config.data.seed)
        row = dict(epoch=epoch, step=step, lr=float(lr(step - 1)), **train,
                   **evaluate(eval_step, state, pipe))
        state, fields = method.end_of_epoch(state, epoch, steps_per_epoch,
                                            epoch_probe(variance, pipe, epoch, config.data.seed))
        row.update(fields, **health.layer_health(state["params"], state["batch_stats"]),
                   epoch_time_s=time.perf_counter() - timer)
        watch_health(run, row, writer)
        run_dir.checkpoint_saved(manager)  # the last epoch's save worked before this epoch's row is kept
        run.history.append(row)
        writer.write_epoch(epoch, row)
        run_dir.save_checkpoint(manager, step, state, run.batches, config=config)
        epoch, start_step = epoch + 1, 0
        if stop and epoch < num_epochs:  # the notice came at the epoch's last step
            return _checkpoint_and_stop(manager, step, state, run.batches, config)
    run_dir.checkpoint_saved(manager)
    return finish(run, state)


def finish(run: Run, state: State) -> dict[str, Any]:
    """Exports the model, writes summary.json (the loop's fields and the method's) and the report."""
    config, workdir, history = run.config, run.workdir, run.history
    run_dir.export_model(workdir, {"params": state["params"], "batch_stats": state["batch_stats"]})
    for name, contents in run.method.run_files(state).items():
        run_dir.write_json(workdir, name, contents)
    size = config.data.image_size
    student_costs = costs.count_costs(run.model, size, run.channels, masks=run.method.masks(state))
    summary = dict(
        mode=config.mode, model=config.model.name,
        variant=config.model.get("variant") if config.model.name in STUDENTS else None,
        dataset=config.data.dataset, density=student_costs["density"],
        test_accuracy=history[-1]["test_accuracy"],
        best_test_accuracy=max(r["test_accuracy"] for r in history), epochs=len(history),
        params_dense=student_costs["params"], params_nonzero=student_costs["params_nonzero"],
        flops_dense=student_costs["flops"], flops_sparse=student_costs["flops_sparse"],
        **run.method.summary_fields(state, student_costs, size, run.channels))
    baseline = config.get("baseline_workdir")
    if baseline:
        summary["dense_student_test_accuracy"] = (run_dir.read_summary(baseline) or {}).get("test_accuracy")
    run_dir.write_summary(workdir, summary)
    if is_leader():
        print(report.render(workdir), flush=True)
    return summary
