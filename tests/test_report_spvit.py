"""SPViT's report (modes spvit_search / spvit_finetune) rendered from hand-written fake run directories."""

import json

import pytest
from command_line import run_cli
from matplotlib.colors import to_rgba

from alite_jax import report
from alite_jax.errors import UserError

ATTENTION = ["1x1", "1x1", "msa", "3x3", "skip", "msa"]
FFN = [744, 758, 764, 384, 0, 145]


def _summary(mode: str) -> dict:
    summary = dict(mode=mode, model="deit_tiny", dataset="imagenet", test_accuracy=0.7016,
                   best_test_accuracy=0.7102, epochs=3, arch_attention=ATTENTION, arch_ffn=FFN,
                   mlp_hidden=768, arch_gmacs=1.037, dense_gmacs=1.251, target_gflops=1.0, lambda_=20.0)
    if mode == "spvit_finetune":
        summary.update(arch_params=4_876_543, dense_params=5_717_416, dense_test_accuracy=0.722,
                       distill="hard", density=1.0, params_nonzero=4_876_543)
    else:
        summary.update(distill="ce", structure="spvit_supernet")
    return summary


def _write(path, summary, metrics):
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return path


def _search_metrics():
    # block 2 goes msa -> 3x3 -> 1x1; the soft MACs fall towards the target
    plans = [["msa"] * 6, ["msa", "msa", "3x3", "msa", "msa", "msa"], ATTENTION]
    return [dict(epoch=e, test_accuracy=0.6 + 0.05 * e, train_accuracy=0.55 + 0.05 * e,
                 train_gmacs=1.25 - 0.1 * e, arch_gmacs=1.251 - 0.1 * e, arch_attention=plan, arch_ffn=FFN)
            for e, plan in enumerate(plans)]


def test_finetune_row_values():
    row = report.spvit_table_row(_summary("spvit_finetune"))
    assert row == {"model": "SPViT-deit_tiny", "dataset": "imagenet", "top-1 (%)": "70.16",
                   "dense top-1 (%)": "72.20", "params (M)": "4.88", "dense params (M)": "5.72",
                   "GMACs": "1.037", "dense GMACs": "1.251", "MACs reduction": "1.21x",
                   "distillation": "hard", "density": "1"}


def test_search_row_and_missing_fields():
    summary = _summary("spvit_search")
    row = report.spvit_table_row(summary)
    assert row["model"] == "SPViT-deit_tiny (search)"
    assert (row["params (M)"], row["dense params (M)"], row["dense top-1 (%)"]) == ("-", "-", "-")
    assert row["MACs reduction"] == "1.21x" and row["GMACs"] == "1.037"
    for field in ("arch_gmacs", "dense_gmacs", "model", "test_accuracy"):
        with pytest.raises(report.ReportFieldError, match=f"'{field}'"):
            report.spvit_table_row({k: v for k, v in summary.items() if k != field})
    with pytest.raises(report.ReportFieldError, match="'arch_params'"):
        report.spvit_table_row(dict(_summary("spvit_finetune"), arch_params=None))
    with pytest.raises(report.ReportFieldError, match="not an SPViT run"):
        report.spvit_table_row(dict(summary, mode="distill"))
    with pytest.raises(report.ReportFieldError, match="'mlp_hidden'"):
        report.architecture_figure({k: v for k, v in summary.items() if k != "mlp_hidden"}, "t")
    with pytest.raises(report.ReportFieldError, match="attention decision"):
        report.architecture_figure(dict(summary, arch_attention=["conv"] * 6), "t")
    with pytest.raises(report.ReportFieldError, match="arch_attention"):
        report.search_figure([dict(epoch=0, test_accuracy=0.5)], "t")


