"""The trainer: teacher training, dense student baselines and sparse distillation (paper Algorithm 1).

One loop serves three ``config.mode``\\ s:

* ``"teacher"``: the CNN teacher with cross-entropy;
* ``"baseline"``: a dense student with cross-entropy;
* ``"distill"``: the student learns from a finished teacher run (``config.teacher.workdir``) with the
  loss of eq. 2 (``config.distill.loss``: "kd" or "kd+at") while ``alite_jax.sparsity`` prunes it to
  ``config.sparsity.density`` (1.0: dense distillation), with prune/regrow after every epoch but the last.

The step is ``jax.jit`` over a 1-D device mesh: the batch is sharded over ``"data"``, the state (params,
BatchNorm statistics, optimizer state with the masks, step) is replicated, and BatchNorm statistics are
global over the batch. The teacher runs in inference mode inside the step and is never saved.

A run directory holds ``config.json``, ``checkpoints/`` (orbax, every epoch and on SIGTERM/SIGINT),
``metrics.jsonl`` (one line per epoch), ``tensorboard/``, and at the end ``model/`` (the final params and
batch statistics, what a later distillation loads as its teacher), ``summary.json`` and the report
(``table1.md``, plots); :mod:`alite_jax.run_dir` reads and writes them and keeps their history safe.
Starting in an existing run directory resumes from its newest readable checkpoint. Everything the user
gave (config, data, teacher run, run directory) is checked before anything is written or compiled; what
is refused raises an :class:`alite_jax.errors.UserError`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from alite_jax import costs, data, distill, report, run_dir, sparsity
from alite_jax.config import check_ranges
from alite_jax.distributed import is_leader, say
from alite_jax.errors import ConfigError, DivergedError, MissingFileError, user_input
from alite_jax.models import (STUDENTS, abstract_variables, compute_dtype, count_params, create_model,
                              init_model)
from alite_jax.run_dir import export_model, write_run_config

MODES = ("teacher", "baseline", "distill")
State = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Building blocks from the config.
# --------------------------------------------------------------------------------------------------


def model_from_config(model_config: ml_collections.ConfigDict, num_classes: int, dtype: str = ""):
    """The Linen model a config's ``model`` section describes (``dtype`` overrides its compute dtype)."""
    options = {}
    if model_config.name in STUDENTS:  # the attention options apply to the students only
        options = {k: model_config[k] for k in ("variant", "num_heads", "kernel_size", "scaling",
                                                "rel_layout", "impl") if k in model_config}
    return create_model(model_config.name, num_classes, width=model_config.get("width", 1.0),
                        dtype=dtype or model_config.get("dtype", "float32"), **options)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """lr, multiplied by decay_factor at each epoch of decay_epochs (paper §4.1)."""
    opt = config.optimizer
    return optax.piecewise_constant_schedule(
        opt.lr, {int(e) * steps_per_epoch: opt.decay_factor for e in opt.decay_epochs})


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, PyTorch-style) weight decay; wrapped in sparse learning if pruned."""
    opt = config.optimizer
    inner = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=opt.momentum,
                                  nesterov=opt.get("nesterov", False)))
    if is_sparse(config):
        s = config.sparsity
        return sparsity.sparse_learning(
            inner, density=s.density, structure=s.structure, distribution=s.distribution,
            seed=config.seed, redistribution=s.redistribution, min_layer_fraction=s.min_layer_fraction,
            reset_regrown_momentum=s.reset_regrown_momentum)
    return inner


def is_sparse(config: ml_collections.ConfigDict) -> bool:
    return config.mode == "distill" and config.sparsity.density < 1.0


def loss_mode(config: ml_collections.ConfigDict) -> str:
    return config.distill.loss if config.mode == "distill" else "ce"


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """A distillation with a teacher term; ``distill.loss="ce"`` trains the (sparse) student alone."""
    return config.mode == "distill" and config.distill.loss != "ce"


# --------------------------------------------------------------------------------------------------
# Validation before anything is compiled or read.
# --------------------------------------------------------------------------------------------------


def teacher_paths(workdir: str) -> tuple[str, str]:
    return os.path.join(workdir, "config.json"), os.path.join(workdir, "model")


def check_fields(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Raises :class:`ConfigError` for settings that cannot run, reading no file but the data set's
    metadata; returns the number of classes. :func:`check_config` adds the teacher run's checks."""
    with user_input():
        if config.mode not in MODES:
            raise ConfigError(f"config.mode must be one of {MODES}, got {config.mode!r}")
        check_ranges(config)
        num_classes = data.num_classes_of(config.data.dataset, config.data.data_dir)
        model_from_config(config.model, num_classes)  # unknown model, dtype or options raise here
        if config.mode == "distill" and config.teacher.get("dtype", ""):
            compute_dtype(config.teacher.dtype)
        data.check_data_config(config.data, num_devices, jax.process_count())
        if config.mode == "distill":
            if config.distill.loss not in distill.MODES:
                raise ConfigError(f"config.distill.loss must be one of {distill.MODES} ('ce': sparse "
                                  f"training without a teacher), got {config.distill.loss!r}")
            make_optimizer(config, steps_per_epoch=1)  # bad sparsity options raise here
            s = config.sparsity
            sparsity.prune_rate_schedule(s.prune_rate, config.num_epochs, s.schedule, steps_per_epoch=1,
                                         full_rate_steps=s.full_rate_steps)
    if config.mode == "teacher" and config.model.name in STUDENTS:
        logging.warning("training a self-attention model as a teacher (mode='teacher')")
    return num_classes


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Raises a :class:`alite_jax.errors.UserError` (a ValueError or FileNotFoundError too) for a config
    that cannot run: a field outside its range, unknown names, a missing teacher run or one trained on
    other data. Returns the number of classes."""
    num_classes = check_fields(config, num_devices)
    if needs_teacher(config):
        config_path, model_path = teacher_paths(config.teacher.workdir)
        if not config.teacher.workdir or not os.path.exists(config_path) or not os.path.exists(model_path):
            raise MissingFileError(
                f"no finished teacher run at config.teacher.workdir={config.teacher.workdir!r} (it needs "
                f"config.json and model/). Train the teacher first, e.g. python -m alite_jax.main "
                f"--config=configs/teacher_cifar10.py --workdir=<dir>, and point teacher.workdir at it.")
        teacher = ml_collections.ConfigDict(run_dir.read_run_config(config.teacher.workdir))
        if teacher.data.dataset != config.data.dataset or teacher.num_classes != num_classes:
            raise ConfigError(f"the teacher at {config.teacher.workdir} was trained on "
                              f"{teacher.data.dataset} ({teacher.num_classes} classes), not on "
                              f"{config.data.dataset} ({num_classes} classes)")
        if teacher.data.image_size != config.data.image_size:
            raise ConfigError(f"the teacher at {config.teacher.workdir} takes {teacher.data.image_size}px "
                              f"images, the student {config.data.image_size}px")
    return num_classes


# --------------------------------------------------------------------------------------------------
# Steps.
# --------------------------------------------------------------------------------------------------


def metric_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What the training step reports per step: the loss terms of the mode, and accuracy."""
    return distill.loss_terms(loss_mode(config)) + ("accuracy",)


