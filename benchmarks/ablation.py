"""The paper's Table 2 in miniature: loss terms and pruning on the 30-epoch digits, over seeds.

Trains one ResNet-50 teacher (the demo's, ``configs/demo.py``), then for every seed the SA-ResNet26
student of the demo under each setting:

    dense CE (the baseline), dense KD, dense KD+AT, sparse CE, sparse KD, sparse KD+AT (irregular,
    d = 0.1), column KD+AT (d = 0.5), and sparse KD+AT and sparse CE with the paper's rule taken
    literally (no per-layer floor, regrown weights keep their momentum, full-rate rounds however short
    the epoch: what collapsed before).

"dense" is density 1.0 (no pruning); every other field is the demo student's. Each run is a normal run
directory under ``--workdir`` (a finished one is reused, an interrupted one resumes), and the table of
final test accuracies (mean, spread and every seed) is printed and written to ``ablation.md`` and
``ablation.json`` there.

Run: ``python benchmarks/ablation.py --workdir=runs/ablation`` (about 40 minutes on 2 CPU cores with
``--jobs=2``); ``--batch_size=256`` repeats it at a large batch (the teacher too), ``--lr_scale`` and
``--alpha`` change every phase's lr and the students' CE weight; ``--seeds``, ``--settings`` and
``--epochs`` narrow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import ml_collections  # noqa: E402

# name -> (label, mode, loss, density, structure, paper_rule)
SETTINGS = {
    "dense_ce": ("dense CE (baseline)", "baseline", "ce", 1.0, "irregular", False),
    "dense_kd": ("dense KD", "distill", "kd", 1.0, "irregular", False),
    "dense_kdat": ("dense KD+AT", "distill", "kd+at", 1.0, "irregular", False),
    "sparse_ce": ("sparse CE, d = 0.1", "distill", "ce", 0.1, "irregular", False),
    "sparse_kd": ("sparse KD, d = 0.1", "distill", "kd", 0.1, "irregular", False),
    "sparse_kdat": ("sparse KD+AT, d = 0.1", "distill", "kd+at", 0.1, "irregular", False),
    "column_kdat": ("column KD+AT, d = 0.5", "distill", "kd+at", 0.5, "column", False),
    "paper_rule_kdat": ("sparse KD+AT, d = 0.1, paper's rule (no floor, momentum kept)", "distill",
                        "kd+at", 0.1, "irregular", True),
    "paper_rule_ce": ("sparse CE, d = 0.1, paper's rule (no floor, momentum kept)", "distill", "ce",
                      0.1, "irregular", True),
}


def demo_phases(epochs: int, batch_size: int, lr_scale: float = 1.0,
                alpha: float | None = None) -> ml_collections.ConfigDict:
    """configs/demo.py's phases, with the epochs, batch size, lr multiplier and KD alpha of this run."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    phases = module.get_config().phases
    for phase in phases.values():
        phase.num_epochs = epochs
        phase.optimizer.decay_epochs = (epochs // 2, epochs * 3 // 4)
        phase.data.batch_size = phase.data.eval_batch_size = batch_size
        phase.optimizer.lr *= lr_scale
        if alpha is not None:
            phase.distill.alpha = alpha
    return phases


def setting_config(phases: ml_collections.ConfigDict, name: str, seed: int,
                   teacher_dir: str) -> ml_collections.ConfigDict:
    _, mode, loss, density, structure, paper_rule = SETTINGS[name]
    c = ml_collections.ConfigDict(phases.student.to_dict())
    c.mode = mode
    c.distill.loss = loss
    c.sparsity.density = density
    c.sparsity.structure = structure
    if paper_rule:
        c.sparsity.min_layer_fraction = 0.0
        c.sparsity.reset_regrown_momentum = False
        c.sparsity.full_rate_steps = 0
    c.teacher.workdir = teacher_dir if loss != "ce" else ""
    c.baseline_workdir = ""
    c.seed = c.data.seed = seed
    return c


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """One run in its own process; its console output goes to workdir/log.txt.

    A run whose loss turns NaN (the paper's rule can) counts as diverged: test accuracy NaN, and the
    trainer's message under "diverged".
    """
    summary = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary):
        from alite_jax import train

        os.makedirs(workdir, exist_ok=True)
        start = time.perf_counter()
        try:
            with open(os.path.join(workdir, "log.txt"), "a") as log, contextlib.redirect_stdout(log):
                train.train_and_evaluate(config, workdir)
        except FloatingPointError as e:
            print(f"{workdir}: diverged ({e})", flush=True)
            return dict(test_accuracy=float("nan"), diverged=str(e))
        print(f"{workdir}: {time.perf_counter() - start:.0f}s", flush=True)
    with open(summary) as f:
        return json.load(f)


