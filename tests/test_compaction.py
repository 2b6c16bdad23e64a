"""The compact form of pruned students (alite_jax.compact.column) and the compact storage of irregular
ones (alite_jax.compact.sparse_store): equal to the masked model, smaller, exact round trips."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax.compact.column import (CompactResNet, compact_conv, compact_student, conv_apply, count_values,
                                      load_compact, save_compact)
from alite_jax.compact.sparse_store import decode, densify, encode, load_sparse, save_sparse, stored_bytes
from alite_jax.compact.tree import flatten, unflatten
from alite_jax.export.compactors import compact_run
from alite_jax.models import create_model
from alite_jax.sparsity import apply_masks, init_masks

# Logits agree to 1e-5 relative to the largest logit (absolute below 1): two float32 computations of the
# same function in another order differ by float32 rounding, which grows with the logits' scale (the
# masked model itself is ~1e-5 away from its float64 evaluation at logits of 5; docs/compaction.md).
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def student(name, size, channels=3, width=0.25, density=0.5, structure="column", stages=None, **options):
    """(model, masked variables) with random BatchNorm parameters and statistics (a fresh model's scale 1,
    bias 0, mean 0, var 1 would leave the BN folding untested); cached. ``stages``: fewer blocks than the
    zoo's model (every kind of layer is still there, and it compiles in a fraction of the time)."""
    model = create_model(name, 10, width=width, **options)
    if stages is not None:
        model = model.clone(stage_sizes=stages)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, channels)))
    params = variables["params"]
    if density < 1:
        masks, _ = init_masks(params, density, structure, seed=0)
        params = apply_masks(params, masks)
    rng = np.random.default_rng(0)

    def perturb(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        draw = {"scale": lambda: rng.uniform(0.5, 1.0, shape), "mean": lambda: rng.normal(0, 0.2, shape),
                "var": lambda: rng.uniform(0.5, 2.0, shape), "bias": lambda: rng.normal(0, 0.2, shape)}
        if name in draw and (name != "bias" or "bn" in path[-2].key):
            return jnp.asarray(draw[name](), jnp.float32)
        return leaf

    params = jax.tree_util.tree_map_with_path(perturb, params)
    stats = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
    return model, {"params": params, "batch_stats": stats}


@functools.lru_cache(maxsize=None)
def forward(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=False)[0])


def check_equal(model, variables, x, compact, params, eager=True):
    want = forward(model)(variables, x)
    scale = float(jnp.max(jnp.abs(want)))
    assert 0.1 < scale < 1e3, scale  # a meaningful comparison: neither vanishing nor exploding logits
    tol = TOL * max(1.0, scale)
    np.testing.assert_allclose(jax.jit(compact.apply)(params, x), want, atol=tol, rtol=0)
    if eager:
        np.testing.assert_allclose(compact.apply(params, x), want, atol=tol, rtol=0)


# (name, image size, options): one block per stage (every kind of layer, a fraction of the compile time);
# SA-ResNet26 itself in test_real_digits_and_compact_run.
ONE_BLOCK = (1, 1, 1, 1)
STUDENTS = [
    ("sa_resnet26", 16, dict(variant="hybrid", stages=ONE_BLOCK)),
    ("sa_resnet26", 16, dict(variant="homogeneous", stages=ONE_BLOCK)),
    ("sa_resnet26", 32, dict(variant="hybrid", layout="imagenet", stages=ONE_BLOCK)),
]


@pytest.mark.parametrize("name,size,options", STUDENTS, ids=["hybrid", "homogeneous", "imagenet"])
@pytest.mark.slow
def test_compact_equals_masked_students(name, size, options):
    model, variables = student(name, size, **options)
    compact, params = compact_student(model, variables)
    x = jax.random.normal(jax.random.key(7), (3, size, size, 3))
    check_equal(model, variables, x, compact, params, eager=options["variant"] == "hybrid"
                and options.get("layout") is None)  # eager: op by op, slow; once is enough
    dense = sum(v.size for v in jax.tree.leaves(variables["params"]))
    floats, _ = count_values(params)
    assert floats < 0.6 * dense  # about half the prunable weights are gone


