"""Cost accounting: parameters and MACs / FLOPs of any model, dense and under sparsity masks; the one
entry point that counts a model of the zoo, from Python and from the command line.

Counted analytically: the model is traced abstractly (``jax.eval_shape``, no compile, any image size)
and every ``nn.Conv``, ``nn.Dense`` and attention call is recorded with its input and output shapes.
Conventions (docs/costs.md gives their sources and the tests that pin the numbers):

* a convolution: H_out x W_out x kh x kw x C_in x C_out MACs (a strided one, such as the ImageNet
  layout's 7x7 stride-2 stem, at its output resolution); a dense layer: C_in x C_out per position;
  normalisation, activations, pooling (the ImageNet layout's max-pool included) and additions are not
  counted (as in the usual ResNet counts);
* local self-attention: its 1x1 projections as dense layers (3 C_in C_out per pixel) plus
  3 k^2 C_out per pixel for q.k, q.r and attention.v, at the layer's input resolution (before pooling);
* a ViT's multi-head attention: its projections as dense layers plus 2 N^2 D for q k^T and the weighted
  sum of the values (N tokens, width D); SPViT's unfolded conv slot (its kernel mixed from v at run
  time): (N - 1) (k^2 D D/h + D/h D) for the conv and the projection on the patch grid; SPViT's
  supernet, which computes every branch of its attention slot: the MSA as above plus both conv slots
  (k = 3 and k = 1);
* FLOPs = 2 x MACs;
* under masks, weight-activation MACs (convolutions, projections, the head) scale with the density of
  that layer's kernel; activation-activation MACs (q.k, q.r, attention.v) do not (RigL convention).

Entry points: :func:`count_costs` counts a built Linen module; :func:`model_costs` counts a zoo model by
name with its options (:func:`model_options`: each model takes only its own; one it does not take is an
error), SPViT's supernet (``supernet=True``) and found architectures (``arch=``) of the DeiTs included,
and for a DeiT or a found architecture gives SPViT's own closed-form count beside ours
(:mod:`alite_jax.vit_costs`, the count SPViT's search loss uses). The command line does the same:

    python -m alite_jax.costs --model=sa_resnet26 --num_classes=10 --image_size=32 --density=0.1 \
        --teacher=resnet50
    python -m alite_jax.costs --model=deit_tiny --num_classes=1000 --arch=spvit_deit_tiny --json

prints a per-layer table and totals (``--json``: one JSON object). An option the model does not take
(``--variant`` for a DeiT, ``--patch_size`` for a ResNet) gives ``error: ...`` and exit status 2; an
option left out is never an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alite_jax import vit_costs
from alite_jax.compact import spvit as compact_spvit
from alite_jax.errors import exit_with_user_error
from alite_jax.models import (LAYOUTS, MODEL_NAMES, STUDENTS, VARIANTS, VITS, LocalSelfAttention,
                              abstract_variables, count_params, create_model, create_vit, spvit,
                              spvit_compact)
from alite_jax.models.spvit import UnifiedAttention
from alite_jax.models.spvit_compact import UnfoldedConvAttention
from alite_jax.models.vit import Attention
from alite_jax.models.zoo import ATTENTION_DEFAULTS, VIT_CONFIGS, VIT_DEFAULTS
from alite_jax.sparsity.masks import layer_densities, path_name, prunable_tree
from alite_jax.vit_costs import RELEASED_ARCHS

CONVENTION = ("MACs counted analytically per image: conv H_out*W_out*kh*kw*C_in*C_out, dense C_in*C_out "
              "per position, local attention 3*C_in*C_out (projections) + 3*k^2*C_out (q.k, q.r, "
              "attention.v) per pixel at its input resolution, ViT attention 2*N^2*D (q.k^T, "
              "attention.v) besides its projections; norms, activations, pooling not counted; "
              "FLOPs = 2 x MACs; under sparsity only weight-activation MACs scale with the layer's "
              "density.")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One counted operation, per image."""

    name: str                # module path, e.g. "stage1_block1/attention/query"
    kind: str                # "conv", "dense" or "attention" (attention's activation products)
    kernel: str | None       # parameter path of the kernel whose density scales the MACs, or None
    params: int              # parameters of that kernel (0 for attention products)
    macs: int                # dense MACs per image
    output_shape: tuple[int, ...]


