"""BatchNorm statistics that match the weights: recomputed from training batches before an evaluation.

A BatchNorm layer trains on each batch's own mean and variance but evaluates with running averages
(``batch_stats``), an exponential moving average (momentum 0.9: about the last 10 steps) of statistics
that earlier weights produced. While the weights change fast (early epochs, right after a prune/regrow
round, large-gradient losses such as attention transfer) the averages lag behind them, and the
evaluation scores a model that never existed: a sparse-distilled student at 16x16 reported 10-20% test
accuracy for epochs while its train-mode accuracy was 65% (docs/sparse_learning.md).

:func:`make_recompute` builds the function that replaces every BatchNorm's running mean and variance by
the average, over a few training batches, of the batch statistics the *current* weights produce in train
mode: Precise BN
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, and Detectron2's ``update_bn_stats``), the
recomputation pruning papers run after pruning. Training is untouched (train mode uses batch statistics,
and the running averages go on from the recomputed values); the evaluation, the checkpoints and the
exported model get statistics of the weights they hold.

The statistics are read where BatchNorm reads them, by intercepting every ``nn.BatchNorm`` call
(``flax.linen.intercept_methods``), so any model works: the mean and the (biased, as Flax's) variance
over all axes but the feature axis, in float32, the same global statistics on every device of a
data-parallel mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_statistics(model: nn.Module, variables: Any, images: jax.Array,
                     rngs: dict[str, jax.Array] | None = None) -> dict[tuple[str, ...], Any]:
    """{BatchNorm module path: {"mean", "var"}} of one batch in train mode (nothing is updated);
    ``rngs``: the rng streams the model's train mode needs (e.g. SPViT's sampled gates)."""
    found: dict[tuple[str, ...], Any] = {}

    def capture(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            x = jnp.asarray(args[0], jnp.float32)
            axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
            feature_axes = {a % x.ndim for a in axis}
            reduce = tuple(a for a in range(x.ndim) if a not in feature_axes)
            mean = jnp.mean(x, axis=reduce)
            var = jnp.maximum(jnp.mean(jnp.square(x), axis=reduce) - jnp.square(mean), 0.0)
            found[tuple(module.path)] = {"mean": mean, "var": var}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        extra = {"rngs": rngs} if rngs else {}
        model.apply(variables, images, train=True, mutable=["batch_stats"], **extra)
    return found


def _average_into(stats: Any, total: dict[tuple[str, ...], Any], count: int) -> Any:
    """``stats`` (a batch_stats tree) with each BatchNorm's mean and var replaced by ``total / count``."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
    for path, moments in total.items():
        for name in ("mean", "var"):
            key = path + (name,)
            if key in flat:
                flat[key] = (moments[name] / count).astype(flat[key].dtype)
    return flax.traverse_util.unflatten_dict(flat)


def make_recompute(model: nn.Module, out_sharding: Any = None,
                   rngs: Callable[[jax.Array], dict[str, jax.Array]] | None = None
                   ) -> Callable[..., Any]:
    """A function ``(variables, batches, key=None) -> batch_stats``: ``variables["batch_stats"]`` with
    every BatchNorm's mean and variance replaced by the average of the batch statistics of ``batches``
    (dicts with ``"image"``) under ``variables["params"]``. Jitted once (sums and the average on the
    device, so the same program serves every epoch and every process of a multi-host run);
    ``out_sharding`` places the result (the trainer's: replicated). A model whose train mode draws random
    numbers (SPViT's gates, stochastic depth) gets them from ``rngs`` (a method's ``apply_rngs``) of
    ``key`` folded with the batch's index: the statistics are then those the running averages estimate,
    over random choices drawn as training draws them. A model without BatchNorm, or no batches, gives the
    statistics back unchanged.
    """
    jit = functools.partial(jax.jit, out_shardings=out_sharding) if out_sharding is not None else jax.jit
    first = jit(lambda v, x, r: batch_statistics(model, v, x, r))
    add = jit(lambda v, x, r, total: jax.tree.map(jnp.add, total, batch_statistics(model, v, x, r)))
    average = jit(_average_into, static_argnums=2)

    def recompute(variables: dict[str, Any], batches: Iterable[dict[str, Any]],
                  key: jax.Array | None = None) -> Any:
        stats = variables.get("batch_stats")
        if not stats:
            return stats
        if rngs is not None and key is None:
            raise ValueError("recompute was built with rngs (the model's train mode may draw random "
                             "numbers): pass a key, recompute(variables, batches, key)")
        total, count = None, 0
        for batch in batches:
            images = batch["image"]
            r = rngs(jax.random.fold_in(key, count)) if rngs is not None else None
            total = first(variables, images, r) if total is None else add(variables, images, r, total)
            count += 1
        return average(stats, total, count) if count else stats

    return recompute
