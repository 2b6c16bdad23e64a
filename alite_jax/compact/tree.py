"""Nested dicts as flat ones and back: ``{"a": {"b": x}}`` <-> ``{"a/b": x}``.

The one flattener of the package: the compact artifacts and the sparse store write parameter trees as
flat {path: array} .npz files with it (``sep="/"``, the parameter paths flax prints), the SPViT
initialisation matches parameters by path with it, and a run's config is compared field by field as
dotted names (``sep="."``).
"""

from __future__ import annotations

from typing import Any, Mapping

SEP = "/"


def flatten(tree: Mapping[str, Any], sep: str = SEP) -> dict[str, Any]:
    """``{"a/b/c": leaf, ...}`` of a nested mapping, in the tree's order.

    A leaf is anything that is not a Mapping (an array, a number, a list); leaves are kept as they are.
    A nested Mapping (dict, flax's FrozenDict) is walked; an empty one leaves no entry, so
    :func:`unflatten` does not bring it back. Keys are joined with ``sep``.
    """
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}{sep}")
            else:
                flat[f"{prefix}{key}"] = value

    walk(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict[str, Any]:
    """The nested dict of plain dicts that :func:`flatten` flattened (keys split at ``sep``)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