def _conv_slot_macs(kind: str, tokens: int, dim: int, num_heads: int) -> int:
    """An SPViT conv slot on the patch grid: a k x k conv D -> D/h and the projection D/h -> D."""
    hd, taps = dim // num_heads, 9 if kind == "3x3" else 1
    return (tokens - 1) * (taps * dim * hd + hd * dim)


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
            macs = _conv_slot_macs(module.kind, n, d, module.num_heads)
            records.append(LayerCost(name, "conv", None, 0, macs, out.shape[1:]))
        elif isinstance(module, UnifiedAttention):  # the supernet's slot: MSA (projections Dense), 2 convs
            n, d = x.shape[-2], x.shape[-1]
            records.append(LayerCost(name, "attention", None, 0, 2 * n * n * d, out.shape[1:]))
            for kind in ("3x3", "1x1"):
                records.append(LayerCost(f"{name}/conv_{kind}", "conv", None, 0,
                                         _conv_slot_macs(kind, n, d, module.num_heads), out.shape[1:]))
        elif isinstance(module, LocalSelfAttention):
            pixels = int(np.prod(x.shape[1:-1]))  # the input resolution, before any pooling
            macs = pixels * 3 * module.kernel_size ** 2 * module.features
            records.append(LayerCost(name, "attention", None, 0, macs, out.shape[1:]))
        return out

    images = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return records


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
        densities = layer_densities(masks)
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


# ---- A zoo model by name ---------------------------------------------------------------------------

RESNET_OPTIONS = ("layout", "width")
STUDENT_OPTIONS = RESNET_OPTIONS + ("variant", "num_heads", "kernel_size")
VIT_COST_OPTIONS = ("patch_size", "dim", "depth", "num_heads", "mlp_ratio", "supernet", "arch", "folded")
VIT_SHAPES = ("patch_size", "dim", "depth", "num_heads", "mlp_ratio")  # what a found architecture fixes


def model_options(name: str) -> tuple[str, ...]:
    """The options :func:`model_costs` takes for the zoo model ``name``, besides num_classes, image_size,
    channels, density and teacher, which every model takes.

    resnet50: ``layout``, ``width``. The SA-ResNets add ``variant``, ``num_heads`` and ``kernel_size``
    (their local attention's). The DeiTs: ``patch_size``, ``dim``, ``depth``, ``num_heads``,
    ``mlp_ratio``, and SPViT's forms of them: ``supernet=True`` (the search's supernet) or ``arch`` (a
    found architecture; with ``folded``). Raises ValueError for a name not in the zoo.
    """
    if name in VITS:
        return VIT_COST_OPTIONS
    if name in STUDENTS:
        return STUDENT_OPTIONS
    if name in MODEL_NAMES:
        return RESNET_OPTIONS
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A zoo model built for counting, with everything its count depends on."""

    module: nn.Module
    name: str
    num_classes: int
    image_size: int
    channels: int
    options: dict[str, Any]  # every option of the model as built, defaults included
    # SPViT's per-block (attention type, kept FFN width) of a dense DeiT or a found architecture: what
    # alite_jax.vit_costs counts. None for the ResNets and the supernet (whose gates decide it).
    blocks: tuple[tuple[str, int], ...] | None = None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _read_arch(arch: str | Mapping[str, Any]) -> dict[str, Any]:
    """A found architecture's dict: given as one, or in a file, or in a search run directory."""
    if isinstance(arch, Mapping):
        spvit_compact.validate_architecture(arch)
        return dict(arch)
    path = str(arch)
    if os.path.isdir(path):
        path = os.path.join(path, compact_spvit.ARCHITECTURE)
    if not os.path.isfile(path):
        raise ValueError(f"arch={arch!r} is neither a released architecture {sorted(RELEASED_ARCHS)} nor an "
                         f"architecture file or a search run directory ({path} does not exist)")
    return compact_spvit.load_architecture(path)


