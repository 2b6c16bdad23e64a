"""Stochastic depth (``alite_jax.models.vit.drop_path``, timm's ``DropPath``) in the dense ViT, SPViT's
supernet and the compact model, and the zoo's ``drop_path_rate`` option."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import create_vit, model_from_config, spvit, vit
from alite_jax.models.spvit_compact import CompactViT

SHAPE = dict(image_size=8, patch_size=4, dim=8, depth=4, num_heads=2)
RATE = 0.6  # per block: linspace(0, 0.6, 4) = 0, 0.2, 0.4, 0.6
MODELS = {
    "vit": vit.VisionTransformer(3, **SHAPE, drop_path_rate=RATE),
    "supernet": spvit.SupernetViT(3, **SHAPE, drop_path_rate=RATE),
    "compact": CompactViT(3, attention=("msa", "3x3", "1x1", "skip"), ffn_widths=(5, 6, 7, 8),
                             **{k: v for k, v in SHAPE.items() if k != "depth"}, folded=False,
                             drop_path_rate=RATE),
}


def init(model, batch=2):
    """Random variables on the init's shapes (numpy draws: nothing compiled), BatchNorm variances 1."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((batch, 8, 8, 3),
                                                                               jnp.float32))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape) if path[-1].key == "var" else
        jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)


def test_linspace_rates_and_validation():
    assert vit.drop_path_rates(RATE, 4) == pytest.approx((0.0, 0.2, 0.4, 0.6))
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="drop_path_rate"):
            vit.drop_path_rates(bad, 4)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_eval_is_unaffected_and_train_drops_samples_at_the_linspace_rates(name):
    model = MODELS[name]
    batch = 256
    variables = init(model)
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 3))
    plain = model.clone(drop_path_rate=0.0)
    gates = {"gates": jax.random.key(3)} if name == "supernet" else {}

    @jax.jit
    def run(v, x):
        train = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2), **gates},
                            mutable=["intermediates", "batch_stats"])
        return model.apply(v, x)[0], plain.apply(v, x)[0], train

    evaluated, evaluated_plain, (_, state) = run(variables, x)
    # Eval: the rate changes nothing (and no "dropout" rng is needed).
    np.testing.assert_array_equal(evaluated, evaluated_plain)
    # Train: the keep masks, sown per block (attention branch, then FFN branch).
    inter = state["intermediates"]
    for i, rate in enumerate(vit.drop_path_rates(RATE, 4)):
        masks = inter[f"block{i}"]["drop_path_keep"] if i else ()
        if i == 0:  # rate 0: nothing drawn
            assert "drop_path_keep" not in inter.get("block0", {})
            continue
        kinds = MODELS["compact"].attention
        assert len(masks) == (1 if name == "compact" and kinds[i] == "skip" else 2)  # skip: no attention
        sd = (rate * (1 - rate) / batch) ** 0.5
        for m in masks:
            assert m.shape == (batch,)
            dropped = 1.0 - float(np.mean(m))
            assert abs(dropped - rate) < 4.5 * sd, (i, dropped, rate)  # binomial sd: a 4.5-sigma band
        if len(masks) == 2:
            assert not np.array_equal(masks[0], masks[1])  # two independent draws


@pytest.mark.slow
def test_a_kept_branch_is_scaled_by_exactly_one_over_keep():
    """One block (timm's Block with drop_path=r) against a hand computation from its own sublayers."""
    rate, d = 0.3, 8
    block = vit.Block(num_heads=2, drop_path=rate)
    x = jax.random.normal(jax.random.key(0), (64, 5, d))
    params = jax.jit(block.init)(jax.random.key(1), x)["params"]
    out, state = jax.jit(lambda p, x: block.apply({"params": p}, x, train=True,
                                                  rngs={"dropout": jax.random.key(2)},
                                                  mutable=["intermediates"]))(params, x)
    keep_attn, keep_mlp = (np.asarray(m) for m in state["intermediates"]["drop_path_keep"])
    assert 0 < keep_attn.sum() < 64 and 0 < keep_mlp.sum() < 64

    def ln(name, y):
        return nn.LayerNorm(epsilon=vit.LAYER_NORM_EPSILON).apply({"params": params[name]}, y)

    def linear(name, y):
        return y @ params[name]["kernel"] + params[name]["bias"]

    attn = vit.Attention(2).apply({"params": params["attn"]}, ln("norm1", x))
    x1 = x + np.where(keep_attn[:, None, None], attn / (1 - rate), 0.0)
    mlp = linear("fc2", jax.nn.gelu(linear("fc1", ln("norm2", x1)), approximate=False))
    want = x1 + np.where(keep_mlp[:, None, None], mlp / (1 - rate), 0.0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    # The helper alone: kept samples are x / keep exactly, dropped ones exactly 0.

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, y):
            return vit.drop_path(self, y, rate, True)

    y = jnp.full((200, 3), 1.7)
    z = np.asarray(Probe().apply({}, y, rngs={"dropout": jax.random.key(5)}))
    kept = z[:, 0] != 0
    assert np.all(z[kept] == np.float32(1.7) / np.float32(1 - rate)) and np.all(z[~kept] == 0)
    assert np.all(z == z[:, :1])  # one draw per sample


@pytest.mark.slow
def test_missing_dropout_rng_is_a_clear_error():
    model = MODELS["vit"]
    variables = init(model)
    with pytest.raises(ValueError, match="'dropout' rng stream"):
        model.apply(variables, jnp.zeros((2, 8, 8, 3)), train=True)
    # rate 0: training needs no rng
    model.clone(drop_path_rate=0.0).apply(variables, jnp.zeros((2, 8, 8, 3)), train=True)


def test_zoo_option():
    mini = dict(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4)
    assert create_vit("deit_tiny", 10, **mini).drop_path_rate == 0.0
    assert create_vit("deit_tiny", 10, drop_path_rate=0.1, **mini).drop_path_rate == 0.1
    model = model_from_config({"name": "deit_tiny", "drop_path_rate": 0.2, "dim": 64, "num_heads": 4}, 10,
                              image_size=32)
    assert model.drop_path_rate == 0.2 and model.dim == 64
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="deit_tiny: drop_path_rate"):
            create_vit("deit_tiny", 10, drop_path_rate=bad, **mini)
