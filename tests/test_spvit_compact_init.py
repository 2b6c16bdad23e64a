"""SPViT's fine-tuning form of a found architecture (``alite_jax.models.spvit_compact``, ``folded=False``).

The unfolded compact model keeps each conv block's ``v``, ``proj``, ``head_probs`` and BatchNorm with the
supernet's names and mixes the kernel at run time; ``fold_variables`` (``alite_jax.compact.spvit``) turns
it into the folded inference model; ``compact_from_dense`` starts it from a dense DeiT. Checked: parameter
names, shapes and counts (``vit_costs``' two conventions), equality with the supernet in eval and train
mode, folded vs unfolded logits, and the dense initialisation against independent constructions (the dense
ViT itself, the dense ViT with fc1 columns zeroed, and the supernet run on the dense weights with the
architecture's gates).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from alite_jax import vit_costs
from alite_jax.compact import spvit as sc
from alite_jax.models import spvit_compact as mc
from alite_jax.models import count_params, spvit, vit
from alite_jax.models.spvit_compact import CompactViT, UnfoldedConvAttention

B, IMAGE, PATCH, D, HEADS, CLASSES = 2, 16, 4, 32, 2, 5
HIDDEN, HD = 4 * D, D // HEADS
KINDS = ("3x3", "msa", "1x1", "skip")
DEPTH = len(KINDS)
TOL = dict(rtol=0.0, atol=1e-5)
SHAPE = dict(image_size=IMAGE, patch_size=PATCH, dim=D, depth=DEPTH, num_heads=HEADS)
SUPERNET = spvit.SupernetViT(num_classes=CLASSES, **SHAPE)


def make_arch(kinds=KINDS, keep=0.6, seed=0, num_classes=CLASSES):
    rng = np.random.default_rng(seed)
    blocks = [{"attention": k, "ffn_units": [int(u) for u in np.flatnonzero(rng.random(HIDDEN) < keep)]}
              for k in kinds]
    arch = {"format": mc.ARCH_FORMAT, "image_size": IMAGE, "patch_size": PATCH, "in_chans": 3, "dim": D,
            "depth": len(kinds), "num_heads": HEADS, "mlp_hidden": HIDDEN, "num_classes": num_classes,
            "blocks": blocks}
    mc.validate_architecture(arch)
    return arch


def random_like(model, seed, scale=0.3, image_size=IMAGE):
    """Random variables on ``model``'s init shapes (numpy draws: no eager init), with a non-uniform head
    mixing (A = softmax(head_probs / 0.01) of O(1) logits) and random BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((B, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    flat = traverse_util.flatten_dict(dict(shapes))
    out = {}
    for path, s in flat.items():
        if path[-1] == "head_probs":
            value = 0.01 * rng.standard_normal(s.shape)
        elif path[-1] == "mean":
            value = 0.5 * rng.standard_normal(s.shape)
        elif path[-1] == "var":
            value = rng.uniform(0.5, 2.0, s.shape)
        else:
            value = scale * rng.standard_normal(s.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    variables = traverse_util.unflatten_dict(out)
    variables.setdefault("batch_stats", {})
    return variables


def forced_gates(variables, arch):
    """The supernet's gate logits set so that its eval thresholds select ``arch``."""
    force = {"skip": (-2.0, 2.0, 2.0), "1x1": (2.0, -2.0, 2.0), "3x3": (2.0, 2.0, -2.0),
             "msa": (2.0, 2.0, 2.0)}
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    for i, block in enumerate(arch["blocks"]):
        params[f"block{i}"]["attn"]["msa_gate_logits"] = jnp.asarray(force[block["attention"]], jnp.float32)
        ffn = np.full(HIDDEN, -1.0, np.float32)
        ffn[block["ffn_units"]] = 1.0
        params[f"block{i}"]["ffn_gate_logits"] = jnp.asarray(ffn)
    return {**variables, "params": params}


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).standard_normal((B, IMAGE, IMAGE, 3), np.float32))


@functools.cache  # one compile per model and mode across the tests
def apply_fn(model, train=False):
    return jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"] if train else False))


def test_unfolded_parameters_have_the_supernet_names_and_vit_costs_counts(images):
    arch = make_arch()
    unfolded = jax.eval_shape(CompactViT.from_architecture(arch, folded=False).init, jax.random.key(0),
                              images)
    folded = jax.eval_shape(CompactViT.from_architecture(arch).init, jax.random.key(0), images)
    supernet = jax.eval_shape(SUPERNET.init, jax.random.key(0), images)
    for i, kind in enumerate(KINDS):
        name = f"block{i}"
        if kind in mc.CONV_KINDS:  # the supernet's attn, less the other branch and the gate logits
            bn = f"bn_{kind}"
            want = {k: supernet["params"][name]["attn"][k] for k in ("v", "proj", "head_probs", bn)}
            got = unfolded["params"][name]["attn"]
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, got, want)))
            assert unfolded["batch_stats"][name]["attn"][bn]["mean"].shape == (HD,)
            assert set(folded["params"][name]["attn"]) == {f"conv_{kind}", bn, "proj"}
    blocks, kw = mc.arch_blocks(arch), mc.arch_cost_kwargs(arch)
    # A skipped block has no norm1 here (its slot adds 0, the LayerNorm would be dead); vit_costs counts
    # two LayerNorms in every block, as SPViT's fine-tuning model, which returns LN(x) from a skipped slot.
    skip_norms = 2 * D * sum(kind == "skip" for kind in KINDS)
    assert count_params(unfolded["params"]) == vit_costs.vit_arch_params(
        blocks, convention="spvit", **kw) - skip_norms
    assert count_params(folded["params"]) == vit_costs.vit_arch_params(
        blocks, convention="folded", **kw) - skip_norms
    # Without skips the counts are vit_costs' exactly.
    arch3 = make_arch(KINDS[:3])
    blocks3 = mc.arch_blocks(arch3)
    for folded_flag, convention in ((False, "spvit"), (True, "folded")):
        model = CompactViT.from_architecture(arch3, folded=folded_flag)
        n = count_params(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
        assert n == vit_costs.vit_arch_params(blocks3, convention=convention, **kw)


def test_unfolded_head_probs_init_is_the_supernets():
    """head_probs start as the supernet's (ones, ziplab/SPViT's torch.ones: A uniform over the heads)."""
    tokens = jnp.ones((1, 1 + 4, D))
    slot = UnfoldedConvAttention("1x1", HEADS)
    hp = jax.jit(slot.init)(jax.random.key(0), tokens)["params"]["head_probs"]
    ref = jax.jit(spvit.UnifiedAttention(HEADS).init)(jax.random.key(1), tokens)["params"]["head_probs"]
    np.testing.assert_array_equal(hp, ref)
    np.testing.assert_array_equal(hp, np.ones((HEADS, 9)))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.slow
def test_unfolded_compact_model_equals_the_supernet_in_eval(images, jit):
    arch = make_arch()
    variables = forced_gates(random_like(SUPERNET, seed=1), arch)
    assert sc.extract_architecture(variables["params"]) == arch
    cvars = sc.compact_variables(variables, arch, folded=False)
    assert "head_probs" in cvars["params"]["block0"]["attn"]
    model = CompactViT.from_architecture(arch, folded=False)
    ref = apply_fn(SUPERNET)(variables, images)
    out = apply_fn(model)(cvars, images) if jit else model.apply(cvars, images)
    np.testing.assert_allclose(out[0], ref[0], **TOL)
    assert float(jnp.abs(ref[0]).max()) > 0.1  # not a trivially small output


@pytest.mark.slow
def test_unfolded_compact_model_matches_the_supernet_in_training(images):
    """train=True: the branch's BatchNorm on batch statistics, the same logits and running-mean update."""
    arch = make_arch(("1x1", "3x3", "msa"))
    supernet = spvit.SupernetViT(num_classes=CLASSES, **{**SHAPE, "depth": 3})
    variables = forced_gates(random_like(supernet, seed=2), arch)
    msa, ffn = sc.supernet_gates(arch)
    ref, ref_upd = jax.jit(lambda v, x: supernet.apply(v, x, train=True, msa_gates=msa, ffn_gates=ffn,
                                                       mutable=["batch_stats"]))(variables, images)
    model = CompactViT.from_architecture(arch, folded=False)
    out, upd = apply_fn(model, train=True)(sc.compact_variables(variables, arch, folded=False), images)
    np.testing.assert_allclose(out[0], ref[0], **TOL)
    for i, bn in ((0, "bn_1x1"), (1, "bn_3x3")):
        np.testing.assert_allclose(upd["batch_stats"][f"block{i}"]["attn"][bn]["mean"],
                                   ref_upd["batch_stats"][f"block{i}"]["attn"][bn]["mean"], atol=1e-6)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.slow
def test_fold_variables_gives_the_same_logits(images, jit):
    """Random unfolded variables (non-uniform head mixing, random BN statistics) -> folded: same logits."""
    arch = make_arch()
    unfolded_model = CompactViT.from_architecture(arch, folded=False)
    folded_model = CompactViT.from_architecture(arch)
    uvars = random_like(unfolded_model, seed=3)
    a = jax.nn.softmax(uvars["params"]["block0"]["attn"]["head_probs"] / spvit.HEAD_PROBS_ALPHA, axis=0)
    assert 0.05 < float(a.min()) and float(a.max()) < 0.95  # a real mixture, not one head per tap
    fvars = sc.fold_variables(uvars, arch)
    init = jax.eval_shape(folded_model.init, jax.random.key(0), images)
    assert jax.tree_util.tree_structure(dict(init)) == jax.tree_util.tree_structure(fvars)
    if jit:
        ref, out = apply_fn(unfolded_model)(uvars, images), apply_fn(folded_model)(fvars, images)
    else:
        ref, out = unfolded_model.apply(uvars, images), folded_model.apply(fvars, images)
    np.testing.assert_allclose(out[0], ref[0], **TOL)
    assert float(jnp.abs(ref[0]).max()) > 0.1
    # compact_variables(folded=True) is fold_variables of compact_variables(folded=False).
    svars = forced_gates(random_like(SUPERNET, seed=4), arch)
    direct = sc.compact_variables(svars, arch)
    via = sc.fold_variables(sc.compact_variables(svars, arch, folded=False), arch)
    jax.tree.map(np.testing.assert_array_equal, direct, via)
    with pytest.raises(ValueError, match="already folded"):
        sc.fold_variables(fvars, arch)


# ---- compact_from_dense -------------------------------------------------------------------------------

def dense_model(num_classes=CLASSES, depth=DEPTH):
    return vit.VisionTransformer(num_classes, **{**SHAPE, "depth": depth})


def fresh_unfolded(arch, images, seed=7):
    model = CompactViT.from_architecture(arch, folded=False)
    return model, random_like(model, seed=seed)  # random "fresh" values: a copy from it is visible


def test_all_msa_all_units_is_the_dense_vit(images):
    arch = make_arch(("msa",) * 3, keep=1.0)
    dense = dense_model(depth=3)
    dvars = random_like(dense, seed=5)
    model, fresh = fresh_unfolded(arch, images)
    variables, taken = sc.compact_from_dense(dvars["params"], arch, fresh)
    assert set(taken) == set(traverse_util.flatten_dict(dvars["params"], sep="/"))  # everything, head too
    want = apply_fn(dense)(dvars, images)[0]
    np.testing.assert_allclose(apply_fn(model)(variables, images)[0], want, **TOL)


@pytest.mark.slow
def test_dropped_units_are_the_dense_vit_with_fc1_columns_zeroed_and_a_new_head_stays_fresh(images):
    arch = make_arch(("msa",) * 3, keep=0.5, num_classes=7)
    dvars = random_like(dense_model(depth=3), seed=6)
    model, fresh = fresh_unfolded(arch, images)
    variables, taken = sc.compact_from_dense(dvars["params"], arch, fresh)
    assert not any(p.startswith("head/") for p in taken)
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    # The reference: the dense ViT (7 classes) with the compact model's fresh head and every dropped
    # unit's fc1 column and bias zeroed (GELU(0) = 0: a dropped unit adds nothing through fc2).
    ref = jax.tree_util.tree_map(np.array, dvars["params"])
    ref["head"] = fresh["params"]["head"]
    for i, block in enumerate(arch["blocks"]):
        dropped = np.setdiff1d(np.arange(HIDDEN), block["ffn_units"])
        assert 0 < len(dropped) < HIDDEN
        ref[f"block{i}"]["fc1"]["kernel"][:, dropped] = 0.0
        ref[f"block{i}"]["fc1"]["bias"][dropped] = 0.0
    want = apply_fn(dense_model(7, depth=3))({"params": ref}, images)[0]
    np.testing.assert_allclose(apply_fn(model)(variables, images)[0], want, **TOL)


def test_every_block_kind_from_dense_against_the_supernet_and_leaf_by_leaf(images):
    """All four kinds: each leaf is the dense model's (gathered for the FFN) or the fresh one's, as the
    rule says; and the model equals the supernet run on the dense weights with the fresh head_probs and
    BatchNorms, the architecture's gates as overrides (the FFN masked by gates rather than gathered)."""
    arch = make_arch()
    dparams = random_like(dense_model(), seed=8)["params"]
    model, fresh = fresh_unfolded(arch, images)
    variables, taken = sc.compact_from_dense(dparams, arch, fresh)
    dflat = traverse_util.flatten_dict(dparams, sep="/")
    fflat = traverse_util.flatten_dict(fresh["params"], sep="/")
    want_taken = {p for p in fflat if p.split("/")[0] in ("patch_embed", "cls_token", "pos_embed", "norm",
                                                          "head")}
    for i, block in enumerate(arch["blocks"]):
        keep = {"norm2", "fc1", "fc2"} | ({"norm1"} if block["attention"] != "skip" else set())
        want_taken |= {p for p in fflat if p.startswith(f"block{i}/") and p.split("/")[1] in keep}
        want_taken |= {p for p in fflat if p.startswith(f"block{i}/attn/") and p.split("/")[2] in
                       ("qk", "v", "proj")}
    assert set(taken) == want_taken
    gathered = {("fc1", "kernel"): lambda w, u: w[:, u], ("fc1", "bias"): lambda w, u: w[u],
                ("fc2", "kernel"): lambda w, u: w[u]}
    for path, value in traverse_util.flatten_dict(variables["params"], sep="/").items():
        parts = path.split("/")
        if path not in want_taken:
            want = fflat[path]
        elif tuple(parts[-2:]) in gathered:
            units = arch["blocks"][int(parts[0].removeprefix("block"))]["ffn_units"]
            want = gathered[tuple(parts[-2:])](np.asarray(dflat[path]), units)
        else:
            want = dflat[path]
        np.testing.assert_array_equal(value, want, err_msg=path)
    assert variables["batch_stats"] is fresh["batch_stats"]

    sflat = traverse_util.flatten_dict(random_like(SUPERNET, seed=9)["params"], sep="/")
    sflat.update(dflat)  # the dense weights at the same paths
    stats = jax.tree_util.tree_map(lambda a: a, random_like(SUPERNET, seed=9)["batch_stats"])
    for i, block in enumerate(arch["blocks"]):
        if block["attention"] in mc.CONV_KINDS:
            bn = f"bn_{block['attention']}"
            sflat[f"block{i}/attn/head_probs"] = fflat[f"block{i}/attn/head_probs"]
            for leaf in ("scale", "bias"):
                sflat[f"block{i}/attn/{bn}/{leaf}"] = fflat[f"block{i}/attn/{bn}/{leaf}"]
            stats[f"block{i}"]["attn"][bn] = fresh["batch_stats"][f"block{i}"]["attn"][bn]
    msa, ffn = sc.supernet_gates(arch)
    ref = jax.jit(lambda v, x: SUPERNET.apply(v, x, msa_gates=msa, ffn_gates=ffn))(
        {"params": traverse_util.unflatten_dict(sflat, sep="/"), "batch_stats": stats}, images)[0]
    np.testing.assert_allclose(apply_fn(model)(variables, images)[0], ref, **TOL)


def test_compact_from_dense_refuses_trees_that_do_not_fit(images):
    arch = make_arch()
    dparams = random_like(dense_model(), seed=10)["params"]
    _, fresh = fresh_unfolded(arch, images)
    folded_fresh = random_like(CompactViT.from_architecture(arch), seed=11)
    with pytest.raises(ValueError, match="UNFOLDED"):
        sc.compact_from_dense(dparams, arch, folded_fresh)
    shallow = {k: v for k, v in dparams.items() if k != f"block{DEPTH - 1}"}
    with pytest.raises(ValueError, match="blocks"):
        sc.compact_from_dense(shallow, arch, fresh)
    with pytest.raises(ValueError, match="params collection"):
        sc.compact_from_dense({"params": dparams}, arch, fresh)
    wide_model = vit.VisionTransformer(CLASSES, **{**SHAPE, "image_size": 2 * IMAGE})
    wide = random_like(wide_model, seed=12, image_size=2 * IMAGE)["params"]
    with pytest.raises(ValueError, match="pos_embed"):
        sc.compact_from_dense(wide, arch, fresh)
