"""Cost accounting: parameters and MACs / FLOPs of any model, dense and under sparsity masks.

Counted analytically: the model is traced abstractly (``jax.eval_shape``, no compile, any image size)
and every ``nn.Conv``, ``nn.Dense`` and ``LocalSelfAttention`` call is recorded with its input and
output shapes. Conventions (docs/costs.md gives their sources and the tests that pin the numbers):

* a convolution: H_out x W_out x kh x kw x C_in x C_out MACs (a strided one, such as the ImageNet
  layout's 7x7 stride-2 stem, at its output resolution); a dense layer: C_in x C_out per position;
  normalisation, activations, pooling (the ImageNet layout's max-pool included) and additions are not
  counted (as in the usual ResNet counts);
* local self-attention: its 1x1 projections as dense layers (3 C_in C_out per pixel) plus
  3 k^2 C_out per pixel for q.k, q.r and attention.v, at the layer's input resolution (before pooling);
* a ViT's multi-head attention: its projections as dense layers plus 2 N^2 D for q k^T and the weighted
  sum of the values (N tokens, width D); SPViT's unfolded conv slot (its kernel mixed from v at run
  time): (N - 1) (k^2 D D/h + D/h D) for the conv and the projection on the patch grid;
* FLOPs = 2 x MACs;
* under masks, weight-activation MACs (convolutions, projections, the head) scale with the density of
  that layer's kernel; activation-activation MACs (q.k, q.r, attention.v) do not (RigL convention).

``python -m alite_jax.costs --model=sa_resnet26 --num_classes=10 --image_size=32 --density=0.1
--teacher=resnet50`` prints a per-layer table and totals (``--json`` for one JSON object);
``--layout=imagenet --image_size=224 --num_classes=1000`` counts the ImageNet-layout models.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.models import (LAYOUTS, MODEL_NAMES, VARIANTS, LocalSelfAttention, abstract_variables,
                              count_params, create_model)
from alite_jax.models.spvit_compact import UnfoldedConvAttention
from alite_jax.models.vit import Attention
from alite_jax.sparsity.masks import path_name, prunable_tree

CONVENTION = ("MACs counted analytically per image: conv H_out*W_out*kh*kw*C_in*C_out, dense C_in*C_out "
              "per position, local attention 3*C_in*C_out (projections) + 3*k^2*C_out (q.k, q.r, "
              "attention.v) per pixel at its input resolution; norms, activations, pooling not "
              "counted; FLOPs = 2 x MACs; under sparsity only weight-activation MACs scale with "
              "the layer's density.")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One counted operation, per image."""

    name: str                # module path, e.g. "stage1_block1/attention/query"
    kind: str                # "conv", "dense" or "attention" (attention's activation products)
    kernel: str | None       # parameter path of the kernel whose density scales the MACs, or None
    params: int              # parameters of that kernel (0 for attention products)
    macs: int                # dense MACs per image
    output_shape: tuple[int, ...]


