"""The compactors the export offers: what turns a trained model into the smaller one a user deploys,
computing the same function.

A compactor (:data:`Compactor`) takes ``(model, variables, summary)`` (``summary``: the run's
summary.json, or None) and returns ``(apply_fn, variables)`` with ``apply_fn(variables,
normalised_images) -> logits``. :data:`COMPACTORS` names them all, written out in this module, so every
name is known to whoever imports the export, whatever else was imported:

* ``"as_trained"``: the run's model as it was trained (dense, or masked with its zeros in place);
* ``"column"``: a column-pruned AttentionLite student without its pruned im2col rows and dead channels
  (:func:`alite_jax.compact.column.compact_student`; BatchNorm folded);
* ``"spvit"``: an SPViT fine-tuned model (:class:`~alite_jax.models.spvit_compact.CompactViT` in its
  unfolded training form) with ``head_probs`` folded into plain conv kernels
  (:func:`~alite_jax.compact.spvit.fold_conv_attention`);
* ``"auto"`` (the CLI's default): ``"column"`` for a column-pruned run, ``"spvit"`` for an SPViT
  fine-tuning, the model as trained otherwise (a dense model, an irregularly pruned one: dense kernels
  gain nothing from its zeros, docs/compaction.md).

:func:`register_compactor` adds a user's own. :func:`compact_run` is the column compaction of a finished
run directory with the sizes before and after (docs/compaction.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from alite_jax import methods, run_dir
from alite_jax.compact.column import CompactResNet, Params, channels_dropped, compact_student, count_values
from alite_jax.compact.spvit import fold_conv_attention
from alite_jax.models.resnet import ResNet
from alite_jax.models.spvit_compact import CONV_KINDS, CompactViT

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Compactor = Callable[[Any, Any, "dict[str, Any] | None"], "tuple[ApplyFn, Any]"]

AS_TRAINED = "as_trained"
AUTO = "auto"


def as_trained(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """The run's model as it was trained (dense, or masked with its zeros in place), in eval mode."""
    del summary
    return (lambda v, x: model.apply(v, x, train=False)[0]), variables


def column(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """A column-pruned student's compact form (any ResNet of the zoo; the zeros say what is pruned)."""
    if not isinstance(model, ResNet):
        raise ValueError(f"the 'column' compactor takes a ResNet or SA-ResNet; this run's model is "
                         f"{type(model).__name__}")
    compact, params = compact_student(model, variables)
    return compact.apply, params


def spvit(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """An SPViT fine-tuned model with its conv blocks folded (the inference form of the same function)."""
    if not isinstance(model, CompactViT):
        raise ValueError(f"the 'spvit' compactor takes an SPViT fine-tuned model (CompactViT); this run's "
                         f"model is {type(model).__name__}")
    if model.folded:
        return as_trained(model, variables, summary)
    params = dict(variables["params"])
    for i, kind in enumerate(model.attention):
        if kind in CONV_KINDS:
            block = params[f"block{i}"]
            params[f"block{i}"] = {**block, "attn": fold_conv_attention(block["attn"], kind, model.alpha)}
    folded = model.clone(folded=True, drop_path_rate=0.0)
    return as_trained(folded, {"params": params, "batch_stats": variables.get("batch_stats", {})}, summary)


def pick(model: Any, summary: dict[str, Any] | None) -> str:
    """The compactor ``"auto"`` applies to a run's model."""
    if isinstance(model, CompactViT):
        return "spvit"
    if isinstance(model, ResNet) and (summary or {}).get("structure") == "column":
        return "column"
    return AS_TRAINED


def auto(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """The compaction the run's model admits (see the module docstring)."""
    return COMPACTORS[pick(model, summary)](model, variables, summary)


# Every compactor the export knows by name (``inference_function(compactor=name)``, the CLI's
# ``--compact=name``).
COMPACTORS: dict[str, Compactor] = {AS_TRAINED: as_trained, "column": column, "spvit": spvit, AUTO: auto}


def register_compactor(name: str) -> Callable[[Compactor], Compactor]:
    """Decorator: makes a user's compactor selectable by ``name`` in :data:`COMPACTORS`."""

    def wrap(fn: Compactor) -> Compactor:
        COMPACTORS[name] = fn
        return fn

    return wrap


def compact_run(workdir: str, kxk: str = "gather") -> tuple[CompactResNet, Params, dict[str, Any]]:
    """The compact model of a finished run directory (its ``model/``, masked params included).

    Returns ``(compact_model, params, info)``; ``info`` has ``structure`` (from summary.json: "column",
    "irregular" or "dense"), ``params_dense`` (parameters of the student, BN statistics excluded),
    ``params_nonzero``, ``params_compact`` (float values of the compact model, BN folded),
    ``indices_compact`` (its int32 gather indices) and ``channels_dropped``. An irregular run compacts
    too, but keeps almost every row: store it with :mod:`alite_jax.compact.sparse_store` instead.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    model, variables = methods.load_run(workdir, mesh)
    summary = run_dir.read_summary(workdir) or {}
    config = run_dir.read_run_config(workdir) or {}
    structure = summary.get("structure", (config.get("sparsity") or {}).get("structure", "unknown"))
    compact_model, params = compact_student(model, variables, kxk)
    dense = [np.asarray(x) for x in jax.tree.leaves(variables["params"])]
    floats, indices = count_values(params)
    info = dict(structure=structure, density=summary.get("density"),
                params_dense=int(sum(x.size for x in dense)),
                params_nonzero=int(sum(np.count_nonzero(x) for x in dense)),
                params_compact=int(floats), indices_compact=int(indices),
                channels_dropped=channels_dropped(model, variables, params))
    return compact_model, params, info