def hard_prune(params, seed=3):
    """Prunes a quarter of the conv1 output channels of every block at every consumer (query, key and
    value rows), and a quarter of the stem's channels at both its consumers: whole channels vanish."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.array, params)
    for name, block in params.items():
        if not name.startswith("stage"):
            continue
        width = block["conv1"]["kernel"].shape[-1]
        gone = rng.choice(width, width // 4, replace=False)
        for proj in ("query", "key", "value"):
            block["attention"][proj]["kernel"][gone] = 0
    first = params["stage1_block1"]
    stem = first["conv1"]["kernel"].shape[2]
    gone = rng.choice(stem, stem // 4, replace=False)
    first["conv1"]["kernel"][:, :, gone] = 0
    first["proj_conv"]["kernel"][:, :, gone] = 0
    return jax.tree.map(jnp.asarray, params)


@pytest.mark.slow
def test_whole_channels_vanish():
    model, variables = student("sa_resnet26", 16, variant="hybrid", stages=ONE_BLOCK)
    variables = {"params": hard_prune(variables["params"]), "batch_stats": variables["batch_stats"]}
    compact, params = compact_student(model, variables)
    # The stem (16 channels at width 0.25) keeps at most 12; every conv1 at most 3/4 of its channels.
    assert params["stem"]["bias"].shape[0] <= 12
    for name, block in params.items():
        if name.startswith("stage"):
            width = variables["params"][name]["conv1"]["kernel"].shape[-1]
            assert block["conv1"]["kernel"].shape[-1] <= width - width // 4
    x = jax.random.normal(jax.random.key(8), (2, 16, 16, 3))
    check_equal(model, variables, x, compact, params, eager=False)


@pytest.mark.slow
def test_teacher_conv_spatial_and_taps():
    """The conv spatial layer (the teacher's 3x3) with both k x k methods, channels dropped around it."""
    model, variables = student("resnet50", 16, width=0.125, density=0.3, stages=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(9), (2, 16, 16, 3))
    for kxk in ("gather", "taps", "conv"):
        compact, params = compact_student(model, variables, kxk=kxk)
        check_equal(model, variables, x, compact, params, eager=False)


@pytest.mark.slow
def test_conv_apply_against_lax_conv():
    """The k x k compact conv against lax.conv on the dense kernel with the pruned rows zeroed."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 5, 4))
    kernel[rng.random((3, 3, 5)) < 0.5] = 0
    kernel[1, 2] = 0  # a whole tap pruned
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 5)), jnp.float32)
    p = compact_conv(kernel, (np.ones(4), np.zeros(4)))  # no BatchNorm to fold: identity
    assert "t1_2" not in p["taps"] and len(p["taps"]) == 8
    want = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, jnp.float32), (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for method in ("gather", "taps", "conv"):
        np.testing.assert_allclose(conv_apply(p, x, 3, 2, 1, method), want, atol=1e-5)
        np.testing.assert_allclose(jax.jit(conv_apply, static_argnums=(2, 3, 4, 5))(p, x, 3, 2, 1, method),
                                   want, atol=1e-5)
    with pytest.raises(ValueError, match="unknown k x k method"):
        conv_apply(p, x, 3, 2, 1, "im2col")


@pytest.mark.slow
def test_real_digits_and_compact_run(tmp_path):
    """Real images (the embedded 8x8 digits) through a 1-channel student, compacted from a run directory
    as the trainer leaves it (config.json, model/, summary.json)."""
    from sklearn.datasets import load_digits

    from alite_jax import run_dir
    from tests.tiny_runs import tiny_config

    config = tiny_config("distill")
    config.sparsity.structure, config.sparsity.density = "column", 0.5
    model, variables = student("sa_resnet26", 8, channels=1)  # the model config.json describes
    workdir = str(tmp_path)
    run_dir.write_run_config(workdir, config, num_classes=10, channels=1)
    run_dir.export_model(workdir, variables)
    (tmp_path / "summary.json").write_text(json.dumps({"structure": "column", "density": 0.5}))
    compact, params, info = compact_run(workdir)
    assert info["structure"] == "column"
    assert info["params_nonzero"] < 0.6 * info["params_dense"]
    assert info["params_compact"] < 0.6 * info["params_dense"]
    images = jnp.asarray(load_digits().images[:16, :, :, None] / 16.0, jnp.float32)
    check_equal(model, variables, images, compact, params, eager=False)


@pytest.mark.slow
def test_artifact_round_trip_size_and_export(tmp_path):
    model, variables = student("sa_resnet26", 16, variant="hybrid", stages=ONE_BLOCK)
    compact, params = compact_student(model, variables)
    size = save_compact(str(tmp_path / "compact.npz"), compact, params)
    dense_size = save_sparse(str(tmp_path / "dense.npz"), variables, sparse=False)  # every leaf dense
    assert size < 0.6 * dense_size  # width 0.25: BN and embeddings weigh more than at width 1
    loaded_model, loaded = load_compact(str(tmp_path / "compact.npz"))
    assert loaded_model == compact == CompactResNet.from_json(compact.to_json())
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    fn = jax.jit(lambda images: loaded_model.apply(loaded, images))
    exported = jax.export.export(fn)(jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    # The exported function holds the parameters as constants, which XLA may fold in another order.
    np.testing.assert_allclose(exported.call(x), jax.jit(compact.apply)(params, x), atol=1e-6)
    with pytest.raises(ValueError, match="not a compact model"):
        load_compact(str(tmp_path / "dense.npz"))


def test_refuses_other_models():
    vit = create_model("deit_tiny", 10, image_size=32, patch_size=8, dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="zoo's ResNets"):
        compact_student(vit, {"params": {}, "batch_stats": {}})
    with pytest.raises(ValueError, match="unknown k x k method"):
        compact_student(create_model("sa_resnet26", 10, width=0.25), {}, kxk="winograd")


@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.slow
def test_sparse_store_round_trip(tmp_path, density):
    model = create_model("sa_resnet26", 10, width=0.25).clone(stage_sizes=ONE_BLOCK)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    masks, _ = init_masks(params, density, "irregular", seed=1)
    variables = {"params": apply_masks(params, masks), "other": {"ints": jnp.arange(5)}}
    path = str(tmp_path / "sparse.npz")
    size = save_sparse(path, variables)
    assert size == stored_bytes(variables)
    restored = load_sparse(path)
    assert jax.tree.structure(restored) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
        assert a.dtype == np.asarray(b).dtype
    dense = save_sparse(str(tmp_path / "dense.npz"), variables, sparse=False)
    # Values (4 bytes) at the density and a bit per weight, plus the unpruned leaves and npz headers.
    assert size < (density + 1 / 32 + 0.05) * dense
    np.savez(str(tmp_path / "plain.npz"), a=np.zeros(3))
    with pytest.raises(ValueError, match="not an alite_jax sparse store"):
        load_sparse(str(tmp_path / "plain.npz"))


@pytest.mark.slow
def test_densify_is_decode_in_jax():
    # Sizes that are not multiples of 8 (the bitmask's padding), an all-zero kernel, a fully dense one,
    # negative zeros (stored as zeros, restored as +0.0), eager and under jit.
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 5, 7)).astype(np.float32)
    kernel[rng.uniform(size=kernel.shape) < 0.9] = 0.0
    kernel[0, 0, :2] = -0.0
    flat = {"a/kernel": kernel, "b/zeros": np.zeros((9, 3), np.float32),
            "c/full": rng.standard_normal((4, 4)).astype(np.float32), "d/ints": np.arange(5, dtype=np.int32)}
    encoded = encode(flat)
    assert "a/kernel::bits" in encoded and "b/zeros::bits" in encoded and "c/full" in encoded
    reference = decode(encoded)
    for out in (densify(encoded), jax.jit(lambda: densify(encoded))()):
        assert set(out) == set(flat)
        for key in flat:
            np.testing.assert_array_equal(np.asarray(out[key]), reference[key])
            np.testing.assert_array_equal(np.asarray(out[key]), flat[key])
            assert np.asarray(out[key]).dtype == flat[key].dtype


def test_the_tree_flattener_round_trips():
    # Paths joined with "/" (the .npz keys) or "." (config field names), in the tree's order; flax's
    # FrozenDict walked like a dict; leaves kept as they are; an empty dict leaves no entry.
    from flax.core import FrozenDict

    leaf = jnp.arange(3)
    tree = {"b": {"kernel": leaf, "inner": FrozenDict({"x": 1})}, "a": [1, 2], "empty": {}}
    flat = flatten(tree)
    assert list(flat) == ["b/kernel", "b/inner/x", "a"] and flat["b/kernel"] is leaf
    assert unflatten(flat) == {"b": {"kernel": leaf, "inner": {"x": 1}}, "a": [1, 2]}
    dotted = flatten({"data": {"dataset": "digits", "image_size": 16}, "seed": 0}, sep=".")
    assert dotted == {"data.dataset": "digits", "data.image_size": 16, "seed": 0}
    assert unflatten(dotted, sep=".") == {"data": {"dataset": "digits", "image_size": 16}, "seed": 0}
