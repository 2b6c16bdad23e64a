"""The compactors the export offers (:func:`alite_jax.export.inference.register_compactor`): what turns a
trained model into the smaller one a user deploys, computing the same function.

* ``"column"``: a column-pruned AttentionLite student without its pruned im2col rows and dead channels
  (:func:`alite_jax.export.compact.compact_student`; BatchNorm folded);
* ``"spvit"``: an SPViT fine-tuned model (:class:`~alite_jax.models.spvit_compact.CompactViT` in its
  unfolded training form) with ``head_probs`` folded into plain conv kernels
  (:func:`~alite_jax.models.spvit_compact.fold_conv_attention`);
* ``"auto"`` (the export's default): ``"column"`` for a column-pruned run, ``"spvit"`` for an SPViT
  fine-tuning, the model as trained otherwise (a dense model, an irregularly pruned one: dense kernels
  gain nothing from its zeros, docs/compaction.md).
"""

from __future__ import annotations

from typing import Any

from alite_jax.export.compact import compact_student
from alite_jax.export.inference import AS_TRAINED, COMPACTORS, ApplyFn, as_trained, register_compactor
from alite_jax.models.resnet import ResNet
from alite_jax.models.spvit_compact import CONV_KINDS, CompactViT, fold_conv_attention

AUTO = "auto"


@register_compactor("column")
def column(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """A column-pruned student's compact form (any ResNet of the zoo; the zeros say what is pruned)."""
    if not isinstance(model, ResNet):
        raise ValueError(f"the 'column' compactor takes a ResNet or SA-ResNet; this run's model is "
                         f"{type(model).__name__}")
    compact, params = compact_student(model, variables)
    return compact.apply, params


@register_compactor("spvit")
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


@register_compactor(AUTO)
def auto(model: Any, variables: Any, summary: dict[str, Any] | None) -> tuple[ApplyFn, Any]:
    """The compaction the run's model admits (see the module docstring)."""
    return COMPACTORS[pick(model, summary)](model, variables, summary)