def layer_costs(model: nn.Module, image_size: int | tuple[int, int], channels: int = 3,
                variables: Any = None) -> list[LayerCost]:
    """Every counted operation of ``model`` on one image, in call order.

    ``variables``: the model's (abstract) variables, if the caller already has them.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if variables is None:
        variables = abstract_variables(model, (h, w), channels)
    records: list[LayerCost] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if not args:  # a module called without inputs (e.g. a bias alone) computes nothing per image
            return out
        name = "/".join(module.path)
        x = args[0]
        if isinstance(module, nn.Conv):
            kernel = module.kernel_size
            cin = x.shape[-1] // module.feature_group_count
            macs = int(np.prod(out.shape[1:-1])) * int(np.prod(kernel)) * cin * out.shape[-1]
            params = int(np.prod(kernel)) * cin * out.shape[-1]
            records.append(LayerCost(name, "conv", name + "/kernel", params, macs, out.shape[1:]))
        elif isinstance(module, nn.Dense):
            positions = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
            params = x.shape[-1] * out.shape[-1]
            records.append(LayerCost(name, "dense", name + "/kernel", params, positions * params,
                                     out.shape[1:]))
        elif isinstance(module, Attention):  # a ViT's q k^T and weights v (its projections are Dense)
            n, d = x.shape[-2], x.shape[-1]
            records.append(LayerCost(name, "attention", None, 0, 2 * n * n * d, out.shape[1:]))
        elif isinstance(module, UnfoldedConvAttention):  # SPViT's conv slot, kernels mixed at run time
            n, d = x.shape[-2], x.shape[-1]
            hd, taps = d // module.num_heads, 9 if module.kind == "3x3" else 1
            macs = (n - 1) * (taps * d * hd + hd * d)
            records.append(LayerCost(name, "conv", None, 0, macs, out.shape[1:]))
        elif isinstance(module, LocalSelfAttention):
            pixels = int(np.prod(x.shape[1:-1]))  # the input resolution, before any pooling
            macs = pixels * 3 * module.kernel_size ** 2 * module.features
            records.append(LayerCost(name, "attention", None, 0, macs, out.shape[1:]))
        return out

    images = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return records


def _kernel_densities(masks: Any) -> dict[str, float]:
    flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)
    return {path_name(p): float(np.mean(np.asarray(m))) for p, m in flat if m is not None}


def count_costs(model: nn.Module, image_size: int | tuple[int, int], channels: int = 3, *,
                masks: Any = None, density: float | None = None) -> dict[str, Any]:
    """Totals and per-layer costs of ``model``, dense and sparse.

    Args:
      masks: a mask tree (``alite_jax.sparsity``): per-layer densities from the masks.
      density: without masks, every prunable kernel (alite_jax.sparsity's default) at this density.
    Returns:
      A dict with params, params_prunable, params_nonzero, density, macs, macs_sparse, flops,
      flops_sparse, convention and per_layer (a list of dicts).
    """
    variables = abstract_variables(model, image_size, channels)
    params = variables["params"]
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    prunable = dict(zip([path_name(p) for p, _ in flat], jax.tree.leaves(prunable_tree(params))))
    sizes = {path_name(p): int(np.prod(x.shape)) for p, x in flat}
    if masks is not None:
        densities = _kernel_densities(masks)
    else:
        d = 1.0 if density is None else float(density)
        densities = {k: d for k, is_p in prunable.items() if is_p}
    total = count_params(params)
    n_prunable = sum(sizes[k] for k in densities)
    # A count: exact from masks (size x mask mean), the nearest whole number for a bare density.
    nonzero = int(round(total - n_prunable + sum(sizes[k] * densities[k] for k in densities)))
    layers, macs, macs_sparse = [], 0, 0.0
    for layer in layer_costs(model, image_size, channels, variables):
        d = densities.get(layer.kernel, 1.0) if layer.kernel else 1.0
        sparse = layer.macs * d
        macs += layer.macs
        macs_sparse += sparse
        layers.append(dict(name=layer.name, kind=layer.kind, params=layer.params,
                           density=d, macs=layer.macs, macs_sparse=sparse,
                           output_shape=list(layer.output_shape)))
    return dict(params=total, params_prunable=n_prunable, params_nonzero=nonzero,
                density=(nonzero - (total - n_prunable)) / max(n_prunable, 1),
                macs=macs, macs_sparse=macs_sparse, flops=2 * macs, flops_sparse=2 * macs_sparse,
                convention=CONVENTION, per_layer=layers)


def reductions(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """The paper's reduction columns: teacher cost over the student's sparse cost.

    ``param_reduction_vs_teacher`` counts the student's true non-zero parameters (pruned kernels at
    their density, every unpruned parameter in full). ``param_reduction_paper`` is the paper's
    arithmetic, teacher params / (density x all student params), which ignores that normalisation
    parameters and biases are not pruned (28.3x for SA-ResNet26 at d = 0.1 instead of 27.1x;
    docs/costs.md).
    """
    return dict(param_reduction_vs_teacher=teacher["params"] / student["params_nonzero"],
                param_reduction_paper=teacher["params"] / (student["density"] * student["params"]),
                flops_reduction_vs_teacher=teacher["flops"] / student["flops_sparse"],
                flops_reduction_dense_vs_teacher=teacher["flops"] / student["flops"])


def format_table(costs: dict[str, Any]) -> str:
    """A per-layer table and the totals, as text."""
    lines = [f"{'layer':<36} {'kind':<9} {'params':>10} {'density':>7} {'MMACs':>9} {'MMACs sparse':>12}"]
    for layer in costs["per_layer"]:
        lines.append(f"{layer['name']:<36} {layer['kind']:<9} {layer['params']:>10,} "
                     f"{layer['density']:>7.3f} {layer['macs'] / 1e6:>9.2f} "
                     f"{layer['macs_sparse'] / 1e6:>12.2f}")
    lines += ["", f"params {costs['params']:,} (prunable {costs['params_prunable']:,}, non-zero "
                  f"{costs['params_nonzero']:,.0f}, density of prunable {costs['density']:.3f})",
              f"MACs {costs['macs'] / 1e9:.3f} G dense, {costs['macs_sparse'] / 1e9:.3f} G sparse; "
              f"FLOPs {costs['flops'] / 1e9:.3f} G dense, {costs['flops_sparse'] / 1e9:.3f} G sparse",
              f"convention: {costs['convention']}"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    student = create_model(f.model, f.num_classes, layout=f.layout, width=f.width,
                           **({"variant": f.variant} if f.model != "resnet50" else {}))
    costs = count_costs(student, f.image_size, f.channels, density=f.density)
    out: dict[str, Any] = dict(model=f.model, variant=f.variant if f.model != "resnet50" else None,
                               layout=f.layout, num_classes=f.num_classes, image_size=f.image_size, **costs)
    if f.teacher:
        teacher = count_costs(create_model(f.teacher, f.num_classes, layout=f.layout, width=f.width),
                              f.image_size, f.channels)
        out.update(teacher=f.teacher, teacher_params=teacher["params"], teacher_flops=teacher["flops"],
                   **reductions(costs, teacher))
    if f.json:
        print(json.dumps(out))
        return
    print(f"{f.model} ({out['variant'] or 'teacher'}), {f.layout} layout, {f.num_classes} classes, "
          f"{f.image_size}x{f.image_size}, width x{f.width}")
    print(format_table(costs))
    if f.teacher:
        print(f"vs {f.teacher} ({out['teacher_params']:,} params, {out['teacher_flops'] / 1e9:.3f} "
              f"GFLOPs): parameter reduction {out['param_reduction_vs_teacher']:.2f}x "
              f"(paper's arithmetic: {out['param_reduction_paper']:.2f}x), FLOPs reduction "
              f"{out['flops_reduction_vs_teacher']:.2f}x (dense student: "
              f"{out['flops_reduction_dense_vs_teacher']:.2f}x)")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("model", "sa_resnet26", list(MODEL_NAMES), "Model.")
    flags.DEFINE_enum("variant", "hybrid", list(VARIANTS), "Student variant.")
    flags.DEFINE_enum("layout", "cifar", list(LAYOUTS), "Model layout (imagenet: hybrid students only).")
    flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
    flags.DEFINE_integer("image_size", 32, "Input height and width (a multiple of 8; of 32 for imagenet).")
    flags.DEFINE_integer("channels", 3, "Input channels.")
    flags.DEFINE_float("width", 1.0, "Channel multiplier.")
    flags.DEFINE_float("density", None, "Density of every prunable kernel (default: dense).")
    flags.DEFINE_string("teacher", None, "Add reductions against this model (e.g. resnet50).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.register_validator("density", lambda d: d is None or 0 < d <= 1,
                             message="--density must be in (0, 1]")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
