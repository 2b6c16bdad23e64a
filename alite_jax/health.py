"""A run's health: per-layer parameter norms and BatchNorm statistics every epoch, and the checks on them.

Training curves can look healthy while the weights run away: a layer followed by BatchNorm computes the
same function at any scale of its weights, so its loss does not see the scale, but the evaluation does
(through the running statistics), and so does float32 once the scale reaches 1e19. The trainer records,
after every epoch, each parameter leaf's L2 norm and each BatchNorm's range of running means and
variances (metrics.jsonl: ``param_norm``, ``bn_mean``, ``bn_var``; the report plots them), and
:func:`check` compares an epoch with the one before: a layer whose norm (or whose statistics' scale,
the square root of the variance) grew by more than ``config.health_factor`` is named in one line; a
non-finite value stops the run (:class:`alite_jax.errors.DivergedError`, naming the layer and the last
good checkpoint).
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from alite_jax.sparsity.masks import path_name


@jax.jit
def _summaries(params: Any, batch_stats: Any) -> tuple[Any, Any]:
    norms = jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), params)
    ranges = jax.tree.map(lambda x: jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32), batch_stats)
    return norms, ranges


def layer_health(params: Any, batch_stats: Any) -> dict[str, dict[str, Any]]:
    """{"param_norm": {leaf: L2 norm}, "bn_mean": {bn: [min, max]}, "bn_var": {bn: [min, max]}}, as
    Python floats (leaves named like 'stage1_block1/conv1/kernel', BatchNorms like 'stage1_block1/bn1')."""
    norms, ranges = jax.device_get(_summaries(params, batch_stats or {}))
    out: dict[str, dict[str, Any]] = {"param_norm": {}, "bn_mean": {}, "bn_var": {}}
    for path, value in jax.tree_util.tree_flatten_with_path(norms)[0]:
        out["param_norm"][path_name(path)] = float(value)
    for key, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(ranges)).items():
        if key[-1] in ("mean", "var"):
            out[f"bn_{key[-1]}"]["/".join(key[:-1])] = [float(v) for v in value]
    return out


def _scale(kind: str, value: Any) -> float:
    """The size a check compares: a norm, or the square root of a variance range's largest entry."""
    if kind == "param_norm":
        return abs(value)
    top = max(abs(v) for v in value)
    return math.sqrt(top) if kind == "bn_var" else top


def nonfinite(row: dict[str, Any]) -> str | None:
    """The first layer (in the row's order) with a non-finite norm or statistic, or None."""
    for kind in ("param_norm", "bn_mean", "bn_var"):
        for name, value in row.get(kind, {}).items():
            values = [value] if kind == "param_norm" else value
            if not all(math.isfinite(v) for v in values):
                return f"{name} ({'parameter' if kind == 'param_norm' else kind.replace('bn_', 'running ')})"
    return None


def check(previous: dict[str, Any] | None, row: dict[str, Any], factor: float) -> list[str]:
    """One line per layer whose norm or statistics' scale grew by more than ``factor`` since
    ``previous`` (the row of the epoch before; none for the first epoch, or with ``factor`` 0)."""
    if not previous or not factor:
        return []
    lines = []
    for kind, what in (("param_norm", "parameter norm"), ("bn_var", "running-variance scale"),
                       ("bn_mean", "running-mean scale")):
        before, after = previous.get(kind, {}), row.get(kind, {})
        for name, value in after.items():
            if name not in before:
                continue
            old, new = _scale(kind, before[name]), _scale(kind, value)
            if old > 0 and new > factor * old:
                lines.append(f"warning: epoch {row.get('epoch')}: {name}'s {what} grew {new / old:.3g}x "
                             f"in one epoch ({old:.3g} -> {new:.3g}; config.health_factor={factor:g})")
    return lines