def test_architecture_figure_bars_and_colours():
    fig = report.architecture_figure(_summary("spvit_finetune"), "t")
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == pytest.approx([w / 768 for w in FFN])
    assert [round(b.get_x() + b.get_width() / 2) for b in bars] == list(range(6))
    assert [b.get_facecolor() for b in bars] == [to_rgba(report.ATTENTION_COLOURS[k]) for k in ATTENTION]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["skip", "1x1 conv", "3x3 conv", "MSA"]
    # each bar is also named, so a block whose FFN is gone (height 0) still shows its attention
    assert [t.get_text() for t in ax.texts] == ["1x1 conv", "1x1 conv", "MSA", "3x3 conv", "skip", "MSA"]


def test_search_figure_heatmap_and_costs():
    metrics = _search_metrics()
    fig = report.search_figure(metrics + [dict(epoch=3, test_accuracy=0.8)], "t", target_gmacs=1.0)
    heat, cost = fig.axes
    codes = heat.images[0].get_array()
    assert codes.shape == (6, 3)  # blocks x epochs; the row without arch_attention is left out
    assert [report.ATTENTION_TYPES[c] for c in codes[2]] == ["msa", "3x3", "msa"]
    assert [report.ATTENTION_TYPES[c] for c in codes[:, -1]] == ATTENTION
    image = heat.images[0]
    assert tuple(image.cmap(image.norm(1))) == to_rgba(report.ATTENTION_COLOURS["1x1"])
    lines = {line.get_label(): line for line in cost.get_lines()}
    assert set(lines) == {"architecture", "soft (train)", "target"}
    assert list(lines["soft (train)"].get_ydata()) == pytest.approx([1.25, 1.15, 1.05])
    assert list(lines["target"].get_ydata()) == [1.0, 1.0]


def test_render_search_run(tmp_path):
    run = _write(tmp_path, _summary("spvit_search"), _search_metrics())
    table = report.render(str(run))
    assert (run / "spvit_table.md").read_text().strip() == table
    assert table.splitlines()[0].startswith("| model | dataset | top-1 (%)")
    assert "| SPViT-deit_tiny (search) | imagenet | 70.16 |" in table and "1.21x" in table
    assert not (run / "table1.md").exists()
    for name in ("accuracy.png", "spvit_architecture.png", "spvit_search.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_render_finetune_skips_absent_figures_and_cli(tmp_path):
    summary = {k: v for k, v in _summary("spvit_finetune").items() if k != "arch_ffn"}
    run = _write(tmp_path, summary, [dict(epoch=0, test_accuracy=0.6)])
    table = report.render(str(run))
    assert "| SPViT-deit_tiny | imagenet | 70.16 | 72.20 | 4.88 | 5.72 |" in table
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".png") == ["accuracy.png"]
    result = run_cli("alite_jax.report", f"--workdir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SPViT-deit_tiny" in result.stdout and "spvit_table.md written" in result.stdout
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "dense_gmacs"}))
    with pytest.raises(UserError, match="'dense_gmacs'"):
        report.render(str(run))


def test_other_modes_keep_table1(tmp_path):
    """A non-SPViT run renders exactly the Table 1 it did before, and no SPViT file."""
    summary = dict(mode="distill", model="sa_resnet26", variant="hybrid", dataset="cifar10", distill="kd+at",
                   structure="irregular", density=0.1, test_accuracy=0.9374, teacher_test_accuracy=0.9534,
                   dense_student_test_accuracy=0.9277, param_reduction_vs_teacher=27.05,
                   flops_reduction_vs_teacher=1.91, arch_attention=ATTENTION, arch_ffn=FFN, mlp_hidden=768)
    run = _write(tmp_path, summary, [dict(epoch=0, test_accuracy=0.9, arch_attention=ATTENTION)])
    expected = ("| student | dataset | distill | pruning | density | accuracy (%) | teacher acc. (%) | "
                "dense student acc. (%) | param. reduction | FLOPs reduction |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n"
                "| sa_resnet26 hybrid | cifar10 | kd+at | irregular | 0.1 | 93.74 | 95.34 | 92.77 | 27.05x "
                "| 1.91x |")
    assert report.render(str(run)) == expected
    assert (run / "table1.md").read_text() == expected + "\n"
    assert sorted(p.name for p in run.iterdir()) == ["accuracy.png", "metrics.jsonl", "summary.json",
                                                     "table1.md"]
