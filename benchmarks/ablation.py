"""The paper's Table 2 in miniature: loss terms and pruning on the 30-epoch digits, over seeds.

Trains one ResNet-50 teacher (the demo's, ``configs/demo.py``), then for every seed the SA-ResNet26
student of the demo under each setting:

    dense CE (the baseline), dense KD, dense KD+AT, sparse CE, sparse KD, sparse KD+AT (irregular,
    d = 0.1), its variants (channels allowed to empty and the masked dense initialisation: the
    defaults before they changed; each of the two alone; ERK), column KD+AT (d = 0.5), and sparse KD+AT
    and sparse CE with the paper's rule taken literally (no floors, regrown weights keep their momentum,
    full-rate rounds however short the epoch: what collapsed before), and sparse KD+AT with its rounds
    inside the optimizer's update every 10, 20 or 40 steps instead of after each epoch.

"dense" is density 1.0 (no pruning); every other field is the demo student's. Each run is a normal run
directory under ``--workdir`` (a finished one is reused, an interrupted one resumes), and the table of
final test accuracies (mean, spread and every seed), with the scale of each run's weights (its worst
layer's max |w| over the dense baseline's of the same seed) and its peak BatchNorm running variance, is
printed and written to ``ablation.md`` and ``ablation.json`` (every layer's ratio) there.

Run: ``python benchmarks/ablation.py --workdir=runs/ablation`` (about 40 minutes on 2 CPU cores with
``--jobs=2``); ``--batch_size=256`` repeats it at a large batch (the teacher too), ``--lr_scale`` and
``--alpha`` change every phase's lr and the students' CE weight, ``--image_size`` the digits' side (8, their
own; 16 upsampled); ``--seeds``, ``--settings`` and ``--epochs`` narrow it.
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

# The paper's round taken literally: no per-layer floor, regrown weights keep their momentum, full-rate
# rounds however short the epoch, channels may empty, masked dense initialisation.
PAPER_RULE = dict(min_layer_fraction=0.0, reset_regrown_momentum=False, full_rate_steps=0,
                  keep_channels=False, fan_in_init=False, revive_dormant=False)
# name -> (label, mode, loss, density, structure, sparsity fields that differ from the defaults)
SETTINGS = {
    "dense_ce": ("dense CE (baseline)", "baseline", "ce", 1.0, "irregular", {}),
    "dense_kd": ("dense KD", "distill", "kd", 1.0, "irregular", {}),
    "dense_kdat": ("dense KD+AT", "distill", "kd+at", 1.0, "irregular", {}),
    "sparse_ce": ("sparse CE, d = 0.1", "distill", "ce", 0.1, "irregular", {}),
    "sparse_kd": ("sparse KD, d = 0.1", "distill", "kd", 0.1, "irregular", {}),
    "sparse_kdat": ("sparse KD+AT, d = 0.1", "distill", "kd+at", 0.1, "irregular", {}),
    "sparse_kdat_open": ("sparse KD+AT, d = 0.1, channels may empty, masked dense init", "distill",
                         "kd+at", 0.1, "irregular", dict(keep_channels=False, fan_in_init=False,
                                                         revive_dormant=False)),
    "sparse_kdat_norevive": ("sparse KD+AT, d = 0.1, regrown weights at zero in dormant channels too",
                             "distill", "kd+at", 0.1, "irregular", dict(revive_dormant=False)),
    "sparse_kdat_keep": ("sparse KD+AT, d = 0.1, no channel empties, masked dense init", "distill",
                         "kd+at", 0.1, "irregular", dict(fan_in_init=False)),
    "sparse_kdat_fanin": ("sparse KD+AT, d = 0.1, channels may empty, fan-in init", "distill", "kd+at",
                          0.1, "irregular", dict(keep_channels=False)),
    "sparse_kdat_erk": ("sparse KD+AT, d = 0.1, ERK", "distill", "kd+at", 0.1, "irregular",
                        dict(distribution="erk")),
    "column_kdat": ("column KD+AT, d = 0.5", "distill", "kd+at", 0.5, "column", {}),
    "paper_rule_kdat": ("sparse KD+AT, d = 0.1, paper's rule (no floors, momentum kept)", "distill",
                        "kd+at", 0.1, "irregular", PAPER_RULE),
    "paper_rule_ce": ("sparse CE, d = 0.1, paper's rule (no floors, momentum kept)", "distill", "ce",
                      0.1, "irregular", PAPER_RULE),
    # Rounds inside the optimizer's update every N steps instead of after each epoch (sparsity.round_every).
    **{f"sparse_kdat_every{n}": (f"sparse KD+AT, d = 0.1, a round every {n} steps", "distill", "kd+at", 0.1,
                                 "irregular", dict(round_every=n)) for n in (10, 20, 40)},
}


def demo_phases(epochs: int, batch_size: int, lr_scale: float = 1.0,
                alpha: float | None = None, image_size: int = 8) -> ml_collections.ConfigDict:
    """configs/demo.py's phases, with the epochs, batch size, lr multiplier, KD alpha and image size of
    this run."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    phases = module.get_config().phases
    for phase in phases.values():
        phase.num_epochs = epochs
        phase.optimizer.decay_epochs = (epochs // 2, epochs * 3 // 4)
        phase.data.batch_size = phase.data.eval_batch_size = batch_size
        phase.optimizer.lr *= lr_scale
        phase.data.image_size = image_size
        if alpha is not None:
            phase.distill.alpha = alpha
    return phases


def setting_config(phases: ml_collections.ConfigDict, name: str, seed: int,
                   teacher_dir: str) -> ml_collections.ConfigDict:
    _, mode, loss, density, structure, overrides = SETTINGS[name]
    c = ml_collections.ConfigDict(phases.student.to_dict())
    c.mode = mode
    c.distill.loss = loss
    c.sparsity.density = density
    c.sparsity.structure = structure
    c.sparsity.update(overrides)
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


def weight_scales(workdir: str) -> dict[str, float]:
    """max |w| of every kernel of a finished run's exported model ({layer: max |w|})."""
    import jax
    import numpy as np

    from alite_jax import methods
    from alite_jax.distributed import make_mesh
    from alite_jax.sparsity.masks import path_name

    _, variables = methods.load_run(workdir, make_mesh())
    return {path_name(p): float(np.max(np.abs(np.asarray(x))))
            for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
            if path_name(p).endswith("kernel")}


def peak_running_variance(workdir: str) -> float:
    """The largest BatchNorm running variance any epoch of the run recorded (metrics.jsonl's bn_var)."""
    from alite_jax import run_dir

    rows = run_dir.read_metrics(workdir, warn=lambda _: None)
    return max((v[1] for r in rows for v in r.get("bn_var", {}).values()), default=float("nan"))


def scale_columns(workdirs: dict[str, dict[int, str]], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Per setting and seed: the worst layer's max |w| over the dense baseline's (same seed) and which
    layer, and the peak running variance; empty where a run or the baseline is missing."""
    out: dict[str, dict[int, dict]] = {name: {} for name in workdirs}
    base = {s: workdirs.get("dense_ce", {}).get(s) for s in seeds}
    for name, per_seed in workdirs.items():
        for s, wd in per_seed.items():
            if not os.path.exists(os.path.join(wd, "model")) or not base[s] or not os.path.exists(
                    os.path.join(base[s], "model")):
                continue
            mine, dense = weight_scales(wd), weight_scales(base[s])
            ratios = {k: mine[k] / dense[k] for k in mine if dense.get(k)}
            worst = max(ratios, key=ratios.get)
            out[name][s] = dict(worst_layer=worst, worst_ratio=ratios[worst], ratios=ratios,
                                peak_var=peak_running_variance(wd))
    return out


def table(results: dict[str, dict[int, dict]], seeds: list[int], teacher: float,
          scales: dict[str, dict[int, dict]] | None = None) -> str:
    scales = scales or {}
    lines = [f"| setting | test accuracy (%), mean ± std over {len(seeds)} seeds | min - max | "
             + " | ".join(f"seed {s}" for s in seeds) + " | max \\|w\\| / dense, worst layer (seeds) | "
             "peak running var |",
             "|---|---|---|" + "---|" * len(seeds) + "---|---|"]
    for name, per_seed in results.items():
        acc = [100 * per_seed[s]["test_accuracy"] for s in seeds]
        ok = [a for a in acc if math.isfinite(a)]
        cells = " | ".join(f"{a:.1f}" if math.isfinite(a) else "NaN (diverged)" for a in acc)
        scale = [scales.get(name, {}).get(s) for s in seeds]
        scale = [x for x in scale if x]
        cells += " | " + (", ".join(f"{x['worst_ratio']:.3g} ({x['worst_layer'].removesuffix('/kernel')})"
                                    for x in scale) or "-")
        cells += " | " + (", ".join(f"{x['peak_var']:.3g}" for x in scale) or "-")
        if not ok:
            lines.append(f"| {SETTINGS[name][0]} | all diverged | | {cells} |")
            continue
        spread = statistics.stdev(ok) if len(ok) > 1 else 0.0
        note = f" ({len(acc) - len(ok)} of {len(acc)} diverged)" if len(ok) < len(acc) else ""
        lines.append(f"| {SETTINGS[name][0]} | {statistics.mean(ok):.1f} ± {spread:.1f}{note} | "
                     f"{min(ok):.1f} - {max(ok):.1f} | {cells} |")
    lines.append(f"| teacher (ResNet-50, seed 0) | {100 * teacher:.1f} | | " + " | " * (len(seeds) + 1) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: "
                        + ", ".join(SETTINGS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=8, help="the digits' side (8: their own)")
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
    phases = demo_phases(args.epochs, args.batch_size, args.lr_scale, args.alpha, args.image_size)
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
    workdirs: dict[str, dict[int, str]] = {n: {} for n in names}
    for name, seed, _, workdir in jobs:
        workdirs[name][seed] = workdir
    scales = scale_columns(workdirs, seeds)
    text = table(results, seeds, teacher["test_accuracy"], scales)
    header = (f"Digits at {args.image_size}x{args.image_size}, SA-ResNet26 width 0.25 (the demo's student), "
              f"{args.epochs} epochs, batch "
              f"{args.batch_size}, lr x{args.lr_scale:g}, alpha {phases.student.distill.alpha:g}; final "
              f"test accuracy. `python benchmarks/ablation.py {' '.join(sys.argv[1:])}` (this invocation: "
              f"{time.perf_counter() - start:.0f}s; finished runs are reused).")
    print(header + "\n\n" + text)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(header + "\n\n" + text + "\n")
    with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump(dict(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                       seeds=seeds, teacher_test_accuracy=teacher["test_accuracy"],
                       results={n: {str(s): r[s]["test_accuracy"] for s in seeds}
                                for n, r in results.items()},
                       scales={n: {str(s): x for s, x in per.items()} for n, per in scales.items()}),
                  f, indent=2)  # NaN: diverged


if __name__ == "__main__":
    main()
