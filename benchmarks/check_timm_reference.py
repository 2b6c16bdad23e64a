"""Checks tests/vit_reference.py against the real timm, once (not in CI: the tests need torch alone).
Run with a Python that has torch and timm:

    <python with torch and timm> benchmarks/check_timm_reference.py

It asserts that the reference's state_dict has exactly timm.create_model('deit_{tiny,small,base}_patch16_224',
pretrained=False)'s names, in the same order, with the same shapes and dtypes, and that with timm's
(random) weights loaded into the reference both give the same logits in eval mode (max abs difference
printed; timm may compute attention with torch's fused scaled_dot_product_attention, so the difference
is rounding, not 0), at 224x224 for DeiT-Ti and at a reduced depth for S and B.

End to end through files, real timm -> alite_jax.convert (two Pythons, as timm and JAX live in different
environments):

    <timm python> benchmarks/check_timm_reference.py --export=timm_dump
    python benchmarks/check_timm_reference.py --compare=timm_dump

The first also saves a randomly initialised timm deit_tiny_patch16_224 as deit.pth (torch.save) and
deit.safetensors with its logits on random 224x224 images; the second converts both files with
alite_jax.convert (no torch) and prints the max abs differences of the logits (float32; asserted < 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
ARCHS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def randomised_timm(arch: str, seed: int, **kwargs):
    """timm's model, its weights drawn by timm's own init, plus random biases and LayerNorm affine
    parameters (timm initialises those to 0 and 1), so no mapping is checked on zeros or ones."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            elif "norm" in name and name.endswith(".weight"):
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name in ("cls_token", "pos_embed"):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def check_reference() -> None:
    import timm
    import torch
    from vit_reference import deit

    print(f"torch {torch.__version__}, timm {timm.__version__}")
    for arch in ARCHS:
        real, ref = timm.create_model(arch, pretrained=False), deit(arch)
        real_sd, ref_sd = real.state_dict(), ref.state_dict()
        assert list(real_sd) == list(ref_sd), (arch, set(real_sd) ^ set(ref_sd))
        for name in real_sd:
            assert real_sd[name].shape == ref_sd[name].shape, (name, real_sd[name].shape, ref_sd[name].shape)
            assert real_sd[name].dtype == ref_sd[name].dtype, (name, real_sd[name].dtype, ref_sd[name].dtype)
        count = sum(v.numel() for v in real_sd.values())
        print(f"{arch}: {len(real_sd)} state_dict entries, names, order, shapes and dtypes equal; "
              f"{count:,} parameters")
    for arch, depth in (("deit_tiny_patch16_224", 12), ("deit_small_patch16_224", 2),
                        ("deit_base_patch16_224", 1)):
        real = randomised_timm(arch, seed=1, depth=depth)
        ref = deit(arch, depth=depth).eval()
        ref.load_state_dict(real.state_dict(), strict=True)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            real_logits, ref_logits = real(x), ref(x)[0]
        diff = float((real_logits - ref_logits).abs().max())
        print(f"{arch} (depth {depth}), 224x224: max abs logit difference {diff:.3g} "
              f"(max |logit| {float(real_logits.abs().max()):.3g})")
        assert diff < 1e-4, diff
    print("OK: tests/vit_reference.py is timm's deit_*_patch16_224")


def export(directory: str) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model = randomised_timm("deit_tiny_patch16_224", seed=5)
    torch.save(model.state_dict(), os.path.join(directory, "deit.pth"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "deit.safetensors"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    np.savez(os.path.join(directory, "outputs.npz"), x=x.numpy().transpose(0, 2, 3, 1), logits=logits.numpy())
    print(f"wrote deit.pth, deit.safetensors and outputs.npz to {directory} (torch {torch.__version__})")


def compare(directory: str) -> None:
    sys.path.insert(0, ROOT)
    from alite_jax import convert

    outputs = np.load(os.path.join(directory, "outputs.npz"))
    for name in ("deit.pth", "deit.safetensors"):
        model, variables = convert.convert_checkpoint(os.path.join(directory, name), "timm",
                                                      "deit_tiny_patch16_224")
        logits, _ = model.apply(variables, outputs["x"], train=False)
        diff = float(np.abs(np.asarray(logits) - outputs["logits"]).max())
        print(f"{name}: max abs logit difference {diff:.3g} (max |logit| "
              f"{float(np.abs(outputs['logits']).max()):.3g})")
        assert diff < 1e-4, diff
    print("OK: real timm DeiT-Ti weights convert to the same logits")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", help="also save a timm deit_tiny_patch16_224 and its logits here")
    parser.add_argument("--compare", help="convert the files --export wrote and compare (no torch needed)")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        check_reference()
        if args.export:
            export(args.export)
