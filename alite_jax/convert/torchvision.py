"""torchvision's ResNet state_dict -> this zoo's variables ``{"params", "batch_stats"}``.

The architectures are the same network (docs/convert.md gives the sources): torchvision's
``resnet.py`` ResNet-50 (v1.5: the stride on the 3x3 convolution, ``downsample`` = 1x1 conv + BN) is
:func:`alite_jax.models.create_model` ``("resnet50", num_classes, layout="imagenet")``, and with the
CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) the zoo's default layout. Names map module by module:

================================  ==========================================
torchvision                       this zoo
================================  ==========================================
``conv1``, ``bn1``                ``stem_conv``, ``stem_bn``
``layer{s}.{i}.conv{k}/bn{k}``    ``stage{s}_block{i+1}/conv{k}/bn{k}``
``layer{s}.{i}.downsample.0/1``   ``stage{s}_block{i+1}/proj_conv/proj_bn``
``fc``                            ``head``
================================  ==========================================

and tensor by tensor: a convolution's ``weight`` (O, I, H, W) is the ``kernel`` (H, W, I, O); a Linear's
``weight`` (out, in) the Dense ``kernel`` (in, out); BatchNorm's ``weight``/``bias`` are ``params``
``scale``/``bias``, its ``running_mean``/``running_var`` the ``batch_stats`` ``mean``/``var``;
``num_batches_tracked`` (a step counter) is dropped. Values are cast to float32 (exact from float16 and
bfloat16) and otherwise copied unchanged.

BatchNorm needs no conversion: PyTorch's ``BatchNorm2d`` defaults (eps 1e-5; momentum 0.1, the weight of
the new batch statistic) are this zoo's ``nn.BatchNorm(epsilon=1e-5, momentum=0.9)`` (Flax's momentum
is the weight of the old running value), which :func:`check_batchnorm_conventions` asserts on the model.
In inference, both compute ``(x - mean) / sqrt(var + eps) * scale + bias``. (Training would differ in one
thing: PyTorch updates ``running_var`` with the unbiased batch variance, Flax with the biased one; a
converted teacher is used frozen.)
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.convert.matching import classes_hint, matched_tensors
from alite_jax.convert.readers import CheckpointError
from alite_jax.models import abstract_variables, create_model

ARCHS = ("resnet50",)
LAYOUTS = ("imagenet", "cifar")
TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d(eps=1e-5)
TORCH_BN_MOMENTUM = 0.1  # torch.nn.BatchNorm2d(momentum=0.1): running = 0.9 running + 0.1 batch
NUM_BATCHES_TRACKED = "num_batches_tracked"

_BLOCK_LAYERS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "proj_conv", "proj_bn")
_TORCH_LAYER = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}
_BN_LEAVES = (("params", "scale", "weight"), ("params", "bias", "bias"),
              ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var"))


def create_resnet(arch: str = "resnet50", num_classes: int = 1000, layout: str = "imagenet") -> nn.Module:
    """The zoo's model that torchvision's ``arch`` is, at width 1, in ``layout`` ("imagenet": torchvision's
    7x7 stride-2 stem and max-pool; "cifar": a 3x3 stride-1 stem, no max-pool)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown --arch {arch!r}: the converter knows {ARCHS}")
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    return create_model(arch, num_classes, layout=layout)


def check_batchnorm_conventions(model: nn.Module, image_size: int = 64) -> int:
    """Asserts that every BatchNorm of ``model`` uses PyTorch's defaults in Flax's terms (epsilon 1e-5,
    momentum 1 - 0.1), so converted statistics mean the same; returns how many there are."""
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            seen.append((module.epsilon, module.momentum))
        return next_fun(*args, **kwargs)

    variables = abstract_variables(model, image_size)  # the checks run as the model is traced
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    wrong = {(e, m) for e, m in seen if (e, m) != (TORCH_BN_EPSILON, 1.0 - TORCH_BN_MOMENTUM)}
    assert seen and not wrong, (f"BatchNorm (epsilon, momentum) {sorted(wrong)} differ from PyTorch's "
                                f"defaults ({TORCH_BN_EPSILON}, 1 - {TORCH_BN_MOMENTUM}) in Flax's terms")
    return len(seen)


def _torch_module(flax_module: str) -> str:
    if flax_module == "stem_conv":
        return "conv1"
    if flax_module == "stem_bn":
        return "bn1"
    if flax_module == "head":
        return "fc"
    match = re.fullmatch(r"stage(\d+)_block(\d+)", flax_module)
    if not match:
        raise ValueError(f"no torchvision name for the module {flax_module!r}")
    return f"layer{match.group(1)}.{int(match.group(2)) - 1}"


