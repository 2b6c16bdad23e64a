"""What recomputing BatchNorm's statistics before each evaluation costs (``config.bn_batches``).

Runs the demo's dense SA-ResNet26 baseline (configs/demo.py, CE) twice on the digits, side by side in
this process: with ``bn_batches=0`` (the running averages) and with the default (8 batches), and prints
each epoch's time (training steps, evaluation and the recomputation; epoch 0 includes the compiles)
and their ratio. The runs' accuracies are printed too: the recomputation changes only what the
evaluation sees.

    python benchmarks/batch_norm_stats.py --workdir=<dir> --epochs=4 --image_size=16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablation import demo_phases  # noqa: E402

from alite_jax import run_dir, train  # noqa: E402
from alite_jax.config import base_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=8)
    args = parser.parse_args()
    rows = {}
    for batches in (0, base_config().bn_batches):
        config = demo_phases(args.epochs, args.batch_size, image_size=args.image_size).baseline
        config.bn_batches = batches
        workdir = os.path.join(args.workdir, f"bn_batches_{batches}")
        train.train_and_evaluate(config, workdir)
        rows[batches] = run_dir.read_metrics(workdir)
    off, on = (rows[b] for b in sorted(rows))
    steps = off[0]["step"]
    print(f"\nSA-ResNet26 (demo baseline) on the digits at {args.image_size}x{args.image_size}, batch "
          f"{args.batch_size}, {steps} steps an epoch; bn_batches 0 against {max(rows)}")
    print("| epoch | bn_batches=0 (s) | recomputed (s) | ratio | test acc. 0 / recomputed (%) |")
    print("|---|---|---|---|---|")
    for a, b in zip(off, on):
        print(f"| {a['epoch']} | {a['epoch_time_s']:.2f} | {b['epoch_time_s']:.2f} | "
              f"{b['epoch_time_s'] / a['epoch_time_s']:.3f} | {100 * a['test_accuracy']:.1f} / "
              f"{100 * b['test_accuracy']:.1f} |")
    later = [b["epoch_time_s"] / a["epoch_time_s"] for a, b in zip(off[1:], on[1:])]
    if later:
        print(f"median ratio after epoch 0: {statistics.median(later):.3f}")
    print(json.dumps({"ratios_after_epoch_0": later}))


if __name__ == "__main__":
    main()