def _found_architecture(name: str, arch: str | Mapping[str, Any]
                        ) -> tuple[dict[str, Any], tuple[tuple[str, int], ...]]:
    """(the values the architecture fixes, its blocks). A released one fixes the DeiT's shapes only (it
    applies at any image size, classes and channels); a file or dict also its image size, classes and
    channels."""
    if isinstance(arch, str) and arch in RELEASED_ARCHS:
        deit, blocks = RELEASED_ARCHS[arch]
        if deit != name:
            raise ValueError(f"arch={arch!r} is a {deit} architecture, not a {name} one")
        shapes = {**VIT_DEFAULTS, **VIT_CONFIGS[deit], "depth": len(blocks)}
        return {k: shapes[k] for k in VIT_SHAPES}, tuple(blocks)
    data = _read_arch(arch)
    fixed = {k: data[k] for k in ("patch_size", "dim", "depth", "num_heads", "image_size", "num_classes")}
    fixed.update(mlp_ratio=data["mlp_hidden"] / data["dim"], channels=data["in_chans"])
    return fixed, spvit_compact.arch_blocks(data)


def _build_vit(name: str, num_classes: int | None, image_size: int | None, channels: int | None,
               options: dict[str, Any]) -> ZooModel:
    supernet, arch = bool(options.get("supernet", False)), options.get("arch")
    if supernet and arch is not None:
        raise ValueError("supernet and arch exclude each other: the supernet is what SPViT's search trains, "
                         "arch an architecture it found")
    if "folded" in options and arch is None:
        raise ValueError("folded (--unfolded) applies to a found architecture (arch) only")
    shapes = {k: options[k] for k in VIT_SHAPES if k in options}
    if arch is None:
        num_classes, image_size, channels = _or(num_classes, 10), _or(image_size, 224), _or(channels, 3)
        dense = create_vit(name, num_classes, image_size=image_size, **shapes)
        built = {k: getattr(dense, k) for k in VIT_SHAPES}
        if supernet:
            return ZooModel(spvit.supernet_of(dense), name, num_classes, image_size, channels,
                            dict(built, supernet=True))
        return ZooModel(dense, name, num_classes, image_size, channels, built,
                        vit_costs.dense_arch(dense.depth, dense.dim, dense.mlp_ratio))
    fixed, blocks = _found_architecture(name, arch)
    given = dict(shapes, num_classes=num_classes, image_size=image_size, channels=channels)
    wrong = {k: v for k, v in given.items() if v is not None and k in fixed and v != fixed[k]}
    if wrong:
        raise ValueError(f"the architecture fixes {({k: fixed[k] for k in wrong})}; got {wrong}")
    o = {"num_classes": 10, "image_size": 224, "channels": 3, **fixed,
         **{k: v for k, v in given.items() if v is not None}}
    folded = bool(options.get("folded", True))
    kinds, widths = zip(*blocks)
    module = spvit_compact.CompactViT(o["num_classes"], attention=kinds, ffn_widths=widths,
                                      image_size=o["image_size"], patch_size=o["patch_size"], dim=o["dim"],
                                      num_heads=o["num_heads"], folded=folded)
    built = dict({k: o[k] for k in VIT_SHAPES}, arch=arch if isinstance(arch, str) else "(a dict)",
                 folded=folded)
    return ZooModel(module, name, o["num_classes"], o["image_size"], o["channels"], built, tuple(blocks))


def build_model(name: str, num_classes: int | None = None, image_size: int | None = None,
                channels: int | None = None, **options: Any) -> ZooModel:
    """The zoo model ``name`` with ``options`` (:func:`model_options`), ready to count.

    Defaults: 10 classes, 3 channels, images of 32x32 (the CIFAR layout) or 224x224 (the ImageNet layout
    and the DeiTs), the zoo's defaults for the other options. ``arch``: a released architecture (a key
    of ``alite_jax.vit_costs.RELEASED_ARCHS``, e.g. "spvit_deit_tiny": any image size, classes and
    channels), an ``architecture.json``, the search run directory holding one, or its dict
    (``alite_jax.compact.spvit.extract_architecture``). A file fixes the ViT's shapes, image size,
    classes and channels (they default to its values); a given option that disagrees with it is an
    error. ``folded`` (default True): the found architecture's inference form; False: SPViT's
    fine-tuning form, which the trainer trains and counts.

    Raises:
      ValueError: an unknown name, an option the model does not take, or inconsistent options.
    """
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to {name}; its options are {list(allowed)}")
    if name in VITS:
        return _build_vit(name, num_classes, image_size, channels, options)
    layout, width = options.get("layout", "cifar"), options.get("width", 1.0)
    attention = {k: options[k] for k in ("variant", "num_heads", "kernel_size") if k in options}
    num_classes, channels = _or(num_classes, 10), _or(channels, 3)
    module = create_model(name, num_classes, layout=layout, width=width, **attention)
    built = dict(layout=layout, width=width)
    if name in STUDENTS:
        built.update(variant=attention.get("variant", "hybrid"),
                     **{k: attention.get(k, ATTENTION_DEFAULTS[k]) for k in ("num_heads", "kernel_size")})
    return ZooModel(module, name, num_classes, _or(image_size, 224 if layout == "imagenet" else 32), channels,
                    built)