def _block_order(name: str) -> tuple[int, ...]:
    if name in ("stem_conv", "stem_bn", "head"):
        return {"stem_conv": (0,), "stem_bn": (1,), "head": (9,)}[name]
    s, i = re.fullmatch(r"stage(\d+)_block(\d+)", name).groups()
    return (2, int(s), int(i))


@functools.lru_cache(maxsize=8)  # a model (a frozen dataclass) is hashable; tracing it takes a second
def torchvision_layout(model: nn.Module) -> list[tuple[str, tuple[str, ...], tuple[int, ...], str]]:
    """``(torch name, flax path, torch shape, kind)`` of every tensor torchvision's state_dict has for
    ``model`` except ``num_batches_tracked``, in torchvision's order; the flax path starts with the
    collection ("params" or "batch_stats"), kind is "conv", "linear" or "copy". Cached: do not modify."""
    variables = abstract_variables(model, 64)
    params, stats = variables["params"], variables["batch_stats"]
    rows = []
    for top in sorted(params, key=_block_order):
        torch_top = _torch_module(top)
        layers = [(top, torch_top, (top,))] if top in ("stem_conv", "stem_bn", "head") else [
            (layer, f"{torch_top}.{_TORCH_LAYER.get(layer, layer)}", (top, layer))
            for layer in _BLOCK_LAYERS if layer in params[top]]
        for flax_layer, torch_layer, path in layers:
            node = params
            for key in path:
                node = node[key]
            if flax_layer != "head" and "kernel" in node:  # a convolution
                h, w, i, o = node["kernel"].shape
                rows.append((f"{torch_layer}.weight", ("params", *path, "kernel"), (o, i, h, w), "conv"))
            elif flax_layer == "head":
                i, o = node["kernel"].shape
                rows.append(("fc.weight", ("params", *path, "kernel"), (o, i), "linear"))
                rows.append(("fc.bias", ("params", *path, "bias"), (o,), "copy"))
            else:  # BatchNorm
                stat_node = stats
                for key in path:
                    stat_node = stat_node[key]
                for collection, leaf, torch_leaf in _BN_LEAVES:
                    shape = (node if collection == "params" else stat_node)[leaf].shape
                    rows.append((f"{torch_layer}.{torch_leaf}", (collection, *path, leaf), shape, "copy"))
    return rows


def expected_state_dict_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """torchvision's state_dict names and shapes for ``model`` (without ``num_batches_tracked``)."""
    return {name: shape for name, _, shape, _ in torchvision_layout(model)}


def _shape_hint(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """What a tensor of another shape says about the checkpoint: its classes, or the other stem."""
    if name.startswith("fc."):
        return classes_hint(got, want)
    if name == "conv1.weight" and got[2:] != want[2:]:
        return f"; a {got[2]}x{got[3]} stem is the other layout ({'cifar' if got[2] == 3 else 'imagenet'})"
    return ""


def torchvision_to_variables(state_dict: Mapping[str, Any], model: nn.Module,
                             source: str = "the checkpoint") -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``model`` (float32 jax arrays) from a torchvision ResNet
    state_dict (numpy arrays, or anything ``np.asarray`` takes, e.g. torch CPU tensors).

    Raises :class:`CheckpointError` naming the first name that does not fit: walking torchvision's names
    in its order, the first missing one or the first whose shape differs; then the first name of the
    checkpoint (in its order) that the architecture does not have.
    """
    layout = torchvision_layout(model)
    placement = {name: (path, kind) for name, path, _, kind in layout}
    batchnorms = {name.rsplit(".", 1)[0] for name in placement if name.endswith(".running_var")}

    def batch_counter(name: str) -> bool:
        """BatchNorm's step counter: not part of the inference computation."""
        module, _, leaf = name.rpartition(".")
        return leaf == NUM_BATCHES_TRACKED and module in batchnorms and np.asarray(state_dict[name]).size == 1

    what = "it is not a torchvision ResNet-50 state_dict"
    how = "Convert the state_dict of torchvision.models.resnet50 (or of a model with its parameter names)"
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    tensors = matched_tensors(
        state_dict, [(name, shape) for name, _, shape, _ in layout], source=source,
        arch=f"torchvision's resnet50 ({model.layout} layout, {model.num_classes} classes)",
        missing=f"{what}, or a partial one. {how}",
        unexpected=f"{what} (another architecture, or extra modules). {how}",
        shape_hint=_shape_hint, ignored=batch_counter)
    for name, value in tensors:
        path, kind = placement[name]
        if kind == "conv":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "linear":
            value = value.T  # (out, in) -> (in, out)
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(value))
    return variables
