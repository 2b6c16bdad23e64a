"""Reports of a run: the paper's Table 1 row and plots, rendered from the files in a run's workdir.

``python -m alite_jax.report --workdir=<dir>`` (the trainer calls :func:`render` at the end of a run).

A run directory holds:

* ``summary.json``: one object with at least ``test_accuracy`` and, where known, ``model``, ``variant``,
  ``dataset``, ``distill`` ("kd", "kd+at", ...), ``structure``, ``density``,
  ``teacher_test_accuracy``, ``dense_student_test_accuracy``, ``params_dense``, ``params_nonzero``,
  ``param_reduction_vs_teacher``, ``flops_dense``, ``flops_sparse``, ``flops_reduction_vs_teacher``;
* ``metrics.jsonl``: one object per epoch with ``epoch``, ``test_accuracy`` and optionally
  ``train_accuracy``, ``density`` and ``per_layer_density`` ({layer: density}). A last line cut short
  (a run killed while writing it) is reported and left out (:func:`alite_jax.run_dir.read_metrics`).

It writes ``table1.md`` (the Table 1 row), ``accuracy.png`` (test and train accuracy against epoch,
paper Figs. 2-3) and, when per-layer densities were logged, ``layer_density.png`` (each layer's density
over the epochs: where momentum moved the budget).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from alite_jax import run_dir
from alite_jax.errors import MissingFileError, UserError

COLUMNS = ("student", "dataset", "distill", "pruning", "density", "accuracy (%)", "teacher acc. (%)",
           "dense student acc. (%)", "param. reduction", "FLOPs reduction")


def read_run(workdir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-epoch metrics) of a run directory, with a clear error naming a missing or bad file."""
    summary = run_dir.read_summary(workdir)
    if summary is None:
        raise MissingFileError(f"{os.path.join(workdir, run_dir.SUMMARY)} not found: is {workdir} the "
                               f"workdir of a finished run?")
    return summary, run_dir.read_metrics(workdir)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table_row(summary: dict[str, Any]) -> dict[str, str]:
    """The Table 1 row of a run, as column -> text."""
    student = " ".join(str(s) for s in (summary.get("model"), summary.get("variant")) if s)
    return dict(zip(COLUMNS, (
        student or "-", str(summary.get("dataset", "-")), str(summary.get("distill", "-")),
        str(summary.get("structure", "-")),
        "-" if summary.get("density") is None else f"{summary['density']:.3g}",
        _pct(summary.get("test_accuracy")), _pct(summary.get("teacher_test_accuracy")),
        _pct(summary.get("dense_student_test_accuracy")),
        _times(summary.get("param_reduction_vs_teacher")),
        _times(summary.get("flops_reduction_vs_teacher")))))


def table_markdown(summary: dict[str, Any]) -> str:
    row = table_row(summary)
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
                      "| " + " | ".join(row[c] for c in COLUMNS) + " |"])


def accuracy_figure(metrics: list[dict[str, Any]], title: str):
    """Test and train accuracy against epoch (paper Figs. 2-3), as a matplotlib Figure.

    Built without pyplot, so it neither needs nor changes a backend: save it with ``fig.savefig`` or show
    it in a notebook with ``display(fig)``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    epochs = [m["epoch"] for m in metrics]
    for key, label in (("test_accuracy", "test"), ("train_accuracy", "train")):
        if any(key in m for m in metrics):
            ax.plot(epochs, [100 * m.get(key, float("nan")) for m in metrics], marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def layer_density_figure(metrics: list[dict[str, Any]], title: str):
    """Each pruned layer's density over the epochs (where momentum moved the budget), as a Figure."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [m for m in metrics if m.get("per_layer_density")]
    if not rows:
        raise ValueError("no epoch in these metrics has per_layer_density: was the run pruned?")
    layers = list(rows[0]["per_layer_density"])
    grid = np.array([[m["per_layer_density"].get(layer, np.nan) for m in rows] for layer in layers])
    fig = Figure(figsize=(8, max(3, 0.18 * len(layers) + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(rows[0]["epoch"] - 0.5, rows[-1]["epoch"] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), [layer.removesuffix("/kernel") for layer in layers], fontsize=6)
    ax.set(xlabel="epoch", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="density")
    fig.tight_layout()
    return fig


def render(workdir: str) -> str:
    """Writes table1.md and the plots into ``workdir``; returns the Table 1 row as Markdown."""
    summary, metrics = read_run(workdir)
    table = table_markdown(summary)
    with open(os.path.join(workdir, "table1.md"), "w") as f:
        f.write(table + "\n")
    title = table_row(summary)["student"]
    if metrics:
        accuracy_figure(metrics, f"{title}: accuracy").savefig(os.path.join(workdir, "accuracy.png"),
                                                               dpi=120)
        if any(m.get("per_layer_density") for m in metrics):
            layer_density_figure(metrics, f"{title}: per-layer density").savefig(
                os.path.join(workdir, "layer_density.png"), dpi=120)
    return table


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    try:
        print(render(flags.FLAGS.workdir))
    except UserError as e:  # a missing or bad file: one line, exit status 2 (as alite_jax.main)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"plots and table1.md written to {flags.FLAGS.workdir}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run's directory (with summary.json, metrics.jsonl).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
