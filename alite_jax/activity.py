"""How much each output channel of a model's linear layers varies over a batch: the probe that finds
dormant channels.

A channel is dormant when its output is (almost) the same for every input of the batch: under a
BatchNorm that follows it, its normalised value is then constant and its gradient is divided by
sqrt(epsilon) instead of by its own spread. :func:`alite_jax.sparsity.revive_dormant` uses this probe
after a prune/regrow round: a round that prunes a channel's weights that read live inputs and keeps
one that reads a dead input (a ReLU channel that is zero over the batch) leaves such a channel, and the
weights it regrows there at zero would take a first step hundreds of times the channel's scale
(docs/sparse_learning.md, *A channel the round leaves dormant*).

The outputs are read where the layers produce them, by intercepting every ``nn.Conv``, ``nn.Dense``
and ``nn.DenseGeneral`` call (``flax.linen.intercept_methods``, as :mod:`alite_jax.batch_norm_stats`
reads BatchNorm's inputs), so any Flax model works: the (biased) variance over every axis but the last,
in float32, keyed like the layer's kernel in the parameter tree.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

LINEAR_LAYERS = (nn.Conv, nn.Dense, nn.DenseGeneral)


def output_variance(model: nn.Module, variables: dict[str, Any], images: jax.Array,
                    rngs: dict[str, jax.Array] | None = None) -> dict[str, Any]:
    """A tree like ``variables["params"]`` holding, at the ``kernel`` of every Conv / Dense layer, the
    variance over ``images`` of each of its output channels (shape ``(features,)``), in train mode
    (batch statistics, nothing updated); every other leaf of the parameters is absent. ``rngs``: the
    streams the model's train mode draws (a method's ``apply_rngs``)."""
    found: dict[tuple[str, ...], jax.Array] = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, LINEAR_LAYERS) and context.method_name == "__call__":
            x = jnp.asarray(out, jnp.float32).reshape(-1, out.shape[-1])
            mean = jnp.mean(x, axis=0)
            found[tuple(context.module.path) + ("kernel",)] = jnp.mean(jnp.square(x - mean), axis=0)
        return out

    with nn.intercept_methods(capture):
        extra = {"rngs": rngs} if rngs else {}
        model.apply(variables, images, train=True, mutable=["batch_stats"], **extra)
    return flax.traverse_util.unflatten_dict(found)


def make_output_variance(model: nn.Module, out_sharding: Any = None,
                         rngs: Callable[[jax.Array], dict[str, jax.Array]] | None = None
                         ) -> Callable[..., dict[str, Any]]:
    """:func:`output_variance` jitted once: ``(variables, images, key) -> variances`` (``key`` feeds
    ``rngs``, a method's ``apply_rngs``; ignored without it). ``out_sharding`` places the result."""
    jit = functools.partial(jax.jit, out_shardings=out_sharding) if out_sharding is not None else jax.jit

    @jit
    def probe(variables: dict[str, Any], images: jax.Array, key: jax.Array) -> dict[str, Any]:
        return output_variance(model, variables, images, rngs(key) if rngs is not None else None)

    return probe
