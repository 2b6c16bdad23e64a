"""alite_jax.convert --from=timm: timm's DeiT state_dict -> the zoo's ViT, files, the teacher run.

No timm here: tests/vit_reference.py is a torch.nn copy of timm's VisionTransformer with its names and
shapes (benchmarks/check_timm_reference.py checked it against timm 1.0.31). DeiT-Ti is compared at its
real width, heads, patch, 224x224 and 1000 classes, with 2 of its 12 blocks (the whole model takes
~13 s here; the benchmark compared the whole one with real timm).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from command_line import run_convert
from torch_compare import max_differences, numpy_state_dict
from vit_reference import deit, randomize

from alite_jax import convert, methods, run_dir
from alite_jax.convert import CheckpointError
from alite_jax.distributed import make_mesh
from alite_jax.models import create_model

# Relative to each tensor's largest value (torch_compare.relative_error). The two frameworks sum each
# conv / matmul in another order: a dot product of K float32 terms moves by about sqrt(K) u relative
# (u = 2^-24; K up to 4608: 4e-6), and such errors add up over the network's ~50 layers to about 3e-5
# (their worst case, K u per layer, would be 3e-4 each). Measured on one CPU: 6.6e-6 at most (the
# ResNet's layer4). A conversion error (a transposed or swapped tensor, a wrong BatchNorm epsilon or
# LayerNorm) moves some output by 1e-3 of its scale or far more. So:
TOLERANCE = 1e-4
ARCH = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny_reference():
    """deit_tiny_patch16_224 with 2 blocks, randomised, and the zoo's model of that shape."""
    torch_model = randomize(deit(ARCH, depth=2), seed=0)
    return torch_model, numpy_state_dict(torch_model), create_model("deit_tiny", 1000, depth=2)