def table(results: dict[str, dict[int, dict]], seeds: list[int], teacher: float) -> str:
    lines = [f"| setting | test accuracy (%), mean ± std over {len(seeds)} seeds | min - max | "
             + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name, per_seed in results.items():
        acc = [100 * per_seed[s]["test_accuracy"] for s in seeds]
        ok = [a for a in acc if math.isfinite(a)]
        cells = " | ".join(f"{a:.1f}" if math.isfinite(a) else "NaN (diverged)" for a in acc)
        if not ok:
            lines.append(f"| {SETTINGS[name][0]} | all diverged | | {cells} |")
            continue
        spread = statistics.stdev(ok) if len(ok) > 1 else 0.0
        note = f" ({len(acc) - len(ok)} of {len(acc)} diverged)" if len(ok) < len(acc) else ""
        lines.append(f"| {SETTINGS[name][0]} | {statistics.mean(ok):.1f} ± {spread:.1f}{note} | "
                     f"{min(ok):.1f} - {max(ok):.1f} | {cells} |")
    lines.append(f"| teacher (ResNet-50, seed 0) | {100 * teacher:.1f} | | " + " | " * (len(seeds) - 1) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: "
                        + ", ".join(SETTINGS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr_scale", type=float, default=1.0, help="multiplies every phase's lr")
    parser.add_argument("--alpha", type=float, default=None, help="the students' CE weight (demo: 0.1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.settings.split(",")
    for name in names:
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    start = time.perf_counter()
    phases = demo_phases(args.epochs, args.batch_size, args.lr_scale, args.alpha)
    teacher_dir = os.path.abspath(os.path.join(args.workdir, "teacher"))
    jobs = [(n, s, setting_config(phases, n, s, teacher_dir), os.path.join(args.workdir, n, f"seed{s}"))
            for n in names for s in seeds]
    context = multiprocessing.get_context("spawn")  # fresh JAX in every worker
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        teacher = pool.submit(run, phases.teacher, teacher_dir).result()
        futures = [pool.submit(run, config, workdir) for _, _, config, workdir in jobs]
        summaries = [f.result() for f in futures]
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    for (name, seed, _, _), summary in zip(jobs, summaries):
        results[name][seed] = summary
    text = table(results, seeds, teacher["test_accuracy"])
    header = (f"Digits, SA-ResNet26 width 0.25 (the demo's student), {args.epochs} epochs, batch "
              f"{args.batch_size}, lr x{args.lr_scale:g}, alpha {phases.student.distill.alpha:g}; final "
              f"test accuracy. `python benchmarks/ablation.py {' '.join(sys.argv[1:])}` (this invocation: "
              f"{time.perf_counter() - start:.0f}s; finished runs are reused).")
    print(header + "\n\n" + text)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(header + "\n\n" + text + "\n")
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump(dict(epochs=args.epochs, batch_size=args.batch_size, seeds=seeds,
                       teacher_test_accuracy=teacher["test_accuracy"],
                       results={n: {str(s): r[s]["test_accuracy"] for s in seeds}
                                for n, r in results.items()}), f, indent=2)  # NaN: diverged


if __name__ == "__main__":
    main()
