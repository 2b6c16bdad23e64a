"""A method a user adds from their own module, with no edit to the package: registered here, it gets its
config section and range checks, runs, checkpoints, resumes, loads as a teacher, exports and reports."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tiny_runs import assert_same_model, epoch_rows, final_params, tiny_config

from alite_jax import main, methods, report, run_dir, train
from alite_jax.config import Range, base_config
from alite_jax.distributed import make_mesh
from alite_jax.errors import ConfigError, RunDirError
from alite_jax.export import formats, inference

pytestmark = pytest.mark.slow


class SmoothedCE(methods.Method):
    """Cross-entropy against smoothed labels, with a file of its own and an end-of-epoch field."""

    sections = {"toy": dict(smoothing=0.1, notes="")}
    field_ranges = {"toy.smoothing": Range(0, 1, high_open=True, meaning="the toy method's label smoothing")}
    path_fields = ("toy.notes",)
    may_change = ("toy.notes",)
    loss_terms = ("ce", "smoothed", "total")

    def loss(self, params, logits, features, labels, teacher_out):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.config.toy.smoothing)
        smoothed = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return smoothed, dict(ce=ce, smoothed=smoothed, total=smoothed)

    def end_of_epoch(self, state, epoch, steps_per_epoch, probe=None):
        return state, {"toy_epoch": epoch}

    def summary_fields(self, state, student_costs, image_size, channels):
        return dict(distill="toy", structure="dense", per_layer_density={},
                    smoothing=self.config.toy.smoothing)

    def run_files(self, state):
        return {"toy.json": {"smoothing": self.config.toy.smoothing}}


@pytest.fixture(scope="module", autouse=True)
def registered():
    methods.register_method("toy", SmoothedCE)
    yield
    methods.METHODS.pop("toy")


def toy_config(smoothing=0.1, notes=""):
    c = tiny_config("teacher", epochs=2)  # the tiny ResNet-50 on 8x8 digits, 4 steps an epoch
    c.mode = "toy"
    c.toy = ml_collections.ConfigDict(dict(smoothing=smoothing, notes=notes))
    return c


def test_the_section_and_its_range_come_from_the_method():
    assert dict(base_config().toy) == dict(smoothing=0.1, notes="")
    with pytest.raises(ConfigError, match=r"config.toy.smoothing must be in \[0, 1\).*label smoothing"):
        train.check_fields(toy_config(smoothing=1.5), 1)
    # in a phased config the method's path field is taken inside the workdir, as the trainer's own are
    phase = toy_config(notes="notes.txt")
    phase.baseline_workdir, phase.teacher.workdir = "/abs/baseline", "teacher"
    main.resolve_phase_paths(phase, "/runs/demo")
    assert (phase.toy.notes, phase.baseline_workdir) == ("/runs/demo/notes.txt", "/abs/baseline")
    assert phase.teacher.workdir == "teacher"  # another method's path field: not this method's


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """An uninterrupted run, and one stopped by a notice mid-epoch 1 and resumed."""
    root = tmp_path_factory.mktemp("toy")
    whole, resumed = str(root / "whole"), str(root / "resumed")
    summary = train.train_and_evaluate(toy_config(), whole)
    mp = pytest.MonkeyPatch()
    mp.setattr(train.Preemption, "should_stop", lambda self, step: step == 6)
    try:
        assert train.train_and_evaluate(toy_config(), resumed) == {"preempted_at_step": 6}
    finally:
        mp.undo()
    # where the notes are may change on resume (the method says so); its smoothing may not
    train.train_and_evaluate(toy_config(notes="elsewhere.txt"), resumed)
    return summary, whole, resumed


def test_runs_checkpoints_and_resumes_exactly(toy_run):
    summary, whole, resumed = toy_run
    assert summary["mode"] == "toy" and summary["smoothing"] == 0.1 and summary["epochs"] == 2
    rows = epoch_rows(whole)
    assert [r["toy_epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["train_smoothed"]) and r["train_smoothed"] != r["train_ce"] for r in rows)
    assert json.load(open(os.path.join(whole, "toy.json"))) == {"smoothing": 0.1}
    assert_same_model(whole, resumed)
    assert epoch_rows(resumed) == rows
    # the notice's checkpoint (step 6, mid-epoch 1) went once epoch 1's existed: only epochs' are kept
    kept = sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")))
    assert kept == [r["step"] for r in rows]
    with pytest.raises(RunDirError, match="toy.smoothing is 0.1 in its config.json, 0.2 now"):
        run_dir.check_same_run(whole, toy_config(smoothing=0.2),
                               methods.class_fields(SmoothedCE, "may_change"))


def test_loads_as_a_teacher_exports_and_reports(toy_run, tmp_path):
    _, whole, _ = toy_run
    model, variables = methods.load_run(whole, make_mesh())
    saved = final_params(whole)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    # a distillation accepts it as its teacher and runs it in its step
    student = tiny_config("distill", teacher=whole)
    methods.AttentionLite(student, 10).check_inputs()
    teacher_model, teacher_variables = methods.AttentionLite(student, 10).teacher(make_mesh())
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
    logits, _ = teacher_model.apply(teacher_variables, jnp.asarray(images), train=False)
    np.testing.assert_array_equal(logits, model.apply(variables, jnp.asarray(images), train=False)[0])
    # the export's function: the same model, the run's normalisation folded in
    fn, exported, meta = inference.inference_function(whole)
    assert meta["model"]["mode"] == "toy"
    config = ml_collections.ConfigDict(run_dir.read_run_config(whole))
    mean, std = inference.normalization_stats(config)
    expected, _ = model.apply(variables, (images - mean) / std, train=False)
    np.testing.assert_allclose(fn(exported, images), expected, rtol=1e-5, atol=1e-5)
    artifact = formats.export(fn, exported, meta, "stablehlo", str(tmp_path / "artifact"))
    assert os.path.getsize(artifact) > 0
    # the report: Table 1 (the method asks for the default report)
    assert report.report_of(run_dir.read_summary(whole)) == "table1"
    assert "| resnet50 | digits | toy |" in report.render(whole)
    assert os.path.exists(os.path.join(whole, "table1.md"))
