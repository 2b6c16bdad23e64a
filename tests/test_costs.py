"""Cost accounting: the paper's reference numbers, hand-computed masked counts, XLA cross-check, and the one
entry point that counts every zoo model by name (``model_costs`` and ``python -m alite_jax.costs``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from command_line import run_cli

from alite_jax import costs, sparsity
from alite_jax.compact.spvit import save_architecture
from alite_jax.models.spvit_compact import ARCH_FORMAT
from alite_jax.costs import count_costs, layer_costs, reductions
from alite_jax.models import (MODEL_NAMES, STUDENTS, VITS, abstract_variables, create_model, create_vit,
                              spvit_compact)
from alite_jax.models.spvit import supernet_of


@pytest.mark.slow
def test_reference_macs_and_reductions():
    teacher = count_costs(create_model("resnet50", 10), 32)
    assert teacher["macs"] == 1_297_829_888 and teacher["params"] == 23_520_842  # 1.298 G
    assert teacher["flops"] == 2 * teacher["macs"]
    sa26 = count_costs(create_model("sa_resnet26", 10), 32, density=0.1)
    sa38 = count_costs(create_model("sa_resnet38", 10), 32)
    assert sa26["macs"] == pytest.approx(0.695e9, rel=0.02)
    assert sa38["macs"] == pytest.approx(0.897e9, rel=0.02)
    r = reductions(sa26, teacher)
    assert r["param_reduction_paper"] == pytest.approx(28.3, abs=0.05)  # 23.52M / (8.31M x 0.1)
    # True non-zero count: 10% of the 8,263,360 prunable weights + 43,082 unpruned (BN, biases,
    # relative embeddings): 869,418, so 27.05x.
    assert sa26["params_nonzero"] == pytest.approx(826_336 + 43_082, abs=0.5)
    assert r["param_reduction_vs_teacher"] == pytest.approx(23_520_842 / 869_418, rel=1e-6)
    assert r["flops_reduction_dense_vs_teacher"] == pytest.approx(1.87, abs=0.01)
    # 4x the compute at 64x64 (Tiny-ImageNet keeps the stride-1 stem), up to the head.
    assert count_costs(create_model("resnet50", 200), 64)["macs"] == pytest.approx(
        4 * 1_297_829_888, rel=1e-3)


@pytest.mark.slow
def test_imagenet_layout_counts_against_published_ones():
    """torchvision's ResNet-50 at 224x224 (4.09 G multiply-adds, the usual "4.1 GFLOPs") and SASA's Table 1
    for the conv-stem SA-ResNet-26/38/50 at 224 (4.5 / 5.7 / 7.0 B FLOPs, 10.3M / 14.1M / 18.0M params)."""
    teacher = count_costs(create_model("resnet50", 1000, layout="imagenet"), 224)
    assert teacher["params"] == 25_557_032 and teacher["macs"] == 4_089_184_256
    layers = {layer["name"]: layer for layer in teacher["per_layer"]}
    # The stem at its output resolution (112x112); the max-pool costs nothing; stage 1 runs at 56x56.
    assert layers["stem_conv"]["macs"] == 112 * 112 * 7 * 7 * 3 * 64
    assert list(layers)[:2] == ["stem_conv", "stage1_block1/conv1"]
    assert layers["stage1_block1/conv1"]["macs"] == 56 * 56 * 64 * 64
    assert layers["stage2_block1/conv2"]["output_shape"] == [28, 28, 128]
    published = {"sa_resnet26": (10.3e6, 4.5e9, 2_242_155_520), "sa_resnet38": (14.1e6, 5.7e9, 2_862_657_024),
                 "sa_resnet50": (18.0e6, 7.0e9, 3_483_158_528)}
    for name, (params, flops, macs) in published.items():
        ours = count_costs(create_model(name, 1000, layout="imagenet"), 224)
        assert ours["macs"] == macs, name
        assert ours["params"] == pytest.approx(params, rel=0.01)
        assert ours["flops"] == pytest.approx(flops, rel=0.01)


@pytest.mark.slow  # full-size models
def test_counts_of_published_models():
    """The published reductions docs/costs.md compares with."""
    # The paper's Table 1 reductions by its arithmetic (teacher / (d x student params)).
    teacher = count_costs(create_model("resnet50", 10), 32)
    column = reductions(count_costs(create_model("sa_resnet26", 10), 32, density=0.5), teacher)
    assert column["param_reduction_paper"] == pytest.approx(5.66, abs=0.005)
    sparse = reductions(count_costs(create_model("sa_resnet26", 10), 32, density=0.1), teacher)
    assert sparse["flops_reduction_vs_teacher"] == pytest.approx(10.9, abs=0.05)
    tiny = reductions(count_costs(create_model("sa_resnet26", 200), 64, density=0.25),
                      count_costs(create_model("resnet50", 200), 64))
    assert tiny["param_reduction_paper"] == pytest.approx(11.0, abs=0.05)


def test_attention_layer_counted_by_the_convention():
    model = create_model("sa_resnet26", 10, width=0.25)  # stage 1 attention: 16 -> 16 at 32x32, k=7
    layers = {layer.name: layer for layer in layer_costs(model, 32)}
    assert layers["stage1_block1/attention"].macs == 32 * 32 * 3 * 49 * 16
    assert layers["stage1_block1/attention/query"].macs == 32 * 32 * 16 * 16
    # A downsampling block's attention is counted at its input resolution (32x32), before the pool.
    assert layers["stage2_block1/attention"].macs == 32 * 32 * 3 * 49 * 32
    assert layers["stage2_block1/attention"].output_shape == (16, 16, 32)
    assert layers["stem_conv"].macs == 32 * 32 * 27 * 16 and layers["head"].macs == 512 * 10


def test_masked_counts_on_hand_made_masks():
    model = create_model("sa_resnet26", 10, width=0.25)
    params = abstract_variables(model, 32)["params"]
    flags = sparsity.masks.prunable_tree(params)
    masks = jax.tree.map(lambda p, f: np.ones(p.shape if f else (), bool), params, flags)
    masks["stage1_block1"]["attention"]["query"]["kernel"] = jnp.zeros((16, 16), bool)
    stem = np.ones((3, 3, 3, 16), bool)
    stem[..., :8] = False  # half of the stem's weights
    masks["stem_conv"]["kernel"] = jnp.asarray(stem)
    dense = count_costs(model, 32)
    sparse = count_costs(model, 32, masks=masks)
    assert sparse["params"] == dense["params"]
    assert sparse["params_nonzero"] == dense["params"] - 256 - 216
    query_macs, stem_macs = 32 * 32 * 256, 32 * 32 * 27 * 16
    assert sparse["macs_sparse"] == pytest.approx(dense["macs"] - query_macs - stem_macs / 2)
    by_name = {layer["name"]: layer for layer in sparse["per_layer"]}
    assert by_name["stage1_block1/attention/query"]["macs_sparse"] == 0
    # Activation-activation products (q.k, q.r, attention.v) do not shrink with the weights.
    assert by_name["stage1_block1/attention"]["macs_sparse"] == 32 * 32 * 3 * 49 * 16
    assert sparse["flops_sparse"] == 2 * sparse["macs_sparse"]


@pytest.mark.slow
def test_dense_count_agrees_with_xla_cost_analysis():
    """XLA's count of the compiled forward pass, for the teacher.

    The two count differently, so the tolerance is a band: XLA skips the multiply-adds that fall on
    padding (a 3x3 convolution at 4x4 keeps only (10/12)^2 = 69% of its taps), which lowers its count,
    and adds BatchNorm, ReLU, residual additions and pooling, which raise it; at width 0.5 the net is
    0.96 of the analytic count. (For the students XLA counts the neighbourhood gather as a convolution
    with k^2 C one-hot filters, so its number says nothing about attention MACs: not compared.)
    """
    model = create_model("resnet50", 10, width=0.5)
    variables = abstract_variables(model, 32)
    compiled = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(
        variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    ratio = analysis["flops"] / count_costs(model, 32)["flops"]
    assert 0.92 < ratio < 1.0, ratio


def _cli(capsys, *argv: str) -> dict:
    """Runs the command line in this process with ``--json``; its JSON object."""
    costs.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def _cli_error(capsys, *argv: str) -> str:
    """Runs the command line expecting an error; its stderr, one line ``error: ...``, exit status 2."""
    with pytest.raises(SystemExit) as e:
        costs.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# Per zoo name: options of the command line (at 32x32, 10 classes) and the same model built directly.
def _small(name: str) -> tuple[list[str], object]:
    if name in VITS:
        return ["--patch_size=8", "--depth=2"], create_vit(name, 10, image_size=32, patch_size=8, depth=2)
    if name in STUDENTS:
        return ["--variant=homogeneous"], create_model(name, 10, variant="homogeneous")
    return ["--width=0.5"], create_model(name, 10, width=0.5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.slow
def test_cli_counts_every_zoo_model(capsys, name):
    options, model = _small(name)
    out = _cli(capsys, f"--model={name}", "--num_classes=10", "--image_size=32", *options)
    direct = count_costs(model, 32)
    assert (out["params"], out["flops"]) == (direct["params"], direct["flops"])
    assert out["model"] == name and out["image_size"] == 32 and out["num_classes"] == 10
    if name in VITS:  # SPViT's count beside ours; its parameter count of a dense DeiT is the model's
        assert out["spvit_params"] == out["params"] and out["spvit_macs"] > 0
    else:
        assert "spvit_macs" not in out


@pytest.mark.slow
def test_cli_counts_spvit_supernet_and_found_architectures(capsys, tmp_path):
    # The supernet computes every branch of its attention slot: the dense DeiT's count plus two conv slots
    # per block, (N - 1)(9 D hd + hd D) and (N - 1)(D hd + hd D).
    dense = create_vit("deit_tiny", 10, image_size=32, patch_size=8, depth=2)
    out = _cli(capsys, "--model=deit_tiny", "--supernet", "--image_size=32", "--patch_size=8", "--depth=2")
    assert out["params"] == count_costs(supernet_of(dense), 32)["params"]
    d, hd, n = 192, 64, 17
    assert out["macs"] == count_costs(dense, 32)["macs"] + 2 * (n - 1) * (9 * d * hd + d * hd + 2 * hd * d)
    assert out["options"]["supernet"] and "spvit_macs" not in out
    # The released SPViT-DeiT-Ti: folded, the compact model's count (vit_costs' "folded" convention); in
    # the fine-tuning form, SPViT's published 4,873,422, and SPViT's MACs beside ours.
    folded = _cli(capsys, "--model=deit_tiny", "--num_classes=1000", "--arch=spvit_deit_tiny")
    assert folded["params"] == 4_774_808 and folded["spvit_params"] == 4_873_422
    assert folded["spvit_macs"] == 1_036_705_536 and folded["arch_attention"][:3] == ["1x1", "1x1", "msa"]
    unfolded = _cli(capsys, "--model=deit_tiny", "--num_classes=1000", "--arch=spvit_deit_tiny", "--unfolded")
    assert unfolded["params"] == 4_873_422 and unfolded["options"]["folded"] is False
    # A search's architecture.json, by its run directory: its own shapes, classes and channels.
    blocks = [{"attention": k, "ffn_units": list(range(w))}
              for k, w in (("msa", 64), ("3x3", 9), ("skip", 0))]
    arch = {"format": ARCH_FORMAT, "image_size": 8, "patch_size": 2, "in_chans": 1, "dim": 16,
            "depth": 3, "num_heads": 2, "mlp_hidden": 64, "num_classes": 5, "blocks": blocks}
    save_architecture(tmp_path / "architecture.json", arch)
    out = _cli(capsys, "--model=deit_tiny", f"--arch={tmp_path}", "--unfolded")
    model = spvit_compact.CompactViT.from_architecture(arch, folded=False)
    direct = count_costs(model, 8, 1)
    assert (out["params"], out["flops"]) == (direct["params"], direct["flops"])
    assert (out["image_size"], out["num_classes"], out["channels"], out["options"]["dim"]) == (8, 5, 1, 16)
    # A disagreeing option is an error; an agreeing one is not.
    assert _cli(capsys, "--model=deit_tiny", f"--arch={tmp_path}", "--dim=16")["params"] == \
        count_costs(spvit_compact.CompactViT.from_architecture(arch), 8, 1)["params"]
    assert "fixes {'image_size': 8}" in _cli_error(capsys, "--model=deit_tiny", f"--arch={tmp_path}",
                                                   "--image_size=16")


def test_options_a_model_does_not_take_are_errors(capsys):
    err = _cli_error(capsys, "--model=deit_tiny", "--variant=hybrid")
    assert err == ("error: --variant does not apply to deit_tiny; its options are --patch_size --dim --depth "
                   "--num_heads --mlp_ratio --supernet --arch --unfolded\n")
    err = _cli_error(capsys, "--model=resnet50", "--layout=imagenet", "--patch_size=8", "--kernel_size=3")
    assert err.startswith("error: --kernel_size --patch_size do not apply to resnet50; its options are "
                          "--layout --width")
    assert "not a deit_small one" in _cli_error(capsys, "--model=deit_small", "--arch=spvit_deit_tiny")
    assert "exclude each other" in _cli_error(capsys, "--model=deit_tiny", "--supernet",
                                              "--arch=spvit_deit_tiny")
    assert "--unfolded" in _cli_error(capsys, "--model=deit_tiny", "--unfolded")
    # The model's own checks, as the same one-line error.
    assert "multiples of 8" in _cli_error(capsys, "--model=resnet50", "--image_size=30")
    assert "density" in _cli_error(capsys, "--model=resnet50", "--density=1.5")
    with pytest.raises(ValueError, match=r"option\(s\) \['variant'\] do not apply to deit_tiny"):
        costs.model_costs("deit_tiny", variant="hybrid")
    with pytest.raises(ValueError, match="unknown model"):
        costs.model_options("resnet18")


@pytest.mark.slow
def test_cli_table_and_reductions(capsys):
    argv = ["--model=sa_resnet26", "--num_classes=10", "--image_size=32", "--density=0.1",
            "--teacher=resnet50"]
    out = _cli(capsys, *argv)
    for key in ("params", "params_nonzero", "macs", "macs_sparse", "flops", "flops_sparse",
                "param_reduction_vs_teacher", "flops_reduction_vs_teacher", "convention"):
        assert key in out
    assert out["params"] == 8_306_442 and round(out["param_reduction_paper"], 1) == 28.3
    assert out["options"] == dict(layout="cifar", width=1.0, variant="hybrid", num_heads=8, kernel_size=7)
    costs.main(argv + ["--variant=homogeneous"])
    table = capsys.readouterr().out
    assert "stem_attention" in table and "parameter reduction" in table and "convention" in table


@pytest.mark.slow
def test_the_command_line_runs_as_a_module():
    """One real subprocess: DeiT-Ti as timm counts it (5,717,416 parameters) and SPViT's 1.251 G MACs."""
    run = run_cli("alite_jax.costs", "--model=deit_tiny", "--num_classes=1000", "--image_size=224", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["params"] == 5_717_416 and out["spvit_macs"] == 1_251_052_032
