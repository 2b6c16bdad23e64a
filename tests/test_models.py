"""The model zoo: parameter counts, feature shapes, image-size checks, BatchNorm modes, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import ZOO, abstract_variables, count_params, create_model, init_model, summary

# Trainable parameters (BN scale/bias in, running statistics out), as PyTorch's parameters() counts them.
EXPECTED_PARAMS = {
    ("resnet50", "hybrid"): {10: 23_520_842, 100: 23_705_252, 200: 23_910_152},
    ("sa_resnet26", "hybrid"): {10: 8_306_442, 100: 8_490_852, 200: 8_695_752},
    ("sa_resnet38", "hybrid"): {10: 12_154_442, 100: 12_338_852, 200: 12_543_752},
    # Homogeneous: the 3x3 conv stem (3*3*3*64 = 1,728 weights) becomes an attention stem with
    # 3*3*64 + 7*64 = 1,024, so 704 fewer than the hybrid counts.
    ("sa_resnet26", "homogeneous"): {10: 8_306_442 - 704, 100: 8_490_852 - 704, 200: 8_695_752 - 704},
    ("sa_resnet38", "homogeneous"): {10: 12_154_442 - 704},
}


def _make(name, variant, num_classes, **kw):
    opts = {} if name == "resnet50" else {"variant": variant}
    return create_model(name, num_classes, **opts, **kw)


@pytest.mark.parametrize("key", list(EXPECTED_PARAMS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_parameter_counts(key):
    for num_classes, expected in EXPECTED_PARAMS[key].items():
        variables = abstract_variables(_make(*key, num_classes))
        assert count_params(variables["params"]) == expected, (key, num_classes)


@pytest.mark.parametrize("size", [32, 64])
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


@pytest.mark.slow  # full-width models: about a minute each on 2 cores
@pytest.mark.parametrize("name,opts", ZOO, ids=lambda x: x if isinstance(x, str) else x.get("variant", ""))
def test_forward_and_gradient_run(name, opts):
    model = create_model(name, 10, width=0.25, **opts)
    variables = init_model(model, jax.random.key(0), 32)
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
    variables = init_model(model, jax.random.key(0), 32)
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
    variables = init_model(f32, jax.random.key(0), 32)
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
])
def test_bad_options_fail_before_tracing(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        create_model(name, 10, **kwargs)


def test_summary_lists_every_model():
    text = summary(10, 32)
    for count in ("23,520,842", "8,306,442", "12,154,442", "8,305,738"):
        assert count in text
