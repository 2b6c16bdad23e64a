"""Cost accounting: the paper's reference numbers, hand-computed masked counts, XLA cross-check."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax import sparsity
from alite_jax.costs import count_costs, layer_costs, reductions
from alite_jax.models import abstract_variables, create_model


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
    masks = jax.tree.map(lambda p, f: np.ones(p.shape, bool) if f else None, params, flags)
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


def test_cli_json_and_table():
    cmd = [sys.executable, "-m", "alite_jax.costs", "--model=sa_resnet26", "--num_classes=10",
           "--image_size=32", "--density=0.1", "--teacher=resnet50"]
    out = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    for key in ("params", "params_nonzero", "macs", "macs_sparse", "flops", "flops_sparse",
                "param_reduction_vs_teacher", "flops_reduction_vs_teacher", "convention"):
        assert key in out
    assert out["params"] == 8_306_442 and round(out["param_reduction_paper"], 1) == 28.3
    table = subprocess.run(cmd + ["--variant=homogeneous"], capture_output=True, text=True,
                           check=True).stdout
    assert "stem_attention" in table and "parameter reduction" in table and "convention" in table
    bad = subprocess.run(cmd[:-2] + ["--density=1.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "density" in bad.stderr