def create_train_state(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                       key: jax.Array, channels: int = 3) -> State:
    """The trainer's state, a plain tree: params (masked when pruned), batch_stats, opt_state (with the
    masks), step, and epoch_sums (the running sums of :func:`metric_names` over the current epoch)."""
    variables = init_model(model, key, config.data.image_size, channels)
    params = variables["params"]
    opt_state = tx.init(params)
    if is_sparse(config):
        params = sparsity.apply_masks(params, sparsity.get_masks(opt_state))
    return dict(params=params, batch_stats=variables["batch_stats"], opt_state=opt_state,
                step=jnp.zeros((), jnp.int32),
                epoch_sums={k: jnp.zeros((), jnp.float32) for k in metric_names(config)})


def make_train_step(model, teacher, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> Callable[[State, dict, Any], tuple[State, dict]]:
    """The jitted-to-be step: one SGD update, and the epoch's running metric sums in the state.

    ``state["epoch_sums"]`` restarts at each epoch's first step; being part of the checkpointed state, a
    run resumed mid-epoch reports the same epoch averages as one that never stopped.
    """
    mode = loss_mode(config)
    d = config.distill

    def train_step(state: State, batch: dict, teacher_variables: Any) -> tuple[State, dict]:
        images, labels = batch["image"], batch["label"]

        def loss_fn(params):
            (logits, features), updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, images, train=True,
                mutable=["batch_stats"])
            t_logits, t_features = None, None  # the "ce" mode needs no teacher
            if teacher is not None:
                t_logits, t_features = teacher.apply(teacher_variables, images, train=False)
            total, terms = distill.distillation_loss(
                logits, t_logits, labels, features, t_features, mode=mode, alpha=d.alpha, beta=d.beta,
                temperature=d.temperature)
            return total, (terms, logits, updates["batch_stats"])

        (_, (terms, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**terms, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        first = state["step"] % steps_per_epoch == 0
        sums = jax.tree.map(lambda s, m: jnp.where(first, m, s + m), state["epoch_sums"], metrics)
        return dict(params=params, batch_stats=batch_stats, opt_state=opt_state,
                    step=state["step"] + 1, epoch_sums=sums), metrics

    return train_step


def make_eval_step(model) -> Callable[[State, dict], dict]:
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
# Checkpoints.
# --------------------------------------------------------------------------------------------------


def load_teacher(workdir: str, mesh, dtype: str = "") -> tuple[Any, Any]:
    """(model, variables) of a finished teacher run, the variables replicated on the mesh.

    ``dtype`` ("float32" / "bfloat16") overrides the compute dtype the teacher was trained with.
    """
    _, model_path = teacher_paths(workdir)
    config = ml_collections.ConfigDict(run_dir.read_run_config(workdir))
    model = model_from_config(config.model, config.num_classes, dtype)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Target shardings for this mesh: the teacher may have been trained on another number of devices.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            abstract_variables(model, config.data.image_size, config.channels))
    with ocp.StandardCheckpointer() as checkpointer:
        return model, checkpointer.restore(os.path.abspath(model_path), abstract)


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


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------


def _checkpoint_and_stop(manager: ocp.CheckpointManager, step: int, state: State) -> dict[str, int]:
    """Saves ``state`` at ``step`` (if not saved yet) and reports the preemption."""
    if manager.latest_step() != step:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    print(f"preempted: checkpoint at step {step}; run again to resume", flush=True)
    return {"preempted_at_step": step}


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _diverged(what: str, manager: ocp.CheckpointManager) -> DivergedError:
    """The error for a NaN or infinite loss: where it happened, the last good checkpoint, what to do."""
    step = manager.latest_step()
    last = (f"The last good checkpoint is step {step} in {manager.directory}." if step is not None
            else "No checkpoint has been saved yet.")
    return DivergedError(f"the loss became {what}; stopped. {last} Lower config.optimizer.lr and start "
                         f"over (another --workdir, or --fresh), or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       fresh: bool = False) -> dict[str, Any]:
    """Trains and evaluates per ``config`` in ``workdir``, resuming from its newest readable checkpoint.

    Everything is checked before anything is written or compiled: the config, the data, the teacher
    run, and that ``workdir`` holds no other run (:func:`alite_jax.run_dir.check_same_run`). A workdir
    with history (checkpoints, metrics, results) is never started over from scratch, unless ``fresh``:
    then its contents are first moved aside to ``<workdir>.previous-<n>``.

    Returns the summary (also written to ``workdir/summary.json``), or ``{"preempted_at_step": step}``
    when a preemption notice stopped the run after checkpointing it.
    """
    mesh = data.make_mesh()
    num_classes = check_config(config, mesh.devices.size)
    if not fresh:
        run_dir.check_same_run(workdir, config)
    with user_input():  # data sets that cannot be read, splits too small for the batch
        pipe = data.create_input_pipeline(config.data, mesh)
    channels = pipe.train_shards[0].images.shape[-1]

    model = model_from_config(config.model, num_classes)
    tx = make_optimizer(config, pipe.steps_per_epoch)
    teacher, teacher_variables = None, None
    if needs_teacher(config):
        teacher, teacher_variables = load_teacher(config.teacher.workdir, mesh,
                                                  config.teacher.get("dtype", ""))

    def init_state(key):
        return create_train_state(model, tx, config, key, channels)

    if fresh:
        run_dir.set_aside_run(workdir)
    os.makedirs(workdir, exist_ok=True)
    replicated = NamedSharding(mesh, PartitionSpec())
    manager = run_dir.checkpoint_manager(workdir, config.checkpoint_max_to_keep)
    abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = run_dir.restore_checkpoint(manager, abstract)
    if state is None:
        run_dir.check_nothing_to_lose(workdir)
        state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(config.seed))
    step = int(state["step"])
    steps_per_epoch, num_epochs = pipe.steps_per_epoch, config.num_epochs
    total_steps = steps_per_epoch * num_epochs
    epoch, start_step = divmod(step, steps_per_epoch)

    # Keep the epochs the restored state has finished; later rows (written before a checkpoint that is
    # not there) are computed again, the same.
    history = [r for r in run_dir.read_metrics(workdir, warn=say) if r["epoch"] < epoch]
    missing = sorted(set(range(epoch)) - {r["epoch"] for r in history})
    if missing:
        say(f"WARNING: {os.path.join(workdir, run_dir.METRICS)} has no row for epochs {missing}, which the "
            f"checkpoint at step {step} has finished: the summary and plots will lack them")
    write_run_config(workdir, config, num_classes, channels)
    if jax.process_count() > 1:  # every process has read the file before process 0 rewrites it
        multihost_utils.sync_global_devices("alite_jax: metrics read")
    run_dir.write_metrics(workdir, history)
    if step:
        say(f"resuming {workdir} at step {step} (epoch {epoch}, step {start_step} of {steps_per_epoch})")

    # Fixed output shardings: the state stays replicated, so the second step does not recompile.
    train_step = jax.jit(make_train_step(model, teacher, tx, config, steps_per_epoch), donate_argnums=0,
                         out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(model), out_shardings=replicated)
    lr_schedule = learning_rate_schedule(config, steps_per_epoch)  # for the metrics
    prune_schedule = sparsity.prune_rate_schedule(
        config.sparsity.prune_rate, num_epochs, config.sparsity.schedule,
        steps_per_epoch=steps_per_epoch, full_rate_steps=config.sparsity.full_rate_steps)
    writer = None
    if is_leader():
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
    name = f"{config.model.name} ({config.mode})"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(f"{name}: {num_epochs} epochs x {steps_per_epoch} steps, batch {config.data.batch_size} on "
         f"{mesh.devices.size} device(s){processes}, {count_params(state['params']):,} params")

    with Preemption() as preemption:
        while epoch < num_epochs:
            epoch_start, timer_step, timer, stop = time.perf_counter(), None, None, False
            for batch in pipe.train_epoch(epoch, start_step):
                state, metrics = train_step(state, batch, teacher_variables)
                step += 1
                if timer is None:  # the first step compiles: time from after it
                    jax.block_until_ready(state["step"])
                    timer_step, timer = step, time.perf_counter()
                stop = preemption.should_stop(step)
                if step % config.log_every_steps == 0 or stop:
                    loss = float(metrics["total"])
                    if not np.isfinite(loss):
                        raise _diverged(f"{loss} at step {step} (epoch {epoch})", manager)
                    speed = "(compiling)"
                    if step > timer_step:
                        rate = (step - timer_step) / (time.perf_counter() - timer)
                        speed = (f"{rate:.2f} steps/s {rate * config.data.batch_size:.1f} images/s "
                                 f"ETA {_format_eta((total_steps - step) / rate)}")
                    say(f"epoch {epoch} step {step}/{total_steps} loss {loss:.4f} {speed}")
                if stop and step % steps_per_epoch:  # mid-epoch (at its end the epoch is finished first)
                    return _checkpoint_and_stop(manager, step, state)
            train = {f"train_{k}": float(v) / steps_per_epoch
                     for k, v in jax.device_get(state["epoch_sums"]).items()}
            if not np.isfinite(train["train_total"]):
                raise _diverged(f"{train['train_total']} in epoch {epoch}", manager)
            row = dict(epoch=epoch, step=step, lr=float(lr_schedule(step - 1)), **train)
            # The model this epoch trained, before the round changes its masks (the BatchNorm
            # statistics were gathered with these masks).
            row.update(evaluate(eval_step, state, pipe))
            if is_sparse(config) and epoch < num_epochs - 1:
                rate = prune_schedule(epoch)
                params, opt_state = sparsity.prune_and_regrow(state["params"], state["opt_state"], rate)
                state = dict(state, params=params, opt_state=opt_state)
                row["prune_rate"] = rate
            if is_sparse(config):
                masks = sparsity.get_masks(state["opt_state"])
                row.update(density=sparsity.global_density(masks),
                           per_layer_density=sparsity.layer_densities(masks))
            row.update(epoch_time_s=time.perf_counter() - epoch_start)
            history.append(row)
            run_dir.append_metrics(workdir, row)
            if is_leader():
                for k, v in row.items():
                    if isinstance(v, float):
                        writer.scalar(k, v, epoch)
                writer.flush()
            say(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                               if isinstance(v, float) and k != "lr"))
            manager.save(step, args=ocp.args.StandardSave(state))
            epoch, start_step = epoch + 1, 0
            if stop and epoch < num_epochs:  # the notice came at the epoch's last step
                return _checkpoint_and_stop(manager, step, state)
    manager.wait_until_finished()
    return finish(config, workdir, model, state, history, teacher, channels)


