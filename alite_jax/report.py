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
paper Figs. 2-3), when per-layer densities were logged, ``layer_density.png`` (each layer's density
over the epochs: where momentum moved the budget), and ``health.png`` (each layer's parameter norm and
each BatchNorm's largest running variance against epoch, from the ``param_norm`` and ``bn_var`` records
of :mod:`alite_jax.health`).

Which report a run gets is its method's (:attr:`alite_jax.methods.Method.report`, found from
``summary["mode"]``; an unregistered mode gets Table 1). SPViT's methods ask for SPViT's table instead
of Table 1 (ziplab/SPViT README style: top-1, params and GMACs of the found architecture next to the
dense DeiT's, the MACs reduction), written as ``spvit_table.md``, and besides ``accuracy.png``:

* ``spvit_architecture.png`` (:func:`architecture_figure`): per block the kept FFN width as a fraction of
  ``mlp_hidden``, coloured by the attention kept (skip / 1x1 / 3x3 / MSA), from the summary's
  ``arch_attention``, ``arch_ffn`` and ``mlp_hidden``;
* ``spvit_search.png`` (:func:`search_figure`, runs whose metrics rows carry ``arch_attention``: searches):
  each block's attention decision per epoch, and the architecture's and the soft (``train_gmacs``) G MACs
  against epoch with the target ``target_gflops`` (G MACs).

The summary fields an SPViT table needs are ``model``, ``test_accuracy``, ``arch_gmacs``, ``dense_gmacs``
and, for a fine-tune, ``arch_params`` and ``dense_params``; a missing one is a :class:`ReportFieldError`
naming it. :func:`render` leaves out a figure whose data is absent.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from alite_jax import run_dir
from alite_jax.errors import MissingFileError, UserError, exit_on_user_error, parse_flags_or_exit
from alite_jax.vit_costs import ATTENTION_TYPES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = ("student", "dataset", "distill", "pruning", "density", "accuracy (%)", "teacher acc. (%)",
           "dense student acc. (%)", "param. reduction", "FLOPs reduction")

REPORTS = ("table1", "spvit")  # what a method's ``report`` may name
SPVIT_COLUMNS = ("model", "dataset", "top-1 (%)", "dense top-1 (%)", "params (M)", "dense params (M)",
                 "GMACs", "dense GMACs", "MACs reduction", "distillation", "density")
# One colour per attention decision of an SPViT block (ATTENTION_TYPES order), in both SPViT figures.
ATTENTION_COLOURS = {"skip": "#bdbdbd", "1x1": "#4c72b0", "3x3": "#dd8452", "msa": "#55a868"}
ATTENTION_LABELS = {"skip": "skip", "1x1": "1x1 conv", "3x3": "3x3 conv", "msa": "MSA"}


class ReportFieldError(UserError, ValueError):
    """A summary or metrics row lacks a field (or holds a bad value) that a table or figure needs."""


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


def health_figure(metrics: list[dict[str, Any]], title: str):
    """Each layer's parameter norm (kernels) and each BatchNorm's largest running variance against epoch,
    log scale (:mod:`alite_jax.health`), as a Figure: a layer running away stands out by orders of
    magnitude."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [m for m in metrics if m.get("param_norm")]
    if not rows:
        raise ValueError("no epoch in these metrics has param_norm (runs before health records)")
    fig = Figure(figsize=(10, 4))
    epochs = [m["epoch"] for m in rows]
    panels = (("param_norm", "parameter norm (kernels)", lambda v: v, lambda n: n.endswith("kernel")),
              ("bn_var", "largest running variance", lambda v: max(v), lambda n: True))
    for i, (key, label, pick, keep) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        last = {}
        for name in [n for n in rows[-1].get(key, {}) if keep(n)]:
            values = [pick(m[key][name]) if name in m.get(key, {}) else float("nan") for m in rows]
            ax.plot(epochs, values, lw=0.8)
            last[name] = values[-1]
        for name in sorted(last, key=last.get)[-3:]:  # the largest three, named
            ax.annotate(name.removesuffix("/kernel"), (epochs[-1], last[name]), fontsize=6, ha="right",
                        va="bottom")
        ax.set(xlabel="epoch", ylabel=label, yscale="log", title=f"{title}: {label}" if i == 0 else label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def report_of(summary: Mapping[str, Any]) -> str:
    """The report the run's method asks for (one of :data:`REPORTS`): its registered class's ``report``,
    Table 1 for a mode that is not registered here."""
    from alite_jax.methods import METHODS

    method = METHODS.get(summary.get("mode", ""))
    kind = method.report if method is not None else "table1"
    if kind not in REPORTS:
        raise ReportFieldError(f"the method of mode {summary.get('mode')!r} asks for report {kind!r}, not "
                               f"one of {REPORTS}")
    return kind


def is_spvit(summary: Mapping[str, Any]) -> bool:
    """Whether ``summary``'s method reports with SPViT's table (a search or a fine-tune)."""
    return report_of(summary) == "spvit"


def table_file(summary: Mapping[str, Any]) -> str:
    """The name of the table :func:`render` writes: spvit_table.md for SPViT's report, else table1.md."""
    return "spvit_table.md" if is_spvit(summary) else "table1.md"


def _field(record: Mapping[str, Any], name: str, what: str = "the summary") -> Any:
    """``record[name]``, or a ReportFieldError naming the field when it is absent or null."""
    value = record.get(name)
    if value is None:
        mode = f" (mode {record['mode']!r})" if "mode" in record else ""
        raise ReportFieldError(f"{what}{mode} has no {name!r}: the SPViT report needs it (was the run "
                               f"written by an older trainer?)")
    return value


def _millions(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _gmacs(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def spvit_table_row(summary: Mapping[str, Any]) -> dict[str, str]:
    """SPViT's table row of a search or fine-tune run, as column -> text.

    Top-1 is the final ``test_accuracy``; a search run has no params of its own (the supernet's are not
    the architecture's), so "-" there. MACs reduction = dense GMACs / architecture GMACs.
    """
    if not is_spvit(summary):
        raise ReportFieldError(f"summary mode {summary.get('mode')!r} is not an SPViT run (its method "
                               f"reports with another table)")
    search = summary.get("structure") == "spvit_supernet"  # a search: the supernet, no params of its own
    arch, dense = float(_field(summary, "arch_gmacs")), float(_field(summary, "dense_gmacs"))
    if arch <= 0 or dense <= 0:
        raise ReportFieldError(f"summary has arch_gmacs={arch}, dense_gmacs={dense}: both must be > 0")
    params = None if search else _field(summary, "arch_params")
    dense_params = summary.get("dense_params") if search else _field(summary, "dense_params")
    density = summary.get("density")
    return dict(zip(SPVIT_COLUMNS, (
        f"SPViT-{_field(summary, 'model')}" + (" (search)" if search else ""),
        str(summary.get("dataset", "-")), _pct(_field(summary, "test_accuracy")),
        _pct(summary.get("dense_test_accuracy")), _millions(params), _millions(dense_params),
        _gmacs(arch), _gmacs(dense), _times(dense / arch), str(summary.get("distill") or "-"),
        "-" if density is None else f"{density:.3g}")))


def spvit_table_markdown(summary: Mapping[str, Any]) -> str:
    """SPViT's table (header and the run's row) as Markdown."""
    row = spvit_table_row(summary)
    return "\n".join(["| " + " | ".join(SPVIT_COLUMNS) + " |", "|" + "---|" * len(SPVIT_COLUMNS),
                      "| " + " | ".join(row[c] for c in SPVIT_COLUMNS) + " |"])


def _check_attention(kinds: Sequence[Any], where: str) -> None:
    bad = [k for k in kinds if k not in ATTENTION_TYPES]
    if bad:
        raise ReportFieldError(f"{where}: attention decision(s) {bad} not among {ATTENTION_TYPES}")


def _attention_legend(ax: Any) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=ATTENTION_COLOURS[k], label=ATTENTION_LABELS[k])
                       for k in ATTENTION_TYPES], title="attention", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it would hide bars or cells


def architecture_figure(summary: Mapping[str, Any], title: str) -> Figure:
    """The architecture an SPViT run found, as a Figure: one bar per block, its height the kept FFN width
    as a fraction of the dense ``mlp_hidden`` (1 drawn as a dashed line), its colour the attention kept
    (:data:`ATTENTION_COLOURS`), the block index on x.

    Shows at a glance where the search cut: which blocks lost their MSA and how thin their FFNs became.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    attention = list(_field(summary, "arch_attention"))
    ffn = [int(w) for w in _field(summary, "arch_ffn")]
    hidden = int(_field(summary, "mlp_hidden"))
    if len(attention) != len(ffn) or not ffn:
        raise ReportFieldError(f"summary has {len(attention)} arch_attention and {len(ffn)} arch_ffn "
                               f"entries: one of each per block (and at least one block) expected")
    if hidden <= 0 or any(not 0 <= w <= hidden for w in ffn):
        raise ReportFieldError(f"summary's arch_ffn {ffn} is not within [0, mlp_hidden={hidden}]")
    _check_attention(attention, "summary's arch_attention")
    fig = Figure(figsize=(max(6, 0.45 * len(ffn) + 3), 4))
    ax = fig.add_subplot()
    ax.bar(range(len(ffn)), [w / hidden for w in ffn], color=[ATTENTION_COLOURS[k] for k in attention],
           edgecolor="black", linewidth=0.5)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    for block, (kind, width) in enumerate(zip(attention, ffn)):  # also names a block whose FFN is gone
        ax.text(block, width / hidden + 0.02, ATTENTION_LABELS[kind], ha="center", va="bottom", fontsize=7)
    ax.set(xlabel="block", ylabel=f"FFN width kept (fraction of {hidden})", ylim=(0, 1.15), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    _attention_legend(ax)
    fig.tight_layout()
    return fig


def search_figure(metrics: Sequence[Mapping[str, Any]], title: str,
                  target_gmacs: float | None = None) -> Figure:
    """An SPViT search over the epochs, as a Figure with two axes: each block's attention decision per
    epoch (a blocks x epochs heatmap in :data:`ATTENTION_COLOURS`), and the thresholded architecture's
    (``arch_gmacs``) and the soft (``train_gmacs``) G MACs against epoch, with ``target_gmacs`` (the
    summary's ``target_gflops``) as a horizontal line.

    Only the metrics rows that carry ``arch_attention`` are drawn (a ReportFieldError when none does).
    """
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [m for m in metrics if m.get("arch_attention")]
    if not rows:
        raise ReportFieldError("no metrics row has 'arch_attention': is this an SPViT search run's "
                               "metrics.jsonl?")
    depth = len(rows[0]["arch_attention"])
    for m in rows:
        where = f"metrics row of epoch {m.get('epoch', '?')}"
        if len(m["arch_attention"]) != depth:
            raise ReportFieldError(f"{where} has {len(m['arch_attention'])} blocks in arch_attention, "
                                   f"the first row {depth}")
        _check_attention(m["arch_attention"], where)
    epochs = [int(_field(m, "epoch", "a metrics row")) for m in rows]
    codes = np.array([[ATTENTION_TYPES.index(m["arch_attention"][b]) for m in rows] for b in range(depth)])
    fig = Figure(figsize=(9, 6.5))
    heat, cost = fig.subplots(2, 1, sharex=True, height_ratios=(max(2, 0.25 * depth), 2))
    cmap = ListedColormap([ATTENTION_COLOURS[k] for k in ATTENTION_TYPES])
    norm = BoundaryNorm(np.arange(len(ATTENTION_TYPES) + 1) - 0.5, cmap.N)
    heat.imshow(codes, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                extent=(epochs[0] - 0.5, epochs[-1] + 0.5, depth - 0.5, -0.5))
    heat.set(ylabel="block", title=title)
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    _attention_legend(heat)
    for key, label in (("arch_gmacs", "architecture"), ("train_gmacs", "soft (train)")):
        if any(m.get(key) is not None for m in rows):
            cost.plot(epochs, [np.nan if m.get(key) is None else m[key] for m in rows], marker=".",
                      label=label)
    if target_gmacs is not None:
        cost.axhline(target_gmacs, color="black", linestyle="--", linewidth=0.8, label="target")
    cost.set(xlabel="epoch", ylabel="G MACs")
    cost.xaxis.set_major_locator(MaxNLocator(integer=True))
    cost.grid(alpha=0.3)
    if cost.get_legend_handles_labels()[0]:
        cost.legend(fontsize=8)
    fig.tight_layout()
    return fig


def render(workdir: str) -> str:
    """Writes the table (table1.md, or spvit_table.md for an SPViT run) and the plots into ``workdir``;
    returns the table as Markdown. A figure whose data the run did not log is left out."""
    summary, metrics = read_run(workdir)
    spvit = is_spvit(summary)
    table = spvit_table_markdown(summary) if spvit else table_markdown(summary)
    with open(os.path.join(workdir, table_file(summary)), "w") as f:
        f.write(table + "\n")
    title = spvit_table_row(summary)["model"] if spvit else table_row(summary)["student"]
    if metrics:
        accuracy_figure(metrics, f"{title}: accuracy").savefig(os.path.join(workdir, "accuracy.png"),
                                                               dpi=120)
        if any(m.get("per_layer_density") for m in metrics):
            layer_density_figure(metrics, f"{title}: per-layer density").savefig(
                os.path.join(workdir, "layer_density.png"), dpi=120)
        if any(m.get("param_norm") for m in metrics):
            health_figure(metrics, title).savefig(os.path.join(workdir, "health.png"), dpi=120)
    if spvit and all(summary.get(k) for k in ("arch_attention", "arch_ffn", "mlp_hidden")):
        architecture_figure(summary, f"{title}: architecture").savefig(
            os.path.join(workdir, "spvit_architecture.png"), dpi=120)
    if spvit and any(m.get("arch_attention") for m in metrics):
        search_figure(metrics, f"{title}: search", summary.get("target_gflops")).savefig(
            os.path.join(workdir, "spvit_search.png"), dpi=120)
    return table


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    with exit_on_user_error(filesystem=True):  # a missing or bad file, a directory it cannot write
        print(render(flags.FLAGS.workdir))
    summary = run_dir.read_summary(flags.FLAGS.workdir) or {}
    print(f"plots and {table_file(summary)} written to {flags.FLAGS.workdir}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run's directory (with summary.json, metrics.jsonl).")
    flags.mark_flag_as_required("workdir")
    app.run(main, flags_parser=parse_flags_or_exit)
