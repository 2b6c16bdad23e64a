"""Check: SA-ResNet26 trained with a Pallas impl ("fused", "pallas") follows impl="halo"'s trajectory.

The layer benchmark checks each attention shape alone; this runs the whole student (every attention
layer, strided ones included, in one program) for a few SGD steps from the same initialisation with both
implementations, and prints per step the loss of each, the largest logit and gradient differences, and
any parameter whose gradient is not finite; then the inference logits. Exit status 1 if the checked impl
gives a non-finite value where halo does not.

    python benchmarks/pallas_model_check.py --impl fused --size 32 --width 1.0 --batch 128 --steps 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from alite_jax.models import create_model, init_model  # noqa: E402


def trajectory(impl: str, args: argparse.Namespace) -> tuple[list[tuple[Any, ...]], jax.Array]:
    """(loss, logits, grads) of each of ``args.steps`` SGD steps, and the initial model's inference
    logits, for the student with ``impl``."""
    model = create_model("sa_resnet26", 10, width=args.width, impl=impl, dtype=args.dtype)
    variables = init_model(model, jax.random.key(0), args.size)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    y = jnp.arange(args.batch) % 10
    opt = optax.sgd(args.lr, momentum=0.9)

    @jax.jit
    def step(state: tuple) -> tuple[tuple, tuple]:
        params, batch_stats, opt_state = state

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            (logits, _), upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                           mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            return loss, (upd, logits)

        (loss, (upd, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), upd["batch_stats"], opt_state), (loss, logits, grads)

    inference = jax.jit(lambda v: model.apply(v, x, train=False)[0])(variables)
    state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))
    out = []
    for _ in range(args.steps):
        state, aux = step(state)
        out.append(jax.device_get(aux))
    return out, inference


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impl", default="fused", choices=["fused", "pallas"], help="the impl checked")
    args = p.parse_args()
    print(f"{args.impl} vs halo, whole student: {vars(args)}; backend {jax.default_backend()}, matmul "
          f"precision {jax.config.jax_default_matmul_precision}")
    halo, halo_inf = trajectory("halo", args)
    pallas, pallas_inf = trajectory(args.impl, args)
    finite = lambda t: all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(t))  # noqa: E731
    print(f"inference logits: max|diff| {float(jnp.max(jnp.abs(halo_inf - pallas_inf))):.2e} (scale "
          f"{float(jnp.max(jnp.abs(halo_inf))):.2e}), {args.impl} finite {finite(pallas_inf)}")
    bad = not finite(pallas_inf) and finite(halo_inf)
    for i, ((lh, logh, gh), (lp, logp, gp)) in enumerate(zip(halo, pallas)):
        grad_diff = max(float(jnp.max(jnp.abs(a - b)))
                        for a, b in zip(jax.tree.leaves(gh), jax.tree.leaves(gp)))
        grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(gh))
        nonfinite = [jax.tree_util.keystr(k) for k, a in jax.tree_util.tree_leaves_with_path(gp)
                     if not bool(jnp.all(jnp.isfinite(a)))]
        print(f"step {i}: loss halo {float(lh):.5f} {args.impl} {float(lp):.5f}; logits max|diff| "
              f"{float(jnp.max(jnp.abs(logh - logp))):.2e}; grads max|diff| {grad_diff:.2e} (scale "
              f"{grad_scale:.2e}); {args.impl} logits finite {finite(logp)}; non-finite grads "
              f"({len(nonfinite)}): {nonfinite[:6]}")
        bad |= (not finite((lp, logp, gp))) and finite((lh, logh, gh))
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
