"""Benchmark: the cost of sparse learning on SA-ResNet26's parameters (8.3M prunable weights).

In one run, on the full-width hybrid SA-ResNet26 (10 classes):

1. ``prune_and_regrow`` (the end-of-epoch step): compile time and median time per round, for irregular
   and column structure;
2. the optimizer step (``update`` + ``apply_updates``, jitted) of the bare inner
   optimizer (SGD with momentum 0.9 and weight decay) against the same optimizer wrapped in
   ``sparse_learning``, side by side, with the ratio.

Run: ``python benchmarks/sparsity.py`` (``--repeats`` to change the number of timed calls).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

from timing import first_and_median  # noqa: E402  (benchmarks/timing.py, beside this script)

from alite_jax import sparsity  # noqa: E402
from alite_jax.models import count_params, create_model, init_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()

    model = create_model("sa_resnet26", 10)
    params = init_model(model, jax.random.key(0), 32)["params"]
    grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(jax.random.key(1), p.shape), params)
    print(f"SA-ResNet26: {count_params(params):,} params; {jax.devices()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")

    inner = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    print("\n== prune_and_regrow, one round (density %.2f, prune rate 0.3) ==" % args.density)
    print(f"   {'structure':<10} {'first call s':>12} {'median s':>9}")
    for structure in sparsity.STRUCTURES:
        tx = sparsity.sparse_learning(inner, density=args.density, structure=structure)
        state = tx.init(params)
        p = sparsity.apply_masks(params, sparsity.get_masks(state))
        _, state = tx.update(grads, state, p)  # some momentum to rank by
        first, med = first_and_median(lambda: sparsity.prune_and_regrow(p, state, 0.3), args.repeats)
        print(f"   {structure:<10} {first:>12.2f} {med:>9.3f}")

    print("\n== optimizer step (update + apply_updates, jitted) ==")
    results = {}
    for name, tx in (("sgd+wd (bare)", inner),
                     ("sparse_learning(sgd+wd)", sparsity.sparse_learning(inner, density=args.density))):
        state = tx.init(params)

        @jax.jit
        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        carry = [params, state]

        def call():
            carry[0], carry[1] = step(carry[0], carry[1], grads)
            return carry[0]

        _, results[name] = first_and_median(call, args.repeats * 4)
        print(f"   {name:<26} {results[name] * 1e3:8.1f} ms")
    bare, wrapped = results.values()
    print(f"   wrapper overhead: {wrapped / bare:.2f}x the bare step (+{(wrapped - bare) * 1e3:.1f} ms)")
    print(f"\nload at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
