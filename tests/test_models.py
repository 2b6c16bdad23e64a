"""The model zoo: parameter counts, feature shapes, image-size checks, BatchNorm modes, options."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import (ZOO, abstract_variables, check_image_size, count_params, create_model,
                              init_model, model_from_config, summary)
from alite_jax.models.resnet import max_pool_stem

# Trainable parameters (BN scale/bias in, running statistics out), as PyTorch's parameters() counts them.
EXPECTED_PARAMS = {
    ("resnet50", "hybrid"): {10: 23_520_842, 100: 23_705_252, 200: 23_910_152},
    ("sa_resnet26", "hybrid"): {10: 8_306_442, 100: 8_490_852, 200: 8_695_752},
    ("sa_resnet38", "hybrid"): {10: 12_154_442, 100: 12_338_852, 200: 12_543_752},
    # Homogeneous: the 3x3 conv stem (3*3*3*64 = 1,728 weights) becomes an attention stem with
    # 3*3*64 + 7*64 = 1,024, so 704 fewer than the hybrid counts.
    ("sa_resnet26", "homogeneous"): {10: 8_306_442 - 704, 100: 8_490_852 - 704, 200: 8_695_752 - 704},
    ("sa_resnet38", "homogeneous"): {10: 12_154_442 - 704},
    ("sa_resnet50", "hybrid"): {10: 16_002_442},
    ("sa_resnet50", "homogeneous"): {10: 16_002_442 - 704},
}
# ImageNet layout, 1000 classes: torchvision's resnet50() has 25,557,032 parameters; SASA's Table 1 gives
# 10.3M / 14.1M / 18.0M for the conv-stem SA-ResNet-26/38/50 (docs/architectures.md compares).
IMAGENET_PARAMS = {"resnet50": 25_557_032, "sa_resnet26": 10_342_632, "sa_resnet38": 14_190_632,
                   "sa_resnet50": 18_038_632}


@functools.cache
def _variables_at_32(name, **opts):
    """init_model(create_model(name, 10, width=0.25, **opts), key 0, 32x32), once per model: the tests
    that run the same model share it."""
    return init_model(create_model(name, 10, width=0.25, **opts), jax.random.key(0), 32)


def _make(name, variant, num_classes, **kw):
    opts = {} if name == "resnet50" else {"variant": variant}
    return create_model(name, num_classes, **opts, **kw)


@pytest.mark.parametrize("key", list(EXPECTED_PARAMS), ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.slow
def test_parameter_counts(key):
    for num_classes, expected in EXPECTED_PARAMS[key].items():
        variables = abstract_variables(_make(*key, num_classes))
        assert count_params(variables["params"]) == expected, (key, num_classes)


def test_imagenet_layout_parameter_counts_and_names():
    for name, expected in IMAGENET_PARAMS.items():
        params = abstract_variables(create_model(name, 1000, layout="imagenet"), 224)["params"]
        assert count_params(params) == expected, name
        # The names a torchvision converter maps 1:1 (the max-pool has no parameters).
        assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
        assert set(params["stem_bn"]) == {"scale", "bias"} and params["head"]["kernel"].shape == (2048, 1000)
        block = params["stage2_block1"]
        assert {"conv1", "bn1", "bn2", "conv3", "bn3", "proj_conv", "proj_bn"} <= set(block)
        assert ("conv2" if name == "resnet50" else "attention") in block
    assert params["stage4_block3"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert IMAGENET_PARAMS["sa_resnet50"] == pytest.approx(18.0e6, rel=0.005)  # SASA's Table 1


def test_imagenet_layout_stage_shapes_at_224():
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    for name in ("resnet50", "sa_resnet26"):
        model = create_model(name, 1000, layout="imagenet")
        logits, feats = jax.eval_shape(model.apply, abstract_variables(model, 224), images)
        assert logits.shape == (2, 1000)
        assert [f.shape for f in feats] == [(2, 56, 56, 256), (2, 28, 28, 512), (2, 14, 14, 1024),
                                            (2, 7, 7, 2048)], name


@pytest.mark.slow
def test_imagenet_stem_matches_lax_reference():
    """Stem conv 7x7/2 (padding 3) + BN (running statistics) + ReLU + max-pool 3x3/2 (padding 1, -inf),
    written out with lax, against the model's input to its first block (the run stops there)."""
    model = create_model("sa_resnet26", 10, layout="imagenet", width=0.25)
    shapes = abstract_variables(model, 64)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)
    kernel = (0.2 * rng.standard_normal((7, 7, 3, 16))).astype(np.float32)
    variables["params"]["stem_conv"]["kernel"] = kernel
    variables["params"]["stem_bn"]["bias"] = rng.standard_normal(16).astype(np.float32)
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)

    class Stop(Exception):
        pass

    def first_block_input(next_fun, args, kwargs, context):
        if context.module.name == "stage1_block1":
            raise Stop(args[0])
        return next_fun(*args, **kwargs)

    with pytest.raises(Stop) as stop, nn.intercept_methods(first_block_input):
        model.apply(variables, x)
    got = stop.value.args[0]

    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn = variables["batch_stats"]["stem_bn"]
    y = (y - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * variables["params"]["stem_bn"]["scale"]
    y = jax.nn.relu(y + variables["params"]["stem_bn"]["bias"])
    ref = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                ((0, 0), (1, 1), (1, 1), (0, 0)))
    assert got.shape == ref.shape == (2, 16, 16, 16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # After the ReLU zero padding would give the same; on negative inputs the pool must pad with -inf
    # (PyTorch's MaxPool2d), which a naive loop over the image's own pixels checks.
    z = -1.0 - rng.uniform(size=(1, 6, 6, 2)).astype(np.float32)
    naive = np.array([[[z[0, max(0, 2 * i - 1):2 * i + 2, max(0, 2 * j - 1):2 * j + 2, c].max()
                        for c in range(2)] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(max_pool_stem(jnp.asarray(z))[0], naive)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.slow
def test_student_features_match_teacher(size):
    images = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)

    def shapes(model):
        variables = abstract_variables(model, size)
        logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
        return logits.shape, [f.shape for f in feats]

    teacher = shapes(create_model("resnet50", 200))
    expected = [(3, size // s, size // s, c) for s, c in ((1, 256), (2, 512), (4, 1024), (8, 2048))]
    assert teacher == ((3, 200), expected)
    for name, opts in ZOO[1:]:
        assert shapes(create_model(name, 200, **opts)) == teacher, (name, opts)


def test_any_multiple_of_eight_works_and_others_fail_clearly():
    model = create_model("sa_resnet26", 10, width=0.25)
    variables = abstract_variables(model, 32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((1, 40, 48, 3), jnp.float32))
    assert [f.shape[1:3] for f in out[1]] == [(40, 48), (20, 24), (10, 12), (5, 6)]
    for h, w in [(30, 30), (32, 36), (4, 4), (28, 32)]:
        with pytest.raises(ValueError, match=r"multiples of 8.*got %dx%d" % (h, w)):
            model.apply(variables, jnp.zeros((1, h, w, 3)))
    with pytest.raises(ValueError, match="multiples of 8"):
        init_model(model, jax.random.key(0), 30)


def test_imagenet_layout_takes_multiples_of_32():
    model = create_model("resnet50", 10, layout="imagenet", width=0.25)
    variables = abstract_variables(model, 224)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
    assert [f.shape[1:3] for f in out[1]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for h, w in [(32, 40), (56, 56), (16, 16), (220, 224)]:
        with pytest.raises(ValueError, match=r"multiples of 32 \(e.g. 224x224\); got %dx%d" % (h, w)):
            check_image_size(h, w, "imagenet")
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="multiples of 32"):
        init_model(model, jax.random.key(0), 40)
    check_image_size(40, 40)  # the CIFAR layout still takes multiples of 8
    with pytest.raises(ValueError, match="unknown layout"):
        check_image_size(32, 32, "tiny")


@pytest.mark.slow  # full-width models: 15-25 s each on 2 cores
# SA-ResNet38 is SA-ResNet26's blocks in other numbers (its parameter counts are pinned above): the
# teacher and both student variants cover every kind of layer.
@pytest.mark.parametrize("name,opts", ZOO[:3],
                         ids=lambda x: x if isinstance(x, str) else x.get("variant", ""))
def test_forward_and_gradient_run(name, opts):
    model = create_model(name, 10, width=0.25, **opts)
    variables = _variables_at_32(name, **opts)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10

    def loss(params):
        (logits, feats), state = model.apply({**variables, "params": params}, x, train=True,
                                             mutable=["batch_stats"])
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
        return ce, (feats, state)

    (value, (feats, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Every parameter receives gradient (nothing is disconnected from the loss).
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    assert len(feats) == 4


@pytest.mark.slow  # full-width ResNet-50
def test_batchnorm_train_and_eval_modes():
    model = create_model("sa_resnet26", 10, width=0.25)
    variables = _variables_at_32("sa_resnet26", variant="hybrid")  # the default variant
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (8, 32, 32, 3))

    # Eval mode uses running statistics: an example's output does not depend on the rest of the batch.
    eval_all, _ = model.apply(variables, x, train=False)
    eval_one, _ = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(eval_all[:1], eval_one, rtol=1e-4, atol=1e-5)

    # Train mode normalises with batch statistics (depends on the batch) and updates the running ones.
    (train_all, _), state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    (train_one, _), _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_all[:2], train_one, atol=1e-3)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(variables, x, train=True)  # batch_stats must be declared mutable in training

    # Running mean of the stem BN: 0.9 * old + 0.1 * batch mean of the stem conv output (computed here
    # independently with lax.conv).
    kernel = variables["params"]["stem_conv"]["kernel"]
    stem = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected_mean = 0.9 * variables["batch_stats"]["stem_bn"]["mean"] + 0.1 * stem.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(state["batch_stats"]["stem_bn"]["mean"], expected_mean, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_width_multiplier_and_grayscale_input():
    model = create_model("sa_resnet38", 100, width=0.5, variant="homogeneous")
    variables = abstract_variables(model, 32, channels=1)  # shapes only: the forward runs elsewhere
    assert variables["params"]["stem_attention"]["query"]["kernel"].shape == (1, 32)
    assert variables["params"]["stage4_block1"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
    logits, _ = jax.eval_shape(model.apply, variables, jnp.ones((2, 32, 32, 1)))
    assert logits.shape == (2, 100)


@pytest.mark.slow  # full-width models in two dtypes
def test_bfloat16_compute_agrees_with_float32():
    f32 = create_model("sa_resnet26", 10, width=0.25)
    bf16 = create_model("sa_resnet26", 10, width=0.25, dtype=jnp.bfloat16)
    variables = _variables_at_32("sa_resnet26", variant="hybrid")  # the default variant
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    # Under jit: op by op, CPU bfloat16 arithmetic is emulated and the eager forward takes minutes.
    ref, ref_feats = jax.jit(f32.apply)(variables, x)
    out, feats = jax.jit(bf16.apply)(variables, x)
    assert out.dtype == jnp.float32 and feats[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(abstract_variables(bf16))[0].dtype == jnp.float32  # params stay float32
    # bfloat16 keeps 8 bits of mantissa: through 26 layers we accept 5% of the logits' scale.
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out, ref, atol=0.05 * scale)
    np.testing.assert_allclose(np.asarray(feats[3], np.float32), ref_feats[3],
                               atol=0.05 * float(jnp.max(jnp.abs(ref_feats[3]))))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="resnet18"), "unknown model"),
    (dict(name="sa_resnet26", variant="tiny"), "unknown variant"),
    (dict(name="sa_resnet26", heads=4), "unknown option"),
    (dict(name="resnet50", kernel_size=7), "convolutional"),
    (dict(name="sa_resnet26", width=0.1), "divisible by num_heads"),
    (dict(name="sa_resnet26", kernel_size=4), "odd"),
    (dict(name="sa_resnet26", impl="cuda"), "unknown impl"),
    (dict(name="sa_resnet26", width=0), "width"),
    (dict(name="resnet50", layout="imagenet1k"), r"unknown layout 'imagenet1k'; choose one of \('cifar', "
                                                 r"'imagenet'\)"),
    (dict(name="sa_resnet26", layout="imagenet", variant="homogeneous"), "homogeneous variant has no "
                                                                         "ImageNet"),
])
def test_bad_options_fail_before_tracing(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        create_model(name, 10, **kwargs)


@pytest.mark.slow
def test_summary_lists_every_model():
    text = summary(10, 32)
    for count in ("23,520,842", "8,306,442", "12,154,442", "8,305,738"):
        assert count in text


def test_model_from_config_reads_the_layout():
    from alite_jax import config as alite_config

    for c in (alite_config.base_config(), alite_config.teacher_config("cifar10")):
        assert c.model.layout == "cifar" and model_from_config(c.model, 10).layout == "cifar"
        c.model.layout = "imagenet"
        assert model_from_config(c.model, 10).layout == "imagenet"
    assert model_from_config({"name": "resnet50"}, 10).layout == "cifar"  # older configs: no field