def finish(config, workdir, model, state, history, teacher, channels) -> dict[str, Any]:
    """Exports the model, writes summary.json and renders the report."""
    export_model(workdir, {"params": state["params"], "batch_stats": state["batch_stats"]})
    masks = sparsity.get_masks(state["opt_state"]) if is_sparse(config) else None
    size = config.data.image_size
    student_costs = costs.count_costs(model, size, channels, masks=masks)
    summary = dict(
        mode=config.mode, model=config.model.name,
        variant=config.model.get("variant") if config.model.name in STUDENTS else None,
        dataset=config.data.dataset, distill=loss_mode(config),
        structure=config.sparsity.structure if is_sparse(config) else "dense",
        density=student_costs["density"], test_accuracy=history[-1]["test_accuracy"],
        best_test_accuracy=max(r["test_accuracy"] for r in history), epochs=len(history),
        params_dense=student_costs["params"], params_nonzero=student_costs["params_nonzero"],
        flops_dense=student_costs["flops"], flops_sparse=student_costs["flops_sparse"],
        per_layer_density=sparsity.layer_densities(masks) if masks is not None else {})
    if teacher is not None:
        teacher_costs = costs.count_costs(teacher, size, channels)
        summary.update(costs.reductions(student_costs, teacher_costs),
                       teacher_params=teacher_costs["params"], teacher_flops=teacher_costs["flops"])
        teacher_summary = run_dir.read_summary(config.teacher.workdir)
        summary["teacher_test_accuracy"] = (teacher_summary or {}).get("test_accuracy")
    baseline = config.get("baseline_workdir")
    if baseline:
        summary["dense_student_test_accuracy"] = (run_dir.read_summary(baseline) or {}).get("test_accuracy")
    run_dir.write_summary(workdir, summary)
    if is_leader():
        print(report.render(workdir), flush=True)
    return summary
