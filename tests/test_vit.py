"""ViT/DeiT (alite_jax/models/vit.py) in the zoo: DeiT's parameter counts, a miniature's forward, image
sizes, and a miniature through the trainer's state and one jitted training step (no batch_stats)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax import config as config_lib
from alite_jax import train
from alite_jax.methods import get_method
from alite_jax.models import (VisionTransformer, abstract_variables, count_params, create_model, init_model,
                              model_from_config)

MINI = dict(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4)


@pytest.mark.parametrize("name, expected", [("deit_tiny", 5_717_416), ("deit_small", 22_050_664),
                                            ("deit_base", 86_567_656)])
def test_deit_parameter_counts_are_the_published_ones(name, expected):
    """DeiT's README (facebookresearch/deit) and timm: 5.7M, 22M, 86M; the exact counts of timm's
    deit_*_patch16_224 with 1000 classes (benchmarks/check_timm_reference.py checks the names/shapes)."""
    model = create_model(name, 1000)
    variables = abstract_variables(model, 224)  # shapes only: nothing is compiled at 224
    assert count_params(variables["params"]) == expected
    assert variables["batch_stats"] == {}
    params = variables["params"]
    dim = model.dim
    assert params["cls_token"].shape == (1, 1, dim) and params["pos_embed"].shape == (1, 197, dim)
    assert params["patch_embed"]["kernel"].shape == (16, 16, 3, dim)
    attn = params["block11"]["attn"]
    assert (attn["qk"]["kernel"].shape, attn["v"]["kernel"].shape, attn["proj"]["kernel"].shape) == (
        (dim, 2 * dim), (dim, dim), (dim, dim))
    assert params["block0"]["fc1"]["kernel"].shape == (dim, 4 * dim)
    assert "block12" not in params and params["head"]["kernel"].shape == (dim, 1000)


@pytest.mark.slow
def test_miniature_forward_shapes_and_features():
    model = create_model("deit_tiny", 10, **MINI)
    assert isinstance(model, VisionTransformer) and model.num_heads == 4
    variables = init_model(model, jax.random.key(0), 32)
    assert set(variables) == {"params", "batch_stats"} and variables["batch_stats"] == {}
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert len(features) == 4 and all(f.shape == (3, 65, 64) for f in features)
    assert bool(jnp.all(jnp.isfinite(logits)))
    # timm-like init: trunc normal std .02 (Linear, pos_embed), zero biases, LayerNorm ones/zeros.
    p = variables["params"]
    assert abs(float(jnp.std(p["block0"]["fc1"]["kernel"])) - 0.02) < 0.003
    assert float(jnp.abs(p["block0"]["attn"]["qk"]["bias"]).max()) == 0.0
    assert float(jnp.abs(p["norm"]["scale"] - 1).max()) == 0.0
    # the same images in another batch position give the same logits (no cross-batch mixing)
    np.testing.assert_allclose(model.apply(variables, x[1:2])[0], logits[1:2], atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
    model = create_model("deit_tiny", 10, dtype="bfloat16", **MINI)
    variables = init_model(model, jax.random.key(0), 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    logits, features = model.apply(variables, jnp.ones((1, 32, 32, 3)))
    assert logits.dtype == jnp.float32 and features[0].dtype == jnp.bfloat16


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="positive multiples of 16.*got 200x200"):
        create_model("deit_tiny", 1000, image_size=200)
    with pytest.raises(ValueError, match="positive multiples of 4"):
        create_model("deit_tiny", 10, **dict(MINI, image_size=30))
    model = create_model("deit_tiny", 10, **MINI)
    with pytest.raises(ValueError, match="built for 32x32 images"):
        init_model(model, jax.random.key(0), 64)
    with pytest.raises(ValueError, match="positive multiples of 4.*got 30x30"):
        init_model(model, jax.random.key(0), 30)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        create_model("deit_tiny", 10, **dict(MINI, num_heads=3))
    with pytest.raises(ValueError, match="unknown option.*'variant'"):
        create_model("deit_tiny", 10, variant="hybrid")
    with pytest.raises(ValueError, match="no width multiplier"):
        create_model("deit_tiny", 10, width=0.25)


def test_model_from_config_takes_the_image_size_and_leaves_resnets_alone():
    config = config_lib.teacher_config("cifar10")
    config.model = dict(name="deit_small", dtype="float32", patch_size=4)
    model = model_from_config(config.model, 10, image_size=32)
    assert (model.image_size, model.patch_size, model.dim, model.num_heads) == (32, 4, 384, 6)
    assert model_from_config({"name": "deit_tiny"}, 1000).image_size == 224
    with pytest.raises(ValueError, match="positive multiples of 16"):
        model_from_config({"name": "deit_tiny"}, 1000, image_size=100)
    resnet = model_from_config(config_lib.teacher_config("cifar10").model, 10, image_size=32)
    assert resnet.layout == "cifar"


@pytest.mark.slow
def test_miniature_trains_one_step_through_the_trainer():
    config = config_lib.teacher_config("cifar10")
    config.model = dict(name="deit_tiny", dtype="float32", **{k: v for k, v in MINI.items()
                                                               if k != "image_size"})
    config.data.image_size = 32
    config.optimizer.update(lr=0.01, weight_decay=0.0)
    method = get_method(config, 10)
    model = method.student()
    assert isinstance(model, VisionTransformer) and model.image_size == 32
    tx = method.optimizer(10)
    state = train.create_train_state(method, model, tx, jax.random.key(0), 32)
    assert state["batch_stats"] == {}
    rng = np.random.default_rng(0)
    batch = dict(image=jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
                 label=jnp.asarray(rng.integers(0, 10, 8)))
    step = jax.jit(train.make_train_step(method, model, None, tx, steps_per_epoch=10))
    new_state, metrics = step(state, batch, None)
    assert new_state["batch_stats"] == {} and int(new_state["step"]) == 1
    assert np.isfinite(float(metrics["ce"] if "ce" in metrics else next(iter(metrics.values()))))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["params"], new_state["params"])
    assert all(jax.tree.leaves(changed))  # every parameter got a gradient
    evaluated = jax.jit(train.make_eval_step(model))(new_state, dict(batch, mask=jnp.ones(8, bool)))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(evaluated))
