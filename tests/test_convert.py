"""alite_jax.convert: torch-free checkpoint readers, torchvision ResNet-50 -> the zoo's variables, and the
converted teacher run directory.

No downloads: torchvision comes only with a CUDA torch build of several GB, so these tests use a CPU
torch (the ``test`` extra) and tests/torchvision_reference.py, a torch.nn copy of torchvision's
ResNet-50 with its parameter names and shapes (benchmarks/check_torchvision_reference.py checks it
against the real torchvision).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch_compare
from command_line import run_convert
from fake_imagenet import write_fake_imagenet
from torch_compare import numpy_state_dict
from torchvision_reference import ResNet50, randomize

from alite_jax import convert, methods, run_dir
from alite_jax.config import base_config
from alite_jax.convert import CheckpointError
from alite_jax.distributed import make_mesh
from alite_jax.errors import ConfigError
from alite_jax.methods import AttentionLite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Relative to each tensor's largest value (torch_compare.relative_error). The two frameworks sum each
# conv / matmul in another order: a dot product of K float32 terms moves by about sqrt(K) u relative
# (u = 2^-24; K up to 4608: 4e-6), and such errors add up over the network's ~50 layers to about 3e-5
# (their worst case, K u per layer, would be 3e-4 each). Measured on one CPU: 6.6e-6 at most (the
# ResNet's layer4). A conversion error (a transposed or swapped tensor, a wrong BatchNorm epsilon or
# LayerNorm) moves some output by 1e-3 of its scale or far more. So:
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    """A randomised torchvision ResNet-50 (1000 classes, eval mode) and its state_dict."""
    model = randomize(ResNet50(1000), seed=0, image_size=64)
    return model, numpy_state_dict(model)


@pytest.fixture(scope="module")
def imagenet_model():
    return convert.create_resnet("resnet50", 1000, "imagenet")


# The logits' and the four stage outputs' differences, the stages named as torchvision names them.
max_differences = functools.partial(torch_compare.max_differences, feature="layer{}", first=1)


# --------------------------------------------------------------------------------------------------
# The conversion: same outputs as the torch model.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_imagenet_layout_matches_torchvision_resnet50(reference, imagenet_model):
    torch_model, state_dict = reference
    variables = convert.torchvision_to_variables(state_dict, imagenet_model)
    diffs, logits = max_differences(torch_model, imagenet_model, variables, 64)
    print(f"\nimagenet layout, 1000 classes, 64x64, relative differences: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs
    assert np.abs(logits).max() > 1.0  # not a vacuous comparison of near-zero outputs


@pytest.mark.slow
def test_cifar_layout_matches_the_torchvision_like_cifar_variant():
    torch_model = randomize(ResNet50(10, cifar_stem=True), seed=1, image_size=32)
    model = convert.create_resnet("resnet50", 10, "cifar")
    variables = convert.torchvision_to_variables(numpy_state_dict(torch_model), model)
    diffs, _ = max_differences(torch_model, model, variables, 32, seed=1)
    print(f"\ncifar layout, 10 classes, 32x32, relative differences: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs


def test_the_mapping_covers_torchvision_names_and_drops_only_num_batches_tracked(reference, imagenet_model):
    _, state_dict = reference
    expected = convert.expected_state_dict_shapes(imagenet_model)
    assert list(expected) == [n for n in state_dict if not n.endswith("num_batches_tracked")]
    assert all(tuple(state_dict[n].shape) == s for n, s in expected.items())
    variables = convert.torchvision_to_variables(state_dict, imagenet_model)
    assert sum(x.size for x in jax.tree.leaves(variables)) == sum(
        state_dict[n].size for n in expected)  # every tensor, once
    # torchvision's published count for resnet50: 25,557,032 parameters.
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 25_557_032
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"],
                                  state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["stage2_block1"]["proj_bn"]["var"],
                                  state_dict["layer2.0.downsample.1.running_var"])


def test_batchnorm_conventions_are_pytorchs():
    assert convert.check_batchnorm_conventions(convert.create_resnet()) == 53  # stem + 16 x 3 + 4 proj
    # The running-mean update: PyTorch momentum 0.1 is Flax momentum 0.9. (The running variance differs
    # by the unbiased factor n / (n - 1): PyTorch keeps the unbiased batch variance. Inference uses the
    # stored statistics only, so a converted teacher computes the same.)
    import flax.linen as nn
    x = np.random.RandomState(0).randn(8, 4, 4, 3).astype(np.float32)
    bn = torch.nn.BatchNorm2d(3).train()
    bn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), x)
    _, updated = flax_bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(updated["batch_stats"]["mean"], bn.running_mean.numpy(), atol=1e-6)
    n = x.size // 3  # values per channel
    unbiased = 0.9 + (np.asarray(updated["batch_stats"]["var"]) - 0.9) * n / (n - 1)
    np.testing.assert_allclose(unbiased, bn.running_var.numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Files: torch.save (plain, wrapped, DataParallel) and safetensors, read without torch.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "model", "state_dict", "data_parallel", "safetensors"])
@pytest.mark.slow
def test_files_round_trip(reference, imagenet_model, tmp_path, form):
    torch_model, state_dict = reference
    tensors = torch_model.state_dict()
    if form == "safetensors":
        path = str(tmp_path / "weights.safetensors")
        safetensors.numpy.save_file(state_dict, path)
    else:
        path = str(tmp_path / "weights.pth")
        obj = {"plain": tensors, "model": {"epoch": 90, "model": tensors, "best_acc1": 76.1},
               "state_dict": {"state_dict": tensors, "arch": "resnet50", "epoch": 3},
               "data_parallel": {f"module.{k}": v for k, v in tensors.items()}}[form]
        torch.save(obj, path)
    read = convert.read_state_dict(path)
    # safetensors keeps no insertion order (the data is sorted by dtype and name), torch.save does
    assert (sorted(read) if form == "safetensors" else list(read)) == (
        sorted(state_dict) if form == "safetensors" else list(state_dict))
    for name, value in state_dict.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    if form == "plain":  # the conversion of what was read (safetensors: in the teacher run test)
        model, variables = convert.convert_checkpoint(path, num_classes=1000)
        expected = convert.torchvision_to_variables(state_dict, imagenet_model)
        jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_torch_reader_rebuilds_views_offsets_and_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"transposed": base.t(), "offset_slice": base[1:, 2:5], "strided": base[:, ::2],
               "shared": base, "bf16": torch.randn(3, 2).to(torch.bfloat16),
               "f16": torch.randn(5).half(), "f64": torch.randn(2, 2, dtype=torch.float64),
               "i64": torch.tensor([1, -2, 3]), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(7), "empty": torch.zeros(0, 3)}
    path = str(tmp_path / "views.pt")
    torch.save(tensors, path)
    read = convert.read_state_dict(path)
    for name, value in tensors.items():
        expected = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        got = read[name].astype(np.float32) if value.dtype == torch.bfloat16 else read[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert read["bf16"].dtype.name == "bfloat16"


def test_unsafe_or_unreadable_files_are_refused(reference, tmp_path):
    small = {"w": torch.ones(2)}
    path = str(tmp_path / "with_args.pth")
    torch.save({"model": small, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*torch\.save\(model\.state_dict\(\)"):
        convert.read_state_dict(path)
    path = str(tmp_path / "legacy.pth")
    torch.save(small, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy serialization format.*re-save it with torch.save"):
        convert.read_state_dict(path)
    path = str(tmp_path / "module.pth")
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not its state_dict
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        convert.read_state_dict(path)
    path = str(tmp_path / "nested.pth")
    torch.save({"weights": small, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="'weights' is a dict, not a tensor"):
        convert.read_state_dict(path)
    path = tmp_path / "truncated.safetensors"
    safetensors.numpy.save_file({"w": np.ones(100, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        convert.read_state_dict(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        convert.read_state_dict(str(tmp_path / "missing.pth"))


def test_mismatches_are_refused_with_the_first_mismatching_name(reference, imagenet_model):
    _, state_dict = reference
    missing = {k: v for k, v in state_dict.items() if k not in ("layer2.1.bn2.running_var", "fc.bias")}
    with pytest.raises(CheckpointError, match=r"has no 'layer2\.1\.bn2\.running_var'.*shape \(128,\)"):
        convert.torchvision_to_variables(missing, imagenet_model)
    wrong = dict(state_dict, **{"layer3.0.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"'layer3\.0\.conv2\.weight' has shape \(256, 256, 1, 1\), "
                                              r"but .* has \(256, 256, 3, 3\)"):
        convert.torchvision_to_variables(wrong, imagenet_model)
    with pytest.raises(CheckpointError, match="'fc.weight' has shape .* pass --num_classes=1000"):
        convert.torchvision_to_variables(state_dict, convert.create_resnet("resnet50", 10, "imagenet"))
    with pytest.raises(CheckpointError, match=r"7x7 stem is the other layout \(imagenet\)"):
        convert.torchvision_to_variables(state_dict, convert.create_resnet("resnet50", 1000, "cifar"))
    extra = dict(state_dict, **{"layer1.0.se.fc.weight": np.zeros(3, np.float32),
                                "layer5.0.conv1.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"has 'layer1\.0\.se\.fc\.weight', which .* has not"):
        convert.torchvision_to_variables(extra, imagenet_model)
    no_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    convert.torchvision_to_variables(no_counters, imagenet_model)  # optional: safetensors exports drop them


# --------------------------------------------------------------------------------------------------
# The converted teacher run directory.
# --------------------------------------------------------------------------------------------------


def distill_config(teacher_workdir: str, dataset="imagenet2012", image_size=224):
    config = base_config()
    config.model.layout = "imagenet"
    config.data.dataset, config.data.image_size = dataset, image_size
    config.data.normalization = "imagenet"
    config.teacher.workdir = teacher_workdir
    return config


@pytest.fixture(scope="module")
def safetensors_file(reference, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "resnet50.safetensors")
    safetensors.numpy.save_file(reference[1], path)
    return path


@pytest.mark.slow
def test_teacher_run_loads_and_is_accepted_by_a_distillation(reference, safetensors_file, tmp_path):
    torch_model, _ = reference
    path = safetensors_file
    model, variables = convert.convert_checkpoint(path)
    workdir = str(tmp_path / "teacher")
    said = []
    summary = convert.write_teacher_run(workdir, model, variables, checkpoint=path, say=said.append)
    assert run_dir.is_finished_run(workdir) and not said
    assert summary["converted_from"]["source"] == "torchvision"
    AttentionLite(distill_config(workdir), 1000).check_inputs()
    with pytest.raises(ConfigError, match="takes 224px images, the student 64px"):
        AttentionLite(distill_config(workdir, image_size=64), 1000).check_inputs()
    config = run_dir.read_run_config(workdir)
    assert config["model"] == dict(name="resnet50", layout="imagenet", width=1.0, dtype="float32")
    assert (config["data"]["dataset"], config["data"]["image_size"], config["num_classes"],
            config["channels"]) == ("imagenet2012", 224, 1000, 3)
    assert (config["data"]["normalization"], config["data"]["augment"]) == ("imagenet", "imagenet")
    # A student normalising its images otherwise than the converted weights expect is refused.
    with pytest.raises(ConfigError, match="normalised with data.normalization='imagenet'"):
        student = distill_config(workdir)
        student.data.normalization = "dataset"
        AttentionLite(student, 1000).check_inputs()
    stored = run_dir.read_summary(workdir)
    assert stored["converted_from"]["checkpoint"] == os.path.abspath(path)
    assert stored["converted_from"]["file_format"] == "safetensors" and stored["test_accuracy"] is None
    loaded_model, loaded = methods.load_run(workdir, make_mesh())
    assert loaded_model.layout == "imagenet"
    diffs, _ = max_differences(torch_model, loaded_model, loaded, 64)
    assert max(diffs.values()) < TOLERANCE, diffs
    with pytest.raises(ConfigError, match="multiples of 32"):
        convert.write_teacher_run(str(tmp_path / "odd"), model, variables, checkpoint=path, image_size=200)
    assert not os.path.exists(tmp_path / "odd")  # refused before anything is written
    # A second conversion replaces the first; a trained run's directory is never overwritten.
    convert.write_teacher_run(workdir, model, variables, checkpoint=path)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "summary.json").write_text(json.dumps({"mode": "teacher", "test_accuracy": 0.9}))
    with pytest.raises(run_dir.RunDirError, match="not a converted teacher; nothing was changed"):
        convert.write_teacher_run(str(trained), model, variables, checkpoint=path)


@pytest.mark.slow
def test_evaluate_writes_test_accuracy_or_says_the_data_is_missing(reference, safetensors_file, monkeypatch,
                                                                  tmp_path):
    """--evaluate on a fake ImageNet prepared by TFDS (JPEGs in the real tar layout): the accuracy written
    is the torch reference's on the same evaluation images (resized, centre-cropped, normalised by the
    pipeline); with the data set missing, one line says so."""
    import copy

    from alite_jax import data
    model, variables = convert.convert_checkpoint(safetensors_file)
    data_dir = tmp_path / "tfds"
    write_fake_imagenet(data_dir / "downloads" / "manual")
    # Both models favour the first validation image's class, so the accuracy is not trivially 0.
    favoured = data.open_split("imagenet2012", "validation", data_dir=str(data_dir)).records[0]["label"]
    torch_model = copy.deepcopy(reference[0])
    with torch.no_grad():
        torch_model.fc.bias[favoured] += 50.0
    bias = np.array(variables["params"]["head"]["bias"])
    bias[favoured] += 50.0
    variables["params"]["head"]["bias"] = bias
    summary = convert.write_teacher_run(str(tmp_path / "a"), model, variables, checkpoint=safetensors_file,
                                        image_size=32, evaluate=True, data_dir=str(data_dir),
                                        say=lambda line: None)
    config = ml_collections.ConfigDict(run_dir.read_run_config(str(tmp_path / "a")))
    config.data.batch_size = 1  # the 12 training images are not read
    pipe = data.create_input_pipeline(config.data)
    correct = count = 0
    for batch in pipe.eval_batches():
        mask = np.asarray(batch["mask"])
        with torch.no_grad():
            logits = torch_model(torch.from_numpy(np.asarray(batch["image"]).transpose(0, 3, 1, 2)))[0]
        correct += int(((logits.argmax(1).numpy() == np.asarray(batch["label"])) & mask).sum())
        count += int(mask.sum())
    assert count == pipe.num_eval_examples > 0 and correct > 0
    assert summary["test_accuracy"] == pytest.approx(correct / count)
    assert run_dir.read_summary(str(tmp_path / "a"))["test_accuracy"] == summary["test_accuracy"]

    def not_prepared(config, mesh):
        raise FileNotFoundError("data set 'imagenet2012' is not prepared in /nowhere")

    monkeypatch.setattr(data, "create_input_pipeline", not_prepared)
    said = []
    summary = convert.write_teacher_run(str(tmp_path / "b"), model, variables, checkpoint=safetensors_file,
                                        image_size=32, evaluate=True, say=said.append)
    assert summary["test_accuracy"] is None and run_dir.is_finished_run(str(tmp_path / "b"))
    assert len(said) == 1 and said[0].startswith("not evaluated: imagenet2012 is not available here")


def test_nothing_in_models_sparsity_or_data_imports_convert():
    for package in ("models", "sparsity", "data"):
        for folder, _, files in os.walk(os.path.join(ROOT, "alite_jax", package)):
            for name in (n for n in files if n.endswith(".py")):
                for line in open(os.path.join(folder, name)):
                    if line.lstrip().startswith(("import ", "from ")):
                        assert "convert" not in line, (os.path.join(folder, name), line)


# --------------------------------------------------------------------------------------------------
# The command line, end to end, without torch.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end_without_torch(reference, tmp_path):
    torch_model, state_dict = reference
    path = str(tmp_path / "resnet50.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in torch_model.state_dict().items()}}, path)
    workdir = str(tmp_path / "teacher")
    result = run_convert("--from=torchvision", "--arch=resnet50", f"--checkpoint={path}",
                         f"--workdir={workdir}", "--num_classes=1000", "--dataset=imagenet2012",
                         "--image_size=224")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "25,557,032 parameters" in result.stdout and "--config.teacher.workdir=" in result.stdout
    AttentionLite(distill_config(workdir), 1000).check_inputs()
    model, variables = methods.load_run(workdir, make_mesh())
    diffs, _ = max_differences(torch_model, model, variables, 64)
    assert max(diffs.values()) < TOLERANCE, diffs
    assert ml_collections.ConfigDict(run_dir.read_run_config(workdir)).model.layout == "imagenet"
    # User errors: one line, exit status 2.
    for flags, message in [((f"--checkpoint={path}", f"--workdir={tmp_path / 'x'}", "--num_classes=10"),
                            "pass --num_classes=1000"),
                           ((f"--checkpoint={tmp_path / 'none.pth'}", f"--workdir={tmp_path / 'z'}"),
                            "no checkpoint file"),
                           # before: absl's "FATAL Flags parsing error" and exit 1
                           ((f"--checkpoint={path}", f"--workdir={tmp_path / 'y'}", "--arch=resnet5"),
                            "flag --arch=resnet5: value should be one of"),
                           # a filesystem error: before, an OSError's traceback
                           ((f"--checkpoint={path}", f"--workdir={path}/teacher"), f"{path}/teacher")]:
        result = run_convert(*flags)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