def model_costs(name: str, num_classes: int | None = None, image_size: int | None = None,
                channels: int | None = None, *, density: float | None = None, teacher: str | None = None,
                **options: Any) -> dict[str, Any]:
    """The costs of the zoo model ``name``: :func:`count_costs` of :func:`build_model`'s model.

    Returns count_costs' dict and model, options (every option of the model as built), num_classes,
    image_size and channels. For a DeiT or a found architecture also SPViT's own count of it
    (:mod:`alite_jax.vit_costs`: norms counted, the FFN on the patch tokens only; its parameter
    convention reproduces the published counts): ``spvit_macs`` and ``spvit_params``; for a found
    architecture ``arch_attention`` and ``arch_ffn``, per block. With ``teacher`` (a zoo name, built with
    the same classes, image size and channels, and the student's layout and width where both take them):
    ``teacher``, ``teacher_params``, ``teacher_flops`` and the :func:`reductions`.

    Raises:
      ValueError: as :func:`build_model`, or a density outside (0, 1].
    """
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    zoo = build_model(name, num_classes, image_size, channels, **options)
    costs = count_costs(zoo.module, zoo.image_size, zoo.channels, density=density)
    out: dict[str, Any] = dict(model=name, options=zoo.options, num_classes=zoo.num_classes,
                               image_size=zoo.image_size, channels=zoo.channels, **costs)
    if zoo.blocks is not None:
        shapes = dict(image_size=zoo.image_size, patch_size=zoo.options["patch_size"], dim=zoo.options["dim"],
                      num_heads=zoo.options["num_heads"], num_classes=zoo.num_classes, in_chans=zoo.channels)
        out.update(spvit_macs=vit_costs.vit_arch_macs(zoo.blocks, **shapes),
                   spvit_params=vit_costs.vit_arch_params(zoo.blocks, **shapes))
        if "arch" in zoo.options:
            out.update(arch_attention=[k for k, _ in zoo.blocks], arch_ffn=[w for _, w in zoo.blocks])
    if teacher:
        shared = {k: options[k] for k in RESNET_OPTIONS if k in options and k in model_options(teacher)}
        t = build_model(teacher, zoo.num_classes, zoo.image_size, zoo.channels, **shared)
        t_costs = count_costs(t.module, t.image_size, t.channels)
        out.update(teacher=teacher, teacher_params=t_costs["params"], teacher_flops=t_costs["flops"],
                   **reductions(costs, t_costs))
    return out


# ---- The command line ------------------------------------------------------------------------------

MODEL_FLAGS = ("layout", "width", "variant", "kernel_size", "num_heads", "patch_size", "dim", "depth",
               "mlp_ratio", "supernet", "arch", "folded")  # argparse destinations, model_costs' options


