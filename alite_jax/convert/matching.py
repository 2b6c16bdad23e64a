"""A checkpoint's state_dict against the names and shapes an architecture expects: the check both
converters (torchvision, timm) make before they place a tensor, so that a file that does not fit is
refused with the first name that differs and what to do about it."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from alite_jax.convert.readers import CheckpointError


def no_hint(*_: Any) -> str:
    """The hint of a converter that has none to add."""
    return ""


def classes_hint(got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """The hint for a classifier tensor of another shape: when only its first axis (the classes)
    differs, the ``--num_classes`` to pass."""
    return f"; it has {got[0]} classes: pass --num_classes={got[0]}" if got[1:] == want[1:] else ""


def matched_tensors(state_dict: Mapping[str, Any], expected: Iterable[tuple[str, tuple[int, ...]]], *,
                    source: str, arch: str, missing: str, unexpected: str,
                    shape_hint: Callable[[str, tuple[int, ...], tuple[int, ...]], str] = no_hint,
                    unexpected_hint: Callable[[str], str] = no_hint,
                    ignored: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, float32 numpy array)`` for each ``(name, shape)`` of ``expected``, in its order,
    once the checkpoint's tensor of that name is found to fit; after the last, checks that the checkpoint
    holds no other name (but the ``ignored`` ones). Consume it to the end: the last check runs then.

    Raises :class:`CheckpointError` at the first name that does not fit, each message naming ``source``
    (the file) and ``arch`` (the architecture, in words):

    * a missing name: ``"<source> has no <name>, which <arch> has (shape ...): <missing>"``;
    * another shape: ``"<source>: <name> has shape ..., but <arch> has ...<shape_hint(name, got, want)>"``
      (the hint, e.g. the flag to pass, starts with ``"; "``);
    * a tensor that is not floating point;
    * a name the architecture does not have: ``"<source> has <name>, which <arch> has
      not<unexpected_hint(name)>: <unexpected>"``.
    """
    known = set()
    for name, shape in expected:
        known.add(name)
        if name not in state_dict:
            raise CheckpointError(f"{source} has no {name!r}, which {arch} has (shape {shape}): {missing}")
        value = np.asarray(state_dict[name])
        if value.shape != shape:
            raise CheckpointError(f"{source}: {name!r} has shape {value.shape}, but {arch} has "
                                  f"{shape}{shape_hint(name, value.shape, shape)}")
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise CheckpointError(f"{source}: {name!r} is {value.dtype}, not floating point")
        yield name, value.astype(np.float32)
    for name in state_dict:
        if name not in known and not ignored(name):
            raise CheckpointError(f"{source} has {name!r}, which {arch} has not{unexpected_hint(name)}: "
                                  f"{unexpected}")