@pytest.mark.slow
def test_deit_tiny_shape_matches_timm(tiny_reference):
    torch_model, state_dict, model = tiny_reference
    variables = convert.timm_to_variables(state_dict, model)
    diffs, logits = max_differences(torch_model, model, variables, 224)
    print(f"\ndeit_tiny (2 blocks), 224x224, 1000 classes, relative differences: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs
    assert np.abs(logits).max() > 1.0  # not a vacuous comparison of near-zero outputs


@pytest.mark.slow
def test_miniature_matches_timm():
    torch_model = randomize(deit(ARCH, img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                 num_classes=10), seed=1)
    model = create_model("deit_tiny", 10, image_size=32, patch_size=4, dim=64, depth=4, num_heads=4)
    variables = convert.timm_to_variables(numpy_state_dict(torch_model), model)
    diffs, _ = max_differences(torch_model, model, variables, 32, seed=1)
    print(f"\nminiature (32x32, patch 4, dim 64, 4 blocks, 4 heads), relative differences: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs


def test_the_mapping_covers_timm_names_and_splits_qkv(tiny_reference):
    _, state_dict, model = tiny_reference
    expected = convert.timm_state_dict_shapes(model)
    assert list(expected) == list(state_dict)
    assert all(tuple(state_dict[n].shape) == s for n, s in expected.items())
    assert list(convert.timm_state_dict_shapes(convert.create_vit(ARCH)))[-2:] == ["head.weight", "head.bias"]
    variables = convert.timm_to_variables(state_dict, model)
    assert variables["batch_stats"] == {}
    assert sum(x.size for x in jax.tree.leaves(variables)) == sum(v.size for v in state_dict.values())
    qkv, d = state_dict["blocks.1.attn.qkv.weight"], 192
    attn = variables["params"]["block1"]["attn"]
    np.testing.assert_array_equal(attn["qk"]["kernel"], qkv[:2 * d].T)  # q rows, then k rows
    np.testing.assert_array_equal(attn["v"]["kernel"], qkv[2 * d:].T)
    np.testing.assert_array_equal(attn["v"]["bias"], state_dict["blocks.1.attn.qkv.bias"][2 * d:])
    np.testing.assert_array_equal(variables["params"]["patch_embed"]["kernel"],
                                  state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("form", ["plain", "model", "safetensors"])
def test_files(tiny_reference, tmp_path, form):
    torch_model, state_dict, model = tiny_reference
    if form == "safetensors":
        path = str(tmp_path / "deit.safetensors")
        safetensors.numpy.save_file(state_dict, path)
    else:  # facebookresearch/deit's release files: {"model": state_dict}
        path = str(tmp_path / "deit.pth")
        tensors = torch_model.state_dict()
        torch.save(tensors if form == "plain" else {"model": tensors}, path)
    variables = convert.timm_to_variables(convert.read_state_dict(path), model, source=path)
    jax.tree.map(np.testing.assert_array_equal, variables, convert.timm_to_variables(state_dict, model))


def test_mismatches_are_refused_with_the_first_mismatching_name(tiny_reference):
    _, state_dict, model = tiny_reference
    missing = {k: v for k, v in state_dict.items() if k not in ("blocks.1.attn.qkv.bias", "head.bias")}
    with pytest.raises(CheckpointError, match=r"has no 'blocks\.1\.attn\.qkv\.bias'.*shape \(576,\)"):
        convert.timm_to_variables(missing, model)
    with pytest.raises(CheckpointError, match=r"'head\.weight' has shape \(1000, 192\).*--num_classes=1000"):
        convert.timm_to_variables(state_dict, create_model("deit_tiny", 10, depth=2))
    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 197, 192\).*--image_size=224"):
        convert.timm_to_variables(state_dict, create_model("deit_tiny", 1000, depth=2, image_size=384))
    with pytest.raises(CheckpointError, match=r"'cls_token' has shape \(1, 1, 192\).*check --arch"):
        convert.timm_to_variables(state_dict, create_model("deit_small", 1000, depth=2))
    extra = dict(state_dict, dist_token=np.zeros((1, 1, 192), np.float32))
    with pytest.raises(CheckpointError, match="has 'dist_token', which .* has not .*distilled DeiT"):
        convert.timm_to_variables(extra, model)
    with pytest.raises(CheckpointError, match=r"has 'blocks\.2\.norm1\.weight', which"):
        convert.timm_to_variables(numpy_state_dict(deit(ARCH, depth=3)), model)
    with pytest.raises(CheckpointError, match="unknown --arch 'vit_huge'"):
        convert.create_vit("vit_huge")


@pytest.mark.slow
def test_teacher_run(tiny_reference, tmp_path):
    torch_model, state_dict, model = tiny_reference
    path = str(tmp_path / "deit.safetensors")
    safetensors.numpy.save_file(state_dict, path)
    variables = convert.timm_to_variables(convert.read_state_dict(path), model)
    workdir = str(tmp_path / "teacher")
    summary = convert.write_teacher_run(workdir, model, variables, checkpoint=path, source="timm", arch=ARCH)
    assert summary["params"] == sum(v.size for v in state_dict.values()) and summary["model"] == "deit_tiny"
    config = run_dir.read_run_config(workdir)
    assert config["model"] == dict(name="deit_tiny", dtype="float32", depth=2)
    assert (config["data"]["dataset"], config["data"]["image_size"], config["data"]["normalization"],
            config["data"]["augment"], config["mode"]) == ("imagenet2012", 224, "imagenet", "deit", "teacher")
    loaded_model, loaded = methods.load_run(workdir, make_mesh())
    assert loaded_model == model
    diffs, _ = max_differences(torch_model, loaded_model, loaded, 224)
    assert max(diffs.values()) < TOLERANCE, diffs
    with pytest.raises(ValueError, match="built for 224x224"):
        convert.write_teacher_run(str(tmp_path / "odd"), model, variables, checkpoint=path, image_size=192)
    assert not os.path.exists(tmp_path / "odd")


@pytest.mark.slow
def test_cli_end_to_end_without_torch(tmp_path):
    torch_model = randomize(deit(ARCH), seed=3)
    path = str(tmp_path / "deit_tiny.pth")
    torch.save({"model": torch_model.state_dict(), "epoch": 299}, path)  # the official release layout
    workdir = str(tmp_path / "teacher")
    result = run_convert("--from=timm", f"--arch={ARCH}", f"--checkpoint={path}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5,717,416 parameters" in result.stdout and "--config.teacher.workdir=" in result.stdout
    model, variables = methods.load_run(workdir, make_mesh())
    diffs, _ = max_differences(torch_model, model, variables, 224)
    print(f"\nCLI, deit_tiny 224x224, 1000 classes: largest relative difference {max(diffs.values()):.3g}")
    assert max(diffs.values()) < TOLERANCE, diffs
    for flags, message in [((f"--checkpoint={path}", "--arch=deit_small_patch16_224"), "check --arch"),
                           ((f"--checkpoint={path}", "--num_classes=10"), "pass --num_classes=1000"),
                           ((f"--checkpoint={path}", "--image_size=200"), "positive multiples of 16"),
                           ((f"--checkpoint={path}", "--arch=resnet50"), "unknown --arch 'resnet50'")]:
        flags = ("--from=timm", f"--arch={ARCH}", f"--workdir={tmp_path / 'x'}") + flags
        result = run_convert(*flags)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