def _flag(option: str) -> str:
    return "--unfolded" if option == "folded" else f"--{option}"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors take the package's form for what the user can fix
    (:func:`alite_jax.errors.exit_with_user_error`: one line, exit status 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        exit_with_user_error(message)


def _density(text: str) -> float:
    d = float(text)
    if not 0 < d <= 1:
        raise argparse.ArgumentTypeError(f"--density must be in (0, 1], got {text}")
    return d


def _parser() -> _Parser:
    p = _Parser(prog="python -m alite_jax.costs", allow_abbrev=False,
                description="Parameters and MACs/FLOPs of a zoo model, dense or at a density: a per-layer "
                            "table and totals, or one JSON object. A model option (the groups below) "
                            "that the model does not take is an error when given.")
    add = p.add_argument
    add("--model", choices=MODEL_NAMES, default="sa_resnet26", help="Zoo model (default sa_resnet26).")
    add("--num_classes", type=int, help="Classifier outputs (default 10; an architecture file's).")
    add("--image_size", type=int, help="Image height and width (default 32; 224 in the imagenet layout and "
                                       "for the DeiTs; an architecture file's).")
    add("--channels", type=int, help="Input channels (default 3; an architecture file's).")
    add("--density", type=_density, help="Density of every prunable kernel (default: dense).")
    add("--teacher", choices=MODEL_NAMES, help="Add reductions against this model (e.g. resnet50).")
    add("--json", action="store_true", help="Print one JSON object instead of the table.")
    add = p.add_argument_group("ResNets (resnet50 and the SA-ResNets)").add_argument
    add("--layout", choices=LAYOUTS, help="Model layout (default cifar; imagenet: hybrid students only).")
    add("--width", type=float, help="Channel multiplier (default 1).")
    add = p.add_argument_group("SA-ResNets").add_argument
    add("--variant", choices=VARIANTS, help="hybrid (conv stem, the default) or homogeneous.")
    add("--kernel_size", type=int, help="Local attention neighbourhood (default 7).")
    add("--num_heads", type=int, help="Attention heads (SA-ResNets 8; the DeiTs their own).")
    add = p.add_argument_group("DeiTs, SPViT's supernet and found architectures of them").add_argument
    add("--patch_size", type=int, help="Patch side (default 16).")
    add("--dim", type=int, help="Token width (default the DeiT's).")
    add("--depth", type=int, help="Blocks (default 12).")
    add("--mlp_ratio", type=float, help="FFN hidden width over dim (default 4).")
    add("--supernet", action="store_true", default=None, help="SPViT's supernet of the DeiT.")
    add("--arch", help=f"A found SPViT architecture: released ({', '.join(RELEASED_ARCHS)}), an "
                       f"architecture.json or a search run directory.")
    add("--unfolded", dest="folded", action="store_false", default=None,
        help="With --arch: SPViT's fine-tuning form (the trainer's), not the folded inference form.")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m alite_jax.costs``: counts ``--model`` with the options given (``--help``); prints a
    table or, with ``--json``, :func:`model_costs`' dict. ``argv``: the arguments (default sys.argv's)."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    allowed = model_options(args.model)
    wrong = [_flag(k) for k in given if k not in allowed]
    if wrong:
        parser.error(f"{' '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {args.model}; "
                     f"its options are {' '.join(_flag(k) for k in allowed)}")
    try:
        out = model_costs(args.model, args.num_classes, args.image_size, args.channels, density=args.density,
                          teacher=args.teacher, **given)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(out))
        return
    options = ", ".join(f"{k}={v}" for k, v in out["options"].items())
    print(f"{out['model']} ({options}), {out['num_classes']} classes, "
          f"{out['image_size']}x{out['image_size']}x{out['channels']} images")
    print(format_table(out))
    if "spvit_macs" in out:
        print(f"SPViT's count (norms counted, the FFN on the patch tokens; alite_jax.vit_costs): "
              f"{out['spvit_macs'] / 1e9:.4g} G MACs, {out['spvit_params']:,} params")
    if "arch_attention" in out:
        o, blocks = out["options"], tuple(zip(out["arch_attention"], out["arch_ffn"]))
        print(vit_costs.format_arch_table(blocks, out["image_size"], o["patch_size"], o["dim"],
                                          o["num_heads"], out["num_classes"], out["channels"]))
    if args.teacher:
        print(f"vs {args.teacher} ({out['teacher_params']:,} params, {out['teacher_flops'] / 1e9:.3f} "
              f"GFLOPs): parameter reduction {out['param_reduction_vs_teacher']:.2f}x "
              f"(paper's arithmetic: {out['param_reduction_paper']:.2f}x), FLOPs reduction "
              f"{out['flops_reduction_vs_teacher']:.2f}x (dense student: "
              f"{out['flops_reduction_dense_vs_teacher']:.2f}x)")


if __name__ == "__main__":
    main()
