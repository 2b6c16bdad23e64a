"""The trainer end to end on tiny configs: teacher, sparse distillation, resume, devices, errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import ROOT, assert_same_model, epoch_rows, final_params, run_main, tiny_config, write_config

from alite_jax import data, run_dir, train
from alite_jax.distributed import make_mesh
from alite_jax.methods import get_method, learning_rate_schedule, needs_teacher, registered_may_change
from alite_jax.methods import sparse as sparse_method
from alite_jax.config import base_config
from alite_jax.errors import RunDirError
from alite_jax.models import abstract_variables, init_model, model_from_config

pytestmark = pytest.mark.slow  # end-to-end: deselected by the fast tier, -m "not slow"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.train_and_evaluate(tiny_config("teacher"), workdir)
    return workdir


def student_config(teacher_dir):
    """The config of :func:`student_run` (the resume tests run it again)."""
    return tiny_config("distill", epochs=3, teacher=teacher_dir, mix=True, bn_batches=2)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, teacher_dir):
    """An uninterrupted sparse-distillation run, in a subprocess like the interrupted ones, with
    Mixup/CutMix in the step and BatchNorm's statistics recomputed before each evaluation (so every
    resume test also checks that the mixing and the recomputation resume exactly: the recomputation reads
    its batches apart from the training iterator, and the statistics it leaves are in the checkpoint)."""
    base = tmp_path_factory.mktemp("student")
    config_path = write_config(base / "config.py", "distill", epochs=3, teacher=teacher_dir, mix=True,
                               bn_batches=2)
    workdir = str(base / "run")
    run_main(config_path, workdir)
    return config_path, workdir


def test_teacher_then_sparse_distillation_end_to_end(teacher_dir, student_run):
    _, workdir = student_run
    teacher_summary = json.load(open(os.path.join(teacher_dir, "summary.json")))
    teacher_rows = [json.loads(line) for line in open(os.path.join(teacher_dir, "metrics.jsonl"))]
    # The summary reports the last epoch's evaluation and the best one, from the metrics history.
    assert teacher_summary["mode"] == "teacher" and len(teacher_rows) == teacher_summary["epochs"]
    assert teacher_summary["test_accuracy"] == teacher_rows[-1]["test_accuracy"]
    assert teacher_summary["best_test_accuracy"] == max(r["test_accuracy"] for r in teacher_rows)
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for key in ("test_accuracy", "teacher_test_accuracy", "params_dense", "params_nonzero", "density",
                "param_reduction_vs_teacher", "flops_dense", "flops_sparse",
                "flops_reduction_vs_teacher", "per_layer_density"):
        assert key in summary, key
    assert summary["teacher_test_accuracy"] == teacher_summary["test_accuracy"]
    assert summary["density"] == pytest.approx(0.2, abs=1e-5)
    # SA-ResNet26 at width 0.25 has 531,402 params for RGB; digits are grayscale: 3*3*2*16 fewer.
    assert summary["params_dense"] == 531_402 - 288 and summary["flops_sparse"] < summary["flops_dense"]
    assert summary["param_reduction_vs_teacher"] == pytest.approx(
        summary["teacher_params"] / summary["params_nonzero"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("train_ce", "train_kd", "train_at", "train_total", "train_accuracy", "test_accuracy",
                "density", "per_layer_density"):
        assert key in rows[0], key
    assert "prune_rate" in rows[0] and "prune_rate" not in rows[-1]  # none after the last epoch
    # Linear decay to 0 from 0.5, scaled by 4 steps per epoch / full_rate_steps 20.
    assert rows[0]["prune_rate"] == pytest.approx(0.1) and rows[1]["prune_rate"] == pytest.approx(0.05)
    for name in ("table1.md", "accuracy.png", "layer_density.png", "config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()  # TensorBoard's own reader: one scalar per epoch of each metric
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    accuracy = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert accuracy == [(r["epoch"], pytest.approx(r["test_accuracy"])) for r in rows]
    # The export holds exactly the student's variables (no teacher inside), pruned to 20%.
    exported = final_params(workdir)
    config = tiny_config("distill", teacher=teacher_dir)
    student = model_from_config(config.model, 10)
    expected = abstract_variables(student, 8, channels=1)
    assert jax.tree.structure(exported) == jax.tree.structure(expected)
    assert jax.tree.map(np.shape, exported) == jax.tree.map(lambda x: x.shape, expected)
    params = exported["params"]
    kernels = [np.asarray(params[b]["conv1"]["kernel"]) for b in params if b.startswith("stage")]
    assert 0.02 < np.mean(np.concatenate([k.ravel() for k in kernels]) != 0) < 0.6


def test_preempted_then_killed_then_resumed_equals_uninterrupted(teacher_dir, student_run, tmp_path, capsys):
    """SIGTERM after the first step checkpoints where it lands (inside epoch 0 unless the notice is late)
    and exits cleanly; the run started again resumes there and is SIGKILLed once the next epoch-end
    checkpoint exists; started a third time (here in this process, as a notebook cell would) it finishes
    with exactly the uninterrupted run's parameters and metrics (the interrupted epoch's averages span
    the launches' steps, since the running sums are in the checkpoint)."""
    config_path, reference = student_run
    workdir = str(tmp_path / "interrupted")
    proc = run_main(config_path, workdir, wait=False)
    lines = []
    for line in proc.stdout:  # wait for the first step (4 steps per epoch, 12 in all)
        lines.append(line)
        if line.startswith("epoch 0 step 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    stopped = re.findall(r"^preempted: checkpoint at step (\d+);", rest, re.M)
    assert proc.returncode == 0 and len(stopped) == 1, "".join(lines) + rest
    assert "stopped by a preemption notice: run the same command again to resume" in rest, rest
    # The run goes on while this process reads the line and signals, so the notice lands a step or
    # more later on a loaded machine; whatever step it is, the rest must hold.
    step = int(stopped[0])
    assert 1 <= step < 8, f"the notice landed at step {step}, too late to test a resume before the end"

    proc = run_main(config_path, workdir, wait=False)
    epoch_end = os.path.join(workdir, "checkpoints", str((step // 4 + 1) * 4))  # the next epoch's end
    deadline = time.time() + 300
    while not os.path.isdir(epoch_end) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert f"resuming {workdir} at step {step} (epoch {step // 4}, step {step % 4} of 4)" in out, out[-3000:]
    assert os.path.isdir(epoch_end), "the run ended before the next epoch's end"
    assert not os.path.exists(os.path.join(workdir, "summary.json")), "killed after it finished"

    train.train_and_evaluate(student_config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert f"resuming {workdir} at step {(step // 4 + 1) * 4} " in out, out[-3000:]
    assert_same_model(reference, workdir)
    assert (json.load(open(os.path.join(workdir, "summary.json")))["test_accuracy"]
            == json.load(open(os.path.join(reference, "summary.json")))["test_accuracy"])
    assert epoch_rows(workdir) == epoch_rows(reference)


def test_preemption_on_an_epochs_last_step_finishes_the_epoch_first(teacher_dir, student_run, tmp_path,
                                                                     monkeypatch):
    """A notice at the last step of epoch 1 (step 8 of 4-step epochs): the epoch's prune/regrow,
    evaluation and metrics row come before the checkpoint, so resuming at step 8 skips none of them."""
    _, reference = student_run
    workdir = str(tmp_path / "stopped_at_epoch_end")
    config = student_config(teacher_dir)
    monkeypatch.setattr(train.Preemption, "should_stop", lambda self, step: step == 8)
    assert train.train_and_evaluate(config, workdir) == {"preempted_at_step": 8}
    rows = epoch_rows(workdir)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["prune_rate"] == pytest.approx(0.05)
    monkeypatch.undo()
    train.train_and_evaluate(config, workdir)
    assert_same_model(reference, workdir)
    assert epoch_rows(workdir) == epoch_rows(reference)
    # Started again in the same process, the run reused the first launch's programs: one trace of the
    # step for both launches (and none for a third run of the config).
    mesh = make_mesh()
    teacher = get_method(config, 10).teacher(mesh)[0]
    programs = train.run_programs(config, 10, 4, 1, teacher, mesh)
    assert programs.train_step._cache_size() == 1 and programs.eval_step._cache_size() == 1
    assert train.run_programs(student_config(teacher_dir), 10, 4, 1, teacher, mesh) is programs
    other = student_config(teacher_dir)
    other.optimizer.lr = 0.5
    assert train.run_programs(other, 10, 4, 1, teacher, mesh) is not programs


def test_each_epoch_is_evaluated_before_its_round_changes_the_masks(teacher_dir, student_run, tmp_path,
                                                                    monkeypatch):
    """A round that wipes every parameter leaves the epoch's metrics row untouched: the row evaluates the
    model the epoch trained (with the BatchNorm statistics its masks produced), not the round's result.
    The next epoch, trained from the wiped weights, shows that the round did run."""
    _, reference = student_run
    calls = []

    def wipe(params, state, rate):
        calls.append(rate)
        return jax.tree.map(jnp.zeros_like, params), state

    monkeypatch.setattr(sparse_method.sparsity, "prune_and_regrow", wipe)
    workdir = str(tmp_path / "wiped")
    train.train_and_evaluate(student_config(teacher_dir), workdir)
    rows, expected = epoch_rows(workdir), epoch_rows(reference)
    assert calls == [pytest.approx(0.1), pytest.approx(0.05)]
    for key in ("test_accuracy", "test_loss", "train_total", "prune_rate"):
        assert rows[0][key] == expected[0][key], key
    assert rows[1]["test_loss"] != expected[1]["test_loss"]


def unfinished_copy(reference, workdir):
    """A copy of a finished run as it was before its end: the checkpoints and metrics, no model or summary."""
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "model"))
    os.remove(os.path.join(workdir, "summary.json"))


def snapshot(workdir):
    """Every file of a directory tree with its bytes, and every directory: what 'nothing changed' compares."""
    files = {}
    for root, dirs, names in os.walk(workdir):
        for d in dirs:
            files[os.path.relpath(os.path.join(root, d), workdir)] = None
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                files[os.path.relpath(os.path.join(root, n), workdir)] = f.read()
    return files


def test_unreadable_checkpoints_and_a_partial_metrics_line_are_set_aside(teacher_dir, student_run, tmp_path,
                                                                         capsys):
    """Step 12 left empty (a kill in the first moments of a save) and step 8 full of garbage (a disk
    fault): each is reported and set aside as <step>.corrupt-1 (kept, not deleted), step 4 restores, steps
    8 and 12 are saved again. The last metrics line cut in half (a kill while writing it): reported and
    dropped, not a JSONDecodeError. The run ends as an uninterrupted one."""
    _, reference = student_run
    workdir = str(tmp_path / "run")
    unfinished_copy(reference, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    text = open(path).read()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    with open(path, "w") as f:
        f.write(text[:len(text) - len(last) // 2 - 1])
    checkpoints = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, "12"))
    os.mkdir(os.path.join(checkpoints, "12"))
    for root, _, files in os.walk(os.path.join(checkpoints, "8")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    damaged = {step: snapshot(os.path.join(checkpoints, step)) for step in ("8", "12")}
    train.train_and_evaluate(student_config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert f"{path}: its last line is incomplete" in out, out
    for step in (12, 8):
        assert f"checkpoint at step {step} in {checkpoints} is unreadable" in out, out
        assert f"set aside as {step}.corrupt-1" in out, out
    assert f"resuming {workdir} at step 4 " in out, out
    assert_same_model(reference, workdir)
    assert epoch_rows(workdir) == epoch_rows(reference)
    assert sorted(os.listdir(checkpoints)) == ["12", "12.corrupt-1", "4", "8", "8.corrupt-1"]
    for step in ("8", "12"):
        assert snapshot(os.path.join(checkpoints, f"{step}.corrupt-1")) == damaged[step]
    # Saved again, whole: a later run restores step 12 with nothing to report.
    manager = run_dir.checkpoint_manager(workdir, max_to_keep=3)
    assert run_dir.restore_checkpoint(manager, None)["step"] == 12
    assert "is unreadable" not in capsys.readouterr().out


def test_a_finished_run_whose_last_metrics_line_was_cut_trains_that_epoch_again(teacher_dir, student_run,
                                                                                tmp_path, capsys):
    """A finished run whose metrics.jsonl lost its last row (cut in half) is run again: the checkpoint of
    the epoch before it restores, the epoch is trained again and its row written, and summary.json
    describes the saved model, as the uninterrupted run's does (not epoch 1's accuracy beside epoch 2's
    model)."""
    _, reference = student_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    text = open(path).read()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    with open(path, "w") as f:
        f.write(text[:len(text) - len(last) // 2 - 1])
    summary = train.train_and_evaluate(student_config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert "has no row for epochs [2], which the checkpoint at step 12 has finished: resuming from step 8" \
        in out, out
    assert epoch_rows(workdir) == epoch_rows(reference)
    assert_same_model(workdir, reference)
    expected = json.load(open(os.path.join(reference, "summary.json")))
    assert summary == expected == json.load(open(os.path.join(workdir, "summary.json")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]


def test_rounds_inside_the_step_every_epochs_length_equal_the_rounds_after_each_epoch(teacher_dir,
                                                                                     student_run, tmp_path):
    """``sparsity.round_every`` = the steps of an epoch runs the same rounds at the same moments, inside
    the optimizer's update instead of after each epoch's evaluation (which reads the state and changes
    nothing of it): the same model, masks and densities."""
    _, reference = student_run
    config = student_config(teacher_dir)
    config.sparsity.round_every = 4  # 128 images, batch 32
    workdir = str(tmp_path / "rounds")
    train.train_and_evaluate(config, workdir)
    rows, expected = epoch_rows(workdir), epoch_rows(reference)
    assert [r["density"] for r in rows] == [r["density"] for r in expected]
    assert [r["per_layer_density"] for r in rows] == [r["per_layer_density"] for r in expected]
    assert not any("prune_rate" in r for r in rows)  # the rounds are the optimizer's now
    assert_same_model(workdir, reference)


def test_a_workdir_holding_another_run_is_refused_before_anything_is_written(teacher_dir, student_run,
                                                                              tmp_path):
    """Before, a homogeneous student started in a finished hybrid run's workdir read as corruption: it
    trained from scratch, overwrote config.json, emptied metrics.jsonl, and max_to_keep then discarded
    its own new checkpoints."""
    _, reference = student_run
    workdir = str(tmp_path / "finished")
    shutil.copytree(reference, workdir)
    before = snapshot(workdir)
    config = student_config(teacher_dir)
    config.model.variant = "homogeneous"
    with pytest.raises(RunDirError, match=r"holds another run: model\.variant is 'hybrid' in its "
                                          r"config\.json, 'homogeneous' now\..*another --workdir.*--fresh"):
        train.train_and_evaluate(config, workdir)
    config = student_config(teacher_dir)
    config.optimizer.momentum, config.num_epochs = 0.8, 5
    with pytest.raises(RunDirError,
                       match=r"num_epochs is 3 .*, 5 now; optimizer\.momentum is 0\.9 .*, 0\.8 now"):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    # config.json lost: the checkpoints carry the config they were trained with, and still check
    os.remove(os.path.join(workdir, "config.json"))
    before = snapshot(workdir)
    config = student_config(teacher_dir)
    config.optimizer.lr = 0.5
    with pytest.raises(RunDirError, match=r"holds another run: optimizer\.lr is 0\.05 in its checkpoint, "
                                          r"0\.5 now\. To resume it, run it with its own config \(its "
                                          r"checkpoint\)"):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    run_dir.check_same_run(workdir, student_config(teacher_dir), registered_may_change())


def test_history_is_not_started_over_unless_asked(teacher_dir, student_run, tmp_path):
    """No checkpoint of the run can be read: the trainer says so and changes nothing (before, it started
    from scratch and emptied metrics.jsonl). Asked to start fresh, it sets the old run aside, whole."""
    _, reference = student_run
    workdir = str(tmp_path / "run")
    unfinished_copy(reference, workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    before = snapshot(workdir)
    config = student_config(teacher_dir)
    with pytest.raises(RunDirError, match=r"none of its checkpoints \(steps 12, 8, 4\) can be read.*--fresh"):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    config.seed = 1  # fresh takes any config: here another run (another seed), compiled as the reference
    train.train_and_evaluate(config, workdir, fresh=True)
    assert snapshot(str(tmp_path / "run.previous-1")) == before
    assert [r["epoch"] for r in epoch_rows(workdir)] == [0, 1, 2]
    assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 1


def test_one_and_eight_devices_agree(tmp_path):
    """The same global batches on 1 and 8 devices give the same training step.

    The two differ only in the order of the sums over the batch (8 partial sums, then their all-reduce,
    against one sum): float32 rounding, which depends on the CPU's vector code (AMD and Intel differ), so
    no elementwise tolerance is safe where a sum cancels. What the property is about is the update the
    step made (parameters and BatchNorm statistics, from the same initial values). A reordered sum of n
    float32 terms moves by up to about n u (u = 2^-24) of the sum of their magnitudes; here n is up to 32
    images x 256 pixels, so n u is 5e-4, and a leaf whose gradient cancels (a BatchNorm bias) moves by
    that times its cancellation ratio: 2.6e-3 of its update's norm was measured, the whole update 1e-4.
    A data-parallel bug moves the whole update by tens of per cent or more: per-device BatchNorm
    statistics normalise with 4 images' mean and variance instead of 32's, gradients summed instead of
    averaged over devices are 8x, a wrong shard order trains on other images. So: the whole update within
    1e-2 of its norm, each leaf's within 1e-1 of its own. The accuracies (64 test images) may differ by
    one prediction whose top two logits tie within that rounding.
    """
    config_path = write_config(tmp_path / "baseline.py", "baseline", epochs=1)
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    flags = ["--config.data.train_split=train[:32]", "--config.data.image_size=16"]
    for devices, workdir in ((1, one), (8, eight)):
        script = textwrap.dedent(f"""
            import sys, jax
            jax.config.update("jax_num_cpu_devices", {devices})
            assert len(jax.devices()) == {devices}
            sys.argv = ["main", "--config={config_path}", "--workdir={workdir}", *{flags!r}]
            from absl import app
            from alite_jax import main
            app.run(main.main)
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"on {devices} device(s)" in result.stdout
    config = tiny_config("baseline", epochs=1)
    initial = init_model(model_from_config(config.model, 10), jax.random.key(config.seed), 16, 1)
    a, b = final_params(one), final_params(eight)
    assert jax.tree.structure(a) == jax.tree.structure(initial) == jax.tree.structure(b)
    squares = np.zeros(2)  # the whole update's: |difference|^2, |update|^2
    for (path, start), x, y in zip(jax.tree_util.tree_leaves_with_path(initial), jax.tree.leaves(a),
                                   jax.tree.leaves(b)):
        update_one, update_eight = np.asarray(x) - np.asarray(start), np.asarray(y) - np.asarray(start)
        diff, scale = np.linalg.norm(update_eight - update_one), np.linalg.norm(update_one)
        assert scale > 0, f"{jax.tree_util.keystr(path)} did not change: the comparison would be empty"
        assert diff <= 0.1 * scale, f"{jax.tree_util.keystr(path)}: the updates differ by {diff / scale:.2e}"
        squares += diff ** 2, scale ** 2
    whole = np.sqrt(squares[0] / squares[1])
    print(f"1 vs 8 devices: the whole update differs by {whole:.2e} of its norm")
    assert whole <= 1e-2, f"the 8-device update differs by {whole:.2e} of its norm"
    acc = [json.load(open(os.path.join(d, "summary.json")))["test_accuracy"] for d in (one, eight)]
    assert abs(acc[0] - acc[1]) <= 1 / 64 + 1e-9


def test_bad_configs_fail_before_compiling(teacher_dir, tmp_path):
    def case(mode, field, value, error, match, teacher=teacher_dir):
        c = tiny_config(mode, teacher=teacher) if mode == "distill" else tiny_config(mode)
        section, _, name = field.rpartition(".")
        setattr(c[section] if section else c, name, value)
        return c, error, match

    cases = [
        case("baseline", "model.name", "resnet18", ValueError, "unknown model"),
        case("baseline", "data.dataset", "cifar11", ValueError, "unknown data set"),
        case("distill", "sparsity.density", 0.0, ValueError, "density"),
        case("distill", "seed", 0, FileNotFoundError, "Train the teacher first", str(tmp_path / "none")),
        case("baseline", "mode", "finetune", ValueError, "config.mode"),
        case("baseline", "data.image_size", 12, ValueError, "multiples of 8"),
        case("distill", "distill.loss", "at", ValueError, "distill.loss"),
        case("distill", "sparsity.redistribution", "magnitude", ValueError, "redistribution"),
        case("distill", "sparsity.min_layer_fraction", -0.1, ValueError, "min_layer_fraction"),
        case("distill", "sparsity.schedule", "step", ValueError, "unknown kind"),
        case("distill", "sparsity.full_rate_steps", -1, ValueError, "full_rate_steps"),
    ]
    for config, error, match in cases:
        with pytest.raises(error, match=match):
            train.check_config(config, 1)
    # A teacher trained on another data set is refused.
    fake = tmp_path / "fake_teacher"
    shutil.copytree(teacher_dir, fake)
    meta = json.load(open(fake / "config.json"))
    meta["data"]["dataset"], meta["num_classes"] = "cifar100", 100
    json.dump(meta, open(fake / "config.json", "w"))
    with pytest.raises(ValueError, match="trained on cifar100"):
        train.check_config(tiny_config("distill", teacher=str(fake)), 1)
    # Sparse training with CE alone needs no teacher.
    c = tiny_config("distill", teacher=str(tmp_path / "none"))
    c.distill.loss = "ce"
    assert train.check_config(c, 1) == 10 and not needs_teacher(c)


@pytest.mark.parametrize("first_bad,match", [
    ((1, 2), r"at step 7 \(epoch 1\).*last good checkpoint is step 4 in "),
    ((0, 1), r"at step 2 \(epoch 0\); stopped\. No checkpoint has been saved yet\. Lower"),
])
def test_nan_loss_stops_with_a_clear_message(first_bad, match, tmp_path, monkeypatch):
    """Corrupt data (NaN pixels from a given epoch and step on) makes the loss NaN: the run stops at once and
    names the last good checkpoint, or says there is none yet (before: "step None"). The teacher's config,
    so its compiled step is reused."""
    def corrupt(self):
        first = first_bad[0] * self.steps_per_epoch + first_bad[1]
        nan = lambda i, batch: dict(batch, image=batch["image"] * np.nan) if i >= first else batch
        return self._iterator(self.train_data.map_with_index(nan))

    monkeypatch.setattr(data.InputPipeline, "train_iterator", corrupt)
    with pytest.raises(FloatingPointError, match=match):
        train.train_and_evaluate(tiny_config("teacher"), str(tmp_path / "nan"))


def test_programs_key_on_the_files_a_config_names(tmp_path):
    """An SPViT fine-tuning config names its found architecture's file: the same config with the file
    edited on disk (another architecture, same path) gets programs of its own."""
    config = base_config()
    config.mode = "spvit_finetune"
    path = tmp_path / "architecture.json"
    config.spvit.architecture = str(path)
    assert train.named_files(config) == ()  # no file yet: nothing to key on
    path.write_text('{"blocks": []}')
    first = train.named_files(config)
    assert [f[:2] for f in first] == [(str(path), 14)]
    path.write_text('{"blocks": [1, 2]}')
    assert train.named_files(config) != first
    config.mode = "distill"  # its path field is teacher.workdir, a directory: not a file to key on
    config.teacher.workdir = str(tmp_path)
    assert train.named_files(config) == ()


def test_config_files_load():
    import importlib.util

    for name in ("cifar10", "cifar100", "tiny_imagenet", "imagenet", "teacher_cifar10", "teacher_cifar100",
                 "teacher_tiny_imagenet", "teacher_imagenet", "demo"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        if name == "demo":
            assert tuple(config.phase_order) == ("teacher", "baseline", "student")
            continue
        assert config.mode == ("teacher" if name.startswith("teacher") else "distill")
        dataset = name.removeprefix("teacher_")
        assert config.data.dataset == ("imagenet2012" if dataset == "imagenet" else dataset)
        if dataset == "imagenet":
            assert (config.data.image_size, config.data.batch_size, config.num_epochs) == (224, 1024, 90)
            assert (config.model.layout, config.data.augment, config.data.normalization) == (
                "imagenet", "imagenet", "imagenet")
            assert config.optimizer.schedule == "cosine" and config.optimizer.warmup_epochs == 5
            # lr 0.1 x batch / 256, 5 warm-up epochs, cosine to 0 at the end.
            lr = learning_rate_schedule(config, 100)
            np.testing.assert_allclose([lr(0), lr(250), lr(500), lr(4750), lr(9000)],
                                       [0.0, 0.2, 0.4, 0.2, 0.0], atol=1e-6)
            train.check_fields(config, 8)  # no data read: the metadata of imagenet2012 only
        elif dataset == "tiny_imagenet":
            assert (config.data.image_size, config.data.batch_size, config.num_epochs) == (64, 32, 100)
            assert tuple(config.optimizer.decay_epochs) == (50, 75)
        else:
            assert tuple(config.optimizer.decay_epochs) == (120, 160, 180)
        if config.mode == "distill":
            assert config.model.name == "sa_resnet26" and config.distill.loss == "kd+at"
            assert config.sparsity.density == (0.25 if "imagenet" in dataset else 0.1)
        smoke = module.get_config("smoke")
        assert smoke.num_epochs == 2 and smoke.data.train_split.endswith("[:512]")
    assert base_config().distill.alpha == 0.1 and base_config().distill.beta == 1000.0
