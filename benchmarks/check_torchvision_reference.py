"""Checks tests/torchvision_reference.py against the real torchvision, once (not in CI: torchvision needs
a CUDA torch build of several GB). Run with a Python that has torch and torchvision:

    <python with torch and torchvision> benchmarks/check_torchvision_reference.py

It asserts that the reference's state_dict has exactly torchvision.models.resnet50()'s names, in the same
order, with the same shapes and dtypes (num_batches_tracked included), for 1000 and for 10 classes, and
that with torchvision's (random, BN-randomised) weights loaded into the reference both give identical
logits and stage outputs in eval mode (max abs difference 0, printed), at 224x224 and 64x64.

End to end through files, real torchvision -> alite_jax.convert (two Pythons, as torchvision and JAX live
in different environments):

    <torchvision python> benchmarks/check_torchvision_reference.py --export=tv_dump
    python benchmarks/check_torchvision_reference.py --compare=tv_dump

The first also saves a randomised torchvision resnet50 as tv.pth (torch.save) and tv.safetensors with its
outputs on random 64x64 images; the second converts both files with alite_jax.convert (no torch) and
prints the max abs differences of the logits and of layer1..layer4 (float32; asserted < 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def stages(model, x):
    """torchvision's forward, keeping layer1..layer4 (the same code path as its _forward_impl)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    features = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        features.append(x)
    return model.fc(model.avgpool(x).flatten(1)), tuple(features)


def check_reference() -> None:
    import torch
    import torchvision
    from torchvision_reference import ResNet50, randomize

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


def export(directory: str) -> None:
    import torch
    import torchvision
    from safetensors.torch import save_file
    from torchvision_reference import randomize

    os.makedirs(directory, exist_ok=True)
    model = randomize(torchvision.models.resnet50(), seed=5, image_size=64)
    torch.save(model.state_dict(), os.path.join(directory, "tv.pth"))
    save_file(model.state_dict(), os.path.join(directory, "tv.safetensors"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = stages(model, x)
    np.savez(os.path.join(directory, "outputs.npz"), x=x.numpy().transpose(0, 2, 3, 1), logits=logits.numpy(),
             **{f"layer{s}": f.numpy().transpose(0, 2, 3, 1) for s, f in enumerate(features, 1)})
    print(f"wrote tv.pth, tv.safetensors and outputs.npz to {directory} (torch {torch.__version__})")


def compare(directory: str) -> None:
    sys.path.insert(0, ROOT)
    from alite_jax import convert

    outputs = np.load(os.path.join(directory, "outputs.npz"))
    for name in ("tv.pth", "tv.safetensors"):
        model, variables = convert.convert_checkpoint(os.path.join(directory, name))
        logits, features = model.apply(variables, outputs["x"], train=False)
        diffs = {"logits": float(np.abs(np.asarray(logits) - outputs["logits"]).max())}
        diffs.update({f"layer{s}": float(np.abs(np.asarray(f) - outputs[f"layer{s}"]).max())
                      for s, f in enumerate(features, 1)})
        print(f"{name}: max abs differences {', '.join(f'{k} {v:.3g}' for k, v in diffs.items())}")
        assert max(diffs.values()) < 1e-4, diffs
    print("OK: real torchvision weights convert to the same outputs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", help="also save a torchvision resnet50 and its outputs here")
    parser.add_argument("--compare", help="convert the files --export wrote and compare (no torch needed)")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        check_reference()
        if args.export:
            export(args.export)
