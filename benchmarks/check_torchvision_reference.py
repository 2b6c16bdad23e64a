"""Checks tests/torchvision_reference.py against the real torchvision, once (not in CI: torchvision needs
a CUDA torch build of several GB). Run with a Python that has torch and torchvision:

    /work/exp/venv-ref/bin/python benchmarks/check_torchvision_reference.py

It asserts that the reference's state_dict has exactly torchvision.models.resnet50()'s names, in the same
order, with the same shapes and dtypes (num_batches_tracked included), for 1000 and for 10 classes, and
that with torchvision's (random, BN-randomised) weights loaded into the reference both give identical
logits and stage outputs in eval mode (max abs difference 0, printed), at 224x224 and 64x64.
"""

from __future__ import annotations

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from torchvision_reference import ResNet50, randomize


def stages(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """torchvision's forward, keeping layer1..layer4 (the same code path as its _forward_impl)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    features = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        features.append(x)
    return model.fc(torch.flatten(model.avgpool(x), 1)), tuple(features)


def main() -> None:
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    for num_classes in (1000, 10):
        real = torchvision.models.resnet50(num_classes=num_classes)
        ref = ResNet50(num_classes)
        real_sd, ref_sd = real.state_dict(), ref.state_dict()
        assert list(real_sd) == list(ref_sd), "names or order differ"
        for name in real_sd:
            assert real_sd[name].shape == ref_sd[name].shape, (name, real_sd[name].shape, ref_sd[name].shape)
            assert real_sd[name].dtype == ref_sd[name].dtype, (name, real_sd[name].dtype, ref_sd[name].dtype)
        print(f"{num_classes} classes: {len(real_sd)} state_dict entries, names, order, shapes and dtypes "
              f"equal")
    real = randomize(torchvision.models.resnet50(), seed=1)
    ref = ResNet50().eval()
    ref.load_state_dict(real.state_dict(), strict=True)
    torch.manual_seed(0)
    for size in (224, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            real_logits = real(x)
            logits_via_stages, real_features = stages(real, x)
            ref_logits, ref_features = ref(x)
        assert torch.equal(real_logits, logits_via_stages)
        diffs = [float((real_logits - ref_logits).abs().max())]
        diffs += [float((a - b).abs().max()) for a, b in zip(real_features, ref_features)]
        print(f"{size}x{size}: max abs difference logits {diffs[0]:.3g}, layer1..4 "
              f"{', '.join(f'{d:.3g}' for d in diffs[1:])}")
        assert max(diffs) == 0.0, diffs
    print("OK: tests/torchvision_reference.py is torchvision's resnet50")


if __name__ == "__main__":
    main()
