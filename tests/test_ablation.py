"""benchmarks/ablation.py builds a valid trainer config for every setting and tabulates diverged runs."""

import importlib.util
import math
import os

import pytest

from alite_jax import methods, run_dir, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ablation():
    path = os.path.join(ROOT, "benchmarks", "ablation.py")
    spec = importlib.util.spec_from_file_location("ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_a_valid_config(ablation, tmp_path):
    phases = ablation.demo_phases(epochs=30, batch_size=256, lr_scale=2.0, alpha=0.5, image_size=16)
    assert phases.teacher.data.image_size == phases.student.data.image_size == 16
    assert phases.teacher.data.batch_size == 256 and phases.student.optimizer.lr == pytest.approx(0.1)
    assert phases.teacher.optimizer.lr == pytest.approx(0.04) and phases.student.distill.alpha == 0.5
    teacher = tmp_path / "teacher"
    os.makedirs(teacher / "model")
    run_dir.write_run_config(str(teacher), phases.teacher, num_classes=10, channels=1)
    for name, (_, mode, loss, density, structure, overrides) in ablation.SETTINGS.items():
        c = ablation.setting_config(phases, name, seed=2, teacher_dir=str(teacher))
        assert train.check_config(c, 1) == 10, name
        assert (c.mode, c.distill.loss, c.sparsity.density, c.sparsity.structure) == (
            mode, loss, density, structure)
        assert c.seed == c.data.seed == 2 and c.num_epochs == 30
        assert methods.needs_teacher(c) == (loss != "ce" and mode == "distill"), name
        assert methods.is_sparse(c) == (density < 1.0), name
        s = c.sparsity
        literal = (s.min_layer_fraction, s.reset_regrown_momentum, s.full_rate_steps, s.keep_channels,
                   s.fan_in_init)
        paper = overrides is ablation.PAPER_RULE
        assert literal == ((0.0, False, 0, False, False) if paper else
                           (0.25, True, 20, overrides.get("keep_channels", True),
                            overrides.get("fan_in_init", True))), name
        assert s.distribution == overrides.get("distribution", "uniform"), name


def test_table_reports_diverged_runs(ablation):
    results = {"sparse_kdat": {0: {"test_accuracy": 0.9}, 1: {"test_accuracy": 0.8}},
               "paper_rule_kdat": {0: {"test_accuracy": math.nan}, 1: {"test_accuracy": 0.2}},
               "paper_rule_ce": {0: {"test_accuracy": math.nan}, 1: {"test_accuracy": math.nan}}}
    lines = ablation.table(results, [0, 1], teacher=0.95).splitlines()
    assert lines[2] == "| sparse KD+AT, d = 0.1 | 85.0 ± 7.1 | 80.0 - 90.0 | 90.0 | 80.0 | - | - |"
    assert "20.0 ± 0.0 (1 of 2 diverged)" in lines[3] and "NaN (diverged) | 20.0 |" in lines[3]
    assert "all diverged" in lines[4]
    assert lines[5].startswith("| teacher (ResNet-50, seed 0) | 95.0 |")
