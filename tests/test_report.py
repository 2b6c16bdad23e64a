"""Reports rendered from a small fake run directory."""

import json
import re

import pytest
from command_line import run_cli

from alite_jax import report
from alite_jax.errors import RunDirError


@pytest.fixture
def run_dir(tmp_path):
    summary = dict(model="sa_resnet26", variant="hybrid", dataset="cifar10", distill="kd+at",
                   structure="irregular", density=0.1, test_accuracy=0.9374,
                   teacher_test_accuracy=0.9534, dense_student_test_accuracy=0.9277,
                   param_reduction_vs_teacher=27.05, flops_reduction_vs_teacher=1.91)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = [dict(epoch=e, test_accuracy=0.5 + 0.1 * e, train_accuracy=0.55 + 0.1 * e, density=0.1,
                  per_layer_density={"stem_conv/kernel": 0.1 + 0.02 * e, "head/kernel": 0.1 - 0.01 * e})
             for e in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def test_render_writes_table_and_plots(run_dir):
    table = report.render(str(run_dir))
    row = table.splitlines()[-1]
    for text in ("sa_resnet26 hybrid", "cifar10", "kd+at", "irregular", "93.74", "95.34", "92.77",
                 "27.05x", "1.91x"):
        assert text in row
    assert (run_dir / "table1.md").read_text().strip() == table
    for name in ("accuracy.png", "layer_density.png"):
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_cli_and_missing_run(run_dir, tmp_path_factory):
    result = run_cli("alite_jax.report", f"--workdir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "93.74" in result.stdout
    empty = str(tmp_path_factory.mktemp("empty"))
    with pytest.raises(FileNotFoundError, match="summary.json"):
        report.render(empty)
    result = run_cli("alite_jax.report", f"--workdir={empty}")  # a user error: one line, status 2
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "summary.json" in result.stderr, result.stderr


def test_figures_leave_the_backend_alone(run_dir):
    """The figures are built without pyplot: a notebook's inline backend stays as it was."""
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's backend (headless pytest would already be on Agg)
    try:
        summary, metrics = report.read_run(str(run_dir))
        fig = report.accuracy_figure(metrics, "t")
        assert [line.get_label() for line in fig.axes[0].get_lines()] == ["test", "train"]
        assert list(fig.axes[0].get_lines()[0].get_ydata()) == pytest.approx([50, 60, 70, 80])
        fig = report.layer_density_figure(metrics, "t")
        assert fig.axes[0].images[0].get_array().shape == (2, 4)  # layers x epochs
        report.render(str(run_dir))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    with pytest.raises(ValueError, match="per_layer_density"):
        report.layer_density_figure([dict(epoch=0, test_accuracy=0.5)], "dense run")


def test_partial_last_metrics_line_is_skipped_and_a_bad_line_names_the_file(run_dir, capsys):
    """A kill while a metrics line was written leaves half a line at the end: reported and skipped, the
    report renders (before: a JSONDecodeError). A bad line elsewhere is an error that names the file."""
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 4, "test_accu')
    summary, metrics = report.read_run(str(run_dir))
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    assert f"{path}: its last line is incomplete" in capsys.readouterr().out
    report.render(str(run_dir))
    path.write_text('{"epoch": 0, "test_accuracy": 0.5}\nnot json\n{"epoch": 2, "test_accuracy": 0.6}\n')
    with pytest.raises(RunDirError, match=re.escape(f"{path}, line 2, is not a JSON object")):
        report.read_run(str(run_dir))
