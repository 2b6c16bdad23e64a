"""A torch reference model (tests/torchvision_reference.py, tests/vit_reference.py) against the zoo's
converted model: the state_dict the converters take, and how far the outputs are apart."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import torch


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as numpy arrays: what the checkpoint readers return."""
    return {name: value.numpy() for name, value in module.state_dict().items()}


def relative_error(ours: Any, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: the error in units of the tensor's own scale, so that a
    bound holds whatever the random weights make that scale."""
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def max_differences(torch_model: torch.nn.Module, model: nn.Module, variables: Any, size: int, seed: int = 0,
                    feature: str = "block{}", first: int = 0) -> tuple[dict[str, float], np.ndarray]:
    """Relative errors (:func:`relative_error`) of the logits and of each intermediate output
    (``feature`` numbered from ``first``, as the torch model names them) on a batch of two random
    ``size``-square images; and the zoo's logits. Both models return ``(logits, features)``; a 4-d torch
    feature is NCHW and is compared as NHWC."""
    x = np.random.RandomState(seed).randn(2, size, size, 3).astype(np.float32)
    logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        ref_logits, ref_features = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    diffs = {"logits": relative_error(logits, ref_logits.numpy())}
    for i, (a, b) in enumerate(zip(features, ref_features, strict=True), first):
        b = b.numpy()
        if b.ndim == 4:
            b = b.transpose(0, 2, 3, 1)
        assert a.shape == b.shape, (feature.format(i), a.shape, b.shape)
        diffs[feature.format(i)] = relative_error(a, b)
    return diffs, np.asarray(logits)
