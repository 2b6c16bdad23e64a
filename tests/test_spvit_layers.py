"""Tests for SPViT's supernet layers (``alite_jax.models.spvit``) against references written in the test.

References, each built here from the math (docs/spvit_single_path.md), not from the module's helpers:

* ``msa_reference``: softmax(q k^T hd^-0.5) v, proj, head by head in jnp;
* ``conv_kernel_reference``: the 3x3 HWIO kernel filled tap by tap, K[kh, kw] = sum_h A[h, kh + 3 kw]
  W_v^h, A a softmax written out in numpy; the branch runs ``jax.lax.conv_general_dilated`` on it, or
  ``shift_and_sum``, a numpy loop over pixels and taps with zeros outside the grid;
* BatchNorm by hand, with given running statistics (eval) or the batch's (train: mean and biased
  variance over batch and grid), ReLU, the mixed projection, the class token passed through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.models import spvit

B, SIDE, D, HEADS = 2, 4, 12, 3
HD = D // HEADS
N = SIDE * SIDE + 1
ALPHA = spvit.HEAD_PROBS_ALPHA
TOL = dict(rtol=2e-5, atol=2e-5)


def randomise(variables, key):
    """Random params (biases included), a non-uniform head mixing, random BatchNorm statistics."""
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves) + 2)
    leaves = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    attn = params["attn"] if "attn" in params else params
    attn["head_probs"] = 0.01 * jax.random.normal(keys[-1], (HEADS, 9))  # P / alpha ~ N(0, 1)
    attn["msa_gate_logits"] = jnp.full((3,), spvit.GATE_INIT)
    if "ffn_gate_logits" in params:
        params["ffn_gate_logits"] = jnp.full(params["ffn_gate_logits"].shape, spvit.GATE_INIT)
    stats = jax.tree_util.tree_map(lambda a: a, variables.get("batch_stats", {}))
    bs = stats["attn"] if "attn" in stats else stats
    for i, name in enumerate(bs):
        k1, k2 = jax.random.split(jax.random.fold_in(keys[-2], i))
        bs[name] = {"mean": 0.5 * jax.random.normal(k1, (HD,)),
                    "var": jax.random.uniform(k2, (HD,), minval=0.5, maxval=2.0)}
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def attention_setup():
    layer = spvit.UnifiedAttention(num_heads=HEADS)
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    variables = randomise(layer.init(jax.random.key(1), x), jax.random.key(2))
    return layer, x, variables


def apply_eval(layer, variables, x, gates, jit):
    fn = lambda v, x, g: layer.apply(v, x, train=False, gates=g)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(variables, x, jnp.asarray(gates))


def mix_reference(head_probs):
    z = np.asarray(head_probs, np.float64) / ALPHA
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)  # (heads, 9), columns sum to 1


def msa_reference(x, p):
    q_all = x @ p["qk"]["kernel"] + p["qk"]["bias"]
    v_all = x @ p["v"]["kernel"] + p["v"]["bias"]
    heads = []
    for h in range(HEADS):
        q = q_all[..., h * HD:(h + 1) * HD]
        k = q_all[..., D + h * HD:D + (h + 1) * HD]
        v = v_all[..., h * HD:(h + 1) * HD]
        w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * HD ** -0.5, axis=-1)
        heads.append(w @ v)
    return jnp.concatenate(heads, axis=-1) @ p["proj"]["kernel"] + p["proj"]["bias"]


def conv_kernel_reference(a, v_kernel):
    v_kernel = np.asarray(v_kernel, np.float64)
    kernel = np.zeros((3, 3, D, HD))
    for kh in range(3):
        for kw in range(3):
            for h in range(HEADS):
                kernel[kh, kw] += a[h, kh + 3 * kw] * v_kernel[:, h * HD:(h + 1) * HD]
    return kernel


def shift_and_sum(grid, kernel):
    """out[b, y, x] = sum_{kh, kw} grid[b, y + kh - 1, x + kw - 1] @ K[kh, kw], zero outside the grid."""
    grid, kernel = np.asarray(grid, np.float64), np.asarray(kernel, np.float64)
    out = np.zeros(grid.shape[:3] + (kernel.shape[-1],))
    for y in range(SIDE):
        for x in range(SIDE):
            for kh in range(3):
                for kw in range(3):
                    yy, xx = y + kh - 1, x + kw - 1
                    if 0 <= yy < SIDE and 0 <= xx < SIDE:
                        out[:, y, x] += grid[:, yy, xx] @ kernel[kh, kw]
    return out


def lax_conv(grid, kernel):
    return np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(grid, jnp.float32), jnp.asarray(kernel, jnp.float32), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)


def branch_reference(x, variables, size, train=False, conv=lax_conv):
    """The 3x3 (size 3) or 1x1 (size 1) branch: conv, BN, ReLU, mixed projection; class token bypassed."""
    p = variables["params"]
    a = mix_reference(p["head_probs"])
    x64 = np.asarray(x, np.float64)
    taps = range(9) if size == 3 else [4]
    kernel = conv_kernel_reference(a, p["v"]["kernel"])
    vb = np.asarray(p["v"]["bias"], np.float64).reshape(HEADS, HD)
    bias = sum(a[:, t] @ vb for t in taps)
    pk = np.asarray(p["proj"]["kernel"], np.float64).reshape(HEADS, HD, D)
    proj = sum(np.einsum("h,hco->co", a[:, t], pk) for t in taps)
    grid = x64[:, 1:].reshape(B, SIDE, SIDE, D)
    y = (conv(grid, kernel) if size == 3 else grid @ kernel[1, 1]) + bias
    name = "bn_3x3" if size == 3 else "bn_1x1"
    bn = p[name]
    if train:
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    else:
        stats = variables["batch_stats"][name]
        mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    y = (y - mean) / np.sqrt(var + spvit.BN_EPSILON) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    y = np.maximum(y, 0).reshape(B, SIDE * SIDE, HD) @ proj + np.asarray(p["proj"]["bias"])
    return np.concatenate([x64[:, :1], y], axis=1)


# ----------------------------------------------------------------------------
# The four gate settings
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.slow
def test_msa_setting_is_multi_head_attention(attention_setup, jit):
    layer, x, variables = attention_setup
    out = apply_eval(layer, variables, x, spvit.MSA_SETTINGS["msa"], jit)
    np.testing.assert_allclose(out, msa_reference(x, variables["params"]), **TOL)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("setting,size", [("conv3x3", 3), ("conv1x1", 1)])
def test_conv_settings_eval(attention_setup, jit, setting, size):
    layer, x, variables = attention_setup
    out = apply_eval(layer, variables, x, spvit.MSA_SETTINGS[setting], jit)
    np.testing.assert_allclose(out, branch_reference(x, variables, size), **TOL)
    np.testing.assert_array_equal(out[:, 0], x[:, 0])  # the class token bypasses the branch


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("setting,size", [("conv3x3", 3), ("conv1x1", 1)])
def test_conv_settings_train_batch_stats(attention_setup, jit, setting, size):
    layer, x, variables = attention_setup
    fn = lambda v, x: layer.apply(v, x, train=True, gates=jnp.asarray(spvit.MSA_SETTINGS[setting]),  # noqa: E731
                                  mutable=["batch_stats"])
    out, updated = (jax.jit(fn) if jit else fn)(variables, x)
    np.testing.assert_allclose(out, branch_reference(x, variables, size, train=True), rtol=1e-4, atol=1e-4)
    # Both BatchNorms see the batch on every step (both branches are computed), as the public code.
    for name in ("bn_3x3", "bn_1x1"):
        assert not np.allclose(updated["batch_stats"][name]["mean"], variables["batch_stats"][name]["mean"])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("gates", [(0.0, 0.0, 0.0), (0.0, 1.0, 1.0), (0.0, 1.0, 0.0)])
def test_skip_setting_is_zero(attention_setup, jit, gates):
    layer, x, variables = attention_setup
    np.testing.assert_array_equal(apply_eval(layer, variables, x, gates, jit), np.zeros((B, N, D)))


def test_later_gates_are_ignored_once_an_earlier_one_is_off(attention_setup):
    layer, x, variables = attention_setup
    # g = (1, 0, 1): i = cumprod(g) = (1, 0, 0), the 1x1 conv.
    np.testing.assert_array_equal(apply_eval(layer, variables, x, (1.0, 0.0, 1.0), False),
                                  apply_eval(layer, variables, x, spvit.MSA_SETTINGS["conv1x1"], False))


def test_shift_and_sum_oracle_matches_lax_conv(attention_setup):
    _, x, variables = attention_setup
    kernel = conv_kernel_reference(mix_reference(variables["params"]["head_probs"]),
                                   variables["params"]["v"]["kernel"])
    grid = np.asarray(x[:, 1:]).reshape(B, SIDE, SIDE, D)
    np.testing.assert_allclose(lax_conv(grid, kernel), shift_and_sum(grid, kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(branch_reference(x, variables, 3, conv=shift_and_sum),
                               branch_reference(x, variables, 3), rtol=1e-5, atol=1e-5)


def test_module_conv_weights_match_reference(attention_setup):
    _, _, variables = attention_setup
    p = variables["params"]
    w = spvit.conv_branch_weights(spvit.head_mix(p["head_probs"]), p["v"]["kernel"], p["v"]["bias"],
                                  p["proj"]["kernel"])
    kernel = conv_kernel_reference(mix_reference(p["head_probs"]), p["v"]["kernel"])
    np.testing.assert_allclose(w["kernel3"], kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w["kernel1"], kernel[1, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,kh,kw", [(0, 0, 0), (2, 0, 1), (1, 2, 0), (2, 1, 2)])
def test_one_hot_head_probs_pick_a_head_of_v_at_a_tap(attention_setup, head, kh, kw):
    _, _, variables = attention_setup
    p = variables["params"]
    tap = kh + 3 * kw
    assert spvit.tap_index(kh, kw) == tap
    probs = jnp.zeros((HEADS, 9)).at[head, tap].set(1.0)  # 1 / alpha = 100: A[:, tap] is one-hot
    w = spvit.conv_branch_weights(spvit.head_mix(probs), p["v"]["kernel"], p["v"]["bias"],
                                  p["proj"]["kernel"])
    v_head = np.asarray(p["v"]["kernel"])[:, head * HD:(head + 1) * HD]
    np.testing.assert_allclose(w["kernel3"][kh, kw], v_head, rtol=1e-6, atol=1e-30)
    mean_head = np.asarray(p["v"]["kernel"]).reshape(D, HEADS, HD).mean(1)  # other taps: uniform A
    for okh in range(3):
        for okw in range(3):
            if (okh, okw) != (kh, kw):
                np.testing.assert_allclose(w["kernel3"][okh, okw], mean_head, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------

THETAS = jnp.array([-2.0, -0.5, 0.0, 0.7, 1.5, 3.0])


def test_sampled_gate_rate_matches_sigmoid():
    keys = jax.random.split(jax.random.key(3), 4000)
    samples = jax.jit(jax.vmap(lambda k: spvit.sample_gate(THETAS, k, True)))(keys)
    assert set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
    rate = np.asarray(samples).mean(0)
    np.testing.assert_allclose(rate, jax.nn.sigmoid(THETAS), atol=0.03)  # 4 standard errors at most


def test_sampled_gate_has_the_straight_through_gradient():
    key = jax.random.key(4)
    grad = jax.grad(lambda t: spvit.sample_gate(t, key, True).sum())(THETAS)
    soft = jax.nn.sigmoid(spvit.relaxed_bernoulli_logits(THETAS, key))
    np.testing.assert_allclose(grad, soft * (1 - soft), rtol=1e-6)
    assert np.all(np.asarray(grad) > 0)


def test_eval_gate_is_the_threshold_and_deterministic():
    thetas = jnp.array([-1.0, -1e-3, 1e-3, 2.0])
    np.testing.assert_array_equal(spvit.sample_gate(thetas, None, False), [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(jax.jit(spvit.sample_gate, static_argnums=2)(thetas, None, False),
                                  [0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="PRNG key"):
        spvit.sample_gate(thetas, None, True)


def test_eval_layer_thresholds_its_logits(attention_setup):
    layer, x, variables = attention_setup
    p = dict(variables["params"], msa_gate_logits=jnp.array([0.5, -0.5, 2.0]))  # i = (1, 0, 0): 1x1
    v = dict(variables, params=p)
    out = layer.apply(v, x, train=False)
    np.testing.assert_array_equal(out, layer.apply(v, x, train=False))
    np.testing.assert_allclose(out, branch_reference(x, variables, 1), **TOL)


def test_train_sampling_is_determined_by_the_key(attention_setup):
    layer, x, variables = attention_setup
    fn = jax.jit(lambda k: layer.apply(variables, x, train=True, rngs={"gates": k}, mutable=["batch_stats",
                                                                                              "intermediates"]))
    out_a, _ = fn(jax.random.key(5))
    out_b, _ = fn(jax.random.key(5))
    np.testing.assert_array_equal(out_a, out_b)
    settings = {tuple(np.asarray(fn(jax.random.key(s))[1]["intermediates"]["msa_indicators"][0]))
                for s in range(40)}
    assert len(settings) > 1  # different keys sample different paths


def test_slow_down_rule():
    c = jnp.array([2.0, 3.0, 5.0])
    grad = lambda g: jax.grad(lambda g: jnp.dot(c, spvit.msa_indicators(g)))(jnp.array(g))  # noqa: E731
    np.testing.assert_allclose(grad([1.0, 1.0, 1.0]), [5.0, 5.0, 5.0])  # i0 and i1 stopped: via i2 only
    np.testing.assert_allclose(grad([1.0, 1.0, 0.0]), [3.0, 3.0, 5.0])  # i0 stopped
    np.testing.assert_allclose(grad([1.0, 0.0, 0.0]), [2.0, 3.0, 0.0])  # nothing stopped
    np.testing.assert_array_equal(spvit.msa_indicators(jnp.array([1.0, 0.0, 1.0])), [1.0, 0.0, 0.0])


@pytest.mark.slow
def test_every_gate_logit_and_head_probs_get_gradients_in_training():
    block = spvit.SupernetBlock(num_heads=HEADS)
    x = jax.random.normal(jax.random.key(6), (B, N, D))
    variables = block.init(jax.random.key(7), x)
    target = jax.random.normal(jax.random.key(8), (B, N, D))

    @jax.jit
    def grads(params, key):
        def loss(params):
            out, _ = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 rngs={"gates": key}, mutable=["batch_stats"])
            return jnp.mean((out - target) ** 2)
        return jax.grad(loss)(params)

    total = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
    for s in range(8):
        g = grads(variables["params"], jax.random.key(100 + s))
        total = jax.tree_util.tree_map(lambda t, g: t + jnp.abs(g), total, g)
    assert np.all(np.asarray(total["attn"]["msa_gate_logits"]) > 0)
    assert np.all(np.asarray(total["attn"]["head_probs"]) > 0)
    assert np.all(np.asarray(total["ffn_gate_logits"]) > 0)


# ----------------------------------------------------------------------------
# FFN, block, model
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_gated_mlp_matches_reference(jit):
    mlp = spvit.GatedMlp(hidden_features=4 * D)
    x = jax.random.normal(jax.random.key(9), (B, N, D))
    params = randomise(mlp.init(jax.random.key(10), x), jax.random.key(11))["params"]
    gates = (jax.random.uniform(jax.random.key(12), (4 * D,)) > 0.5).astype(jnp.float32)
    fn = lambda p, x, g: mlp.apply({"params": p}, x, gates=g)  # noqa: E731
    out = (jax.jit(fn) if jit else fn)(params, x, gates)
    hidden = jax.nn.gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], approximate=False)
    ref = (hidden * gates) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    np.testing.assert_allclose(out, ref, **TOL)


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def test_block_with_every_gate_on_is_the_dense_block():
    block = spvit.SupernetBlock(num_heads=HEADS)
    x = jax.random.normal(jax.random.key(13), (B, N, D))
    variables = randomise(block.init(jax.random.key(14), x), jax.random.key(15))
    p = variables["params"]
    assert set(p) == {"norm1", "attn", "norm2", "fc1", "fc2", "ffn_gate_logits"}
    assert set(p["attn"]) == {"qk", "v", "proj", "head_probs", "msa_gate_logits", "bn_3x3", "bn_1x1"}
    out = block.apply(variables, x, msa_gates=jnp.ones(3), ffn_gates=jnp.ones(4 * D))
    y = x + msa_reference(layer_norm(x, p["norm1"]), p["attn"])
    hidden = jax.nn.gelu(layer_norm(y, p["norm2"]) @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    ref = y + hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # The default logits (1.5) threshold to "every gate on" in eval mode.
    np.testing.assert_allclose(block.apply(variables, x), out, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_supernet_vit_shapes_names_and_training_step():
    model = spvit.SupernetViT(num_classes=5, image_size=16, patch_size=4, dim=D, depth=2, num_heads=HEADS)
    images = jax.random.normal(jax.random.key(16), (B, 16, 16, 3))
    variables = model.init(jax.random.key(17), images)
    params = variables["params"]
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "block0", "block1", "norm", "head"}
    logits, features = jax.jit(model.apply, static_argnames="train")(variables, images)
    assert logits.shape == (B, 5) and len(features) == 2 and features[0].shape == (B, N, D)
    step = jax.jit(lambda v, k: model.apply(v, images, train=True, rngs={"gates": k},
                                            mutable=["batch_stats"]))
    (logits_t, _), updated = step(variables, jax.random.key(18))
    assert logits_t.shape == (B, 5) and set(updated["batch_stats"]) == {"block0", "block1"}
    gate_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
                  if "gate_logits" in jax.tree_util.keystr(path)]
    assert len(gate_paths) == 4  # msa_gate_logits and ffn_gate_logits in each block


@pytest.mark.slow
def test_dense_vit_params_drop_into_the_supernet():
    vit = pytest.importorskip("alite_jax.models.vit")  # the dense model (a parallel change)
    kwargs = dict(num_classes=5, image_size=16, patch_size=4, dim=D, depth=2, num_heads=HEADS)
    dense = vit.VisionTransformer(**kwargs)
    images = jax.random.normal(jax.random.key(19), (B, 16, 16, 3))
    leaves, tree = jax.tree_util.tree_flatten(dense.init(jax.random.key(20), images)["params"])
    keys = jax.random.split(jax.random.key(21), len(leaves))
    dense_params = jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    model = spvit.SupernetViT(**kwargs)
    variables = model.init(jax.random.key(22), images)
    merged = jax.tree_util.tree_map(lambda a: a, variables["params"])

    def overlay(target, source):
        for name, value in source.items():
            assert name in target, name  # every dense parameter has a place in the supernet
            if isinstance(value, dict):
                overlay(target[name], value)
            else:
                assert target[name].shape == value.shape, name
                target[name] = value

    overlay(merged, dense_params)
    out, _ = model.apply(dict(variables, params=merged), images)
    ref, _ = dense.apply({"params": dense_params}, images)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
