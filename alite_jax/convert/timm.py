"""timm's DeiT / ViT state_dict -> this zoo's ViT variables ``{"params", "batch_stats": {}}``.

The architectures are the same network (docs/convert.md, docs/architectures.md): timm's
``deit_{tiny,small,base}_patch16_224`` (timm/models/deit.py registers them as its ``VisionTransformer``
of timm/models/vision_transformer.py; facebookresearch/deit releases the same weights, wrapped under
``"model"``) is :func:`alite_jax.models.create_model` ``("deit_tiny" | "deit_small" | "deit_base",
num_classes, image_size=...)``. Names map module by module, tensor by tensor:

==================================  ============================================  ======================
timm                                this zoo (params/...)                         tensor
==================================  ============================================  ======================
``cls_token``, ``pos_embed``        ``cls_token``, ``pos_embed``                  copied
``patch_embed.proj.weight/bias``    ``patch_embed/kernel``, ``bias``              OIHW -> HWIO; copied
``blocks.{i}.norm{k}.weight/bias``  ``block{i}/norm{k}/scale``, ``bias``          copied
``blocks.{i}.attn.qkv.weight``      ``block{i}/attn/qk/kernel``, ``.../v/kernel``  rows [0:2D], [2D:3D],
                                                                                  each transposed
``blocks.{i}.attn.qkv.bias``        ``block{i}/attn/qk/bias``, ``.../v/bias``      [0:2D] and [2D:3D]
``blocks.{i}.attn.proj``            ``block{i}/attn/proj``                        as a Linear
``blocks.{i}.mlp.fc1``, ``fc2``     ``block{i}/fc1``, ``block{i}/fc2``            as a Linear
``norm.weight/bias``                ``norm/scale``, ``bias``                      copied
``head.weight/bias``                ``head/kernel``, ``bias``                     (out, in) -> (in, out)
==================================  ============================================  ======================

(A Linear's ``weight`` (out, in) is the Dense ``kernel`` (in, out).)

The fused ``qkv`` splits this way because timm's ``Attention.forward`` reshapes its output to
``(B, N, 3, heads, head_dim)`` and unbinds q, k, v along the 3: rows [0:D] are q, [D:2D] k, [2D:3D] v,
each head-major, which is the order the zoo's ``qk`` (reshaped to (B, N, 2, heads, head_dim)) and ``v``
read them in. Values are cast to float32, otherwise unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from alite_jax.convert.matching import classes_hint, matched_tensors
from alite_jax.convert.readers import CheckpointError
from alite_jax.models import VisionTransformer, abstract_variables, create_model

# timm's names -> the zoo's.
ARCHS = {"deit_tiny_patch16_224": "deit_tiny", "deit_small_patch16_224": "deit_small",
         "deit_base_patch16_224": "deit_base"}

Transform = Callable[[np.ndarray], np.ndarray]
_COPY: Transform = lambda v: v  # noqa: E731
_LINEAR: Transform = lambda v: v.T  # noqa: E731  (out, in) -> (in, out)
_CONV: Transform = lambda v: v.transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO


def create_vit(arch: str = "deit_tiny_patch16_224", num_classes: int = 1000, image_size: int = 224
               ) -> VisionTransformer:
    """The zoo's model that timm's ``arch`` is, for ``image_size`` images (the position embedding's
    length; the converted checkpoint must have been trained at that size)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown --arch {arch!r} for --from=timm: the converter knows {tuple(ARCHS)}")
    if num_classes < 1:
        raise CheckpointError(f"--num_classes must be >= 1, got {num_classes}")
    try:
        return create_model(ARCHS[arch], num_classes, image_size=image_size)
    except ValueError as e:
        raise CheckpointError(f"--image_size={image_size}: {e}") from e


def _linear(torch_name: str, path: tuple[str, ...], d_in: int, d_out: int) -> list:
    return [(f"{torch_name}.weight", (d_out, d_in), [(path + ("kernel",), _LINEAR)]),
            (f"{torch_name}.bias", (d_out,), [(path + ("bias",), _COPY)])]


def _norm(torch_name: str, path: tuple[str, ...], d: int) -> list:
    return [(f"{torch_name}.weight", (d,), [(path + ("scale",), _COPY)]),
            (f"{torch_name}.bias", (d,), [(path + ("bias",), _COPY)])]


@functools.lru_cache(maxsize=8)
def timm_layout(model: VisionTransformer) -> list[tuple[str, tuple[int, ...], list[tuple[tuple[str, ...],
                                                                                          Transform]]]]:
    """``(timm name, timm shape, [(params path, transform), ...])`` of every tensor of timm's state_dict
    for ``model``, in timm's order; ``qkv`` has two targets (``qk`` and ``v``). Cached: do not modify."""
    d, p, h = model.dim, model.patch_size, int(model.dim * model.mlp_ratio)
    rows: list = [("cls_token", (1, 1, d), [(("cls_token",), _COPY)]),
                  ("pos_embed", (1, model.num_patches + 1, d), [(("pos_embed",), _COPY)]),
                  ("patch_embed.proj.weight", (d, 3, p, p), [(("patch_embed", "kernel"), _CONV)]),
                  ("patch_embed.proj.bias", (d,), [(("patch_embed", "bias"), _COPY)])]
    for i in range(model.depth):
        t, f = f"blocks.{i}", (f"block{i}",)
        rows += _norm(f"{t}.norm1", f + ("norm1",), d)
        rows += [(f"{t}.attn.qkv.weight", (3 * d, d), [(f + ("attn", "qk", "kernel"), lambda v: v[:2 * d].T),
                                                       (f + ("attn", "v", "kernel"), lambda v: v[2 * d:].T)]),
                 (f"{t}.attn.qkv.bias", (3 * d,), [(f + ("attn", "qk", "bias"), lambda v: v[:2 * d]),
                                                   (f + ("attn", "v", "bias"), lambda v: v[2 * d:])])]
        rows += _linear(f"{t}.attn.proj", f + ("attn", "proj"), d, d)
        rows += _norm(f"{t}.norm2", f + ("norm2",), d)
        rows += _linear(f"{t}.mlp.fc1", f + ("fc1",), d, h)
        rows += _linear(f"{t}.mlp.fc2", f + ("fc2",), h, d)
    rows += _norm("norm", ("norm",), d)
    rows += _linear("head", ("head",), d, model.num_classes)
    return rows


def expected_state_dict_shapes(model: VisionTransformer) -> dict[str, tuple[int, ...]]:
    """timm's state_dict names and shapes for ``model``, in timm's order."""
    return {name: shape for name, shape, _ in timm_layout(model)}


def _arch_name(model: VisionTransformer) -> str:
    arch = {v: k for k, v in ARCHS.items()}.get(
        {192: "deit_tiny", 384: "deit_small", 768: "deit_base"}.get(model.dim, ""), "a ViT")
    return (f"timm's {arch} ({model.image_size}x{model.image_size} images, {model.num_classes} classes, "
            f"depth {model.depth})")


def _shape_hint(model: VisionTransformer, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """What a tensor of another shape says about the checkpoint: its classes, its image size, or another
    width."""
    if name.startswith("head."):
        hint = classes_hint(got, want)
        if hint:
            return hint
    if name == "pos_embed" and len(got) == 3 and got[2] == want[2]:
        side = int(round((got[1] - 1) ** 0.5)) * model.patch_size
        return f"; its {got[1] - 1} patches are {side}x{side} images: pass --image_size={side}"
    if len(got) == len(want):
        return "; another width: check --arch (tiny 192, small 384, base 768)"
    return ""


def _unexpected_hint(name: str) -> str:
    """A distilled DeiT's extra tensors, named as such."""
    if name in ("dist_token", "head_dist.weight", "head_dist.bias"):
        return (" (a distilled DeiT: its distillation token and head are not part of this zoo's ViT; convert "
                "the non-distilled deit_*_patch16_224)")
    return ""


def timm_to_variables(state_dict: Mapping[str, Any], model: VisionTransformer,
                      source: str = "the checkpoint") -> dict[str, Any]:
    """``{"params", "batch_stats": {}}`` of ``model`` (float32 jax arrays) from a timm DeiT/ViT
    state_dict (numpy arrays, or anything ``np.asarray`` takes, e.g. torch CPU tensors).

    Raises :class:`CheckpointError` naming the first name that does not fit: walking timm's names in its
    order, the first missing one or the first whose shape differs; then the first name of the checkpoint
    (in its order) that the architecture does not have.
    """
    layout = timm_layout(model)
    targets = {name: name_targets for name, _, name_targets in layout}
    params: dict[str, Any] = {}
    tensors = matched_tensors(
        state_dict, [(name, shape) for name, shape, _ in layout], source=source, arch=_arch_name(model),
        missing="it is not a timm DeiT/ViT state_dict of this depth, or a partial one. Convert the "
                "state_dict of timm.create_model('<arch>') or of facebookresearch/deit's release",
        unexpected="it is not a timm deit_*_patch16_224 state_dict of this depth (another architecture, or "
                   "extra modules)",
        shape_hint=functools.partial(_shape_hint, model), unexpected_hint=_unexpected_hint)
    for name, value in tensors:
        for path, transform in targets[name]:
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = jnp.asarray(np.ascontiguousarray(transform(value)))
    expected = jax.tree.map(lambda x: x.shape, abstract_variables(model, model.image_size)["params"])
    got = jax.tree.map(lambda x: x.shape, params)
    assert got == expected, "the timm layout does not cover the zoo's parameter tree"  # a bug, not input
    return {"params": params, "batch_stats": {}}
