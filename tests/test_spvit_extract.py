"""Extraction of a searched SPViT architecture (``alite_jax.compact.spvit``) and the compact model
(``alite_jax.models.spvit_compact``).

The compact model with the folded supernet weights must compute what the supernet computes in evaluation
mode (same gates, BatchNorms on their running statistics); its parameter count must be the folded count
of ``alite_jax.vit_costs``; its analytic MACs are cross-checked against XLA's cost analysis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax import vit_costs
from alite_jax.compact import spvit as sc
from alite_jax.models import spvit_compact as mc
from alite_jax.models import count_params, spvit
from alite_jax.models.spvit_compact import CompactViT

B, IMAGE, PATCH, D, DEPTH, HEADS, CLASSES = 2, 16, 4, 32, 3, 2, 5
HIDDEN = 4 * D
HD = D // HEADS
TOL = dict(rtol=0.0, atol=1e-5)
# Gate logits forcing each attention type (g0, g1, g2 = 1[sigmoid(theta) > 0.5]).
FORCE = {"skip": (-2.0, 2.0, 2.0), "1x1": (2.0, -2.0, 2.0), "3x3": (2.0, 2.0, -2.0), "msa": (2.0, 2.0, 2.0)}
SUPERNET = spvit.SupernetViT(num_classes=CLASSES, image_size=IMAGE, patch_size=PATCH, dim=D, depth=DEPTH,
                             num_heads=HEADS)


SUPERNET_EVAL = jax.jit(lambda v, x: SUPERNET.apply(v, x, train=False))  # one compile for every gate setting


def random_variables(seed=2):
    """Random supernet variables, drawn in numpy on the init's shapes (no eager init: the CPU tests stay
    fast): params (biases included), non-uniform head mixing, random BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(SUPERNET.init, jax.random.key(0), jax.ShapeDtypeStruct((B, IMAGE, IMAGE, 3),
                                                                                  jnp.float32))
    params = jax.tree_util.tree_map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32),
                                    shapes["params"])
    stats = {}
    for i in range(DEPTH):
        params[f"block{i}"]["attn"]["head_probs"] = 0.01 * rng.standard_normal((HEADS, 9), np.float32)
        stats[f"block{i}"] = {"attn": {bn: {"mean": 0.5 * rng.standard_normal(HD, np.float32),
                                            "var": rng.uniform(0.5, 2.0, HD).astype(np.float32)}
                                       for bn in ("bn_3x3", "bn_1x1")}}
    to_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    return {"params": to_jax(params), "batch_stats": to_jax(stats)}


@pytest.fixture(scope="module")
def setup():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, IMAGE, IMAGE, 3), np.float32))
    return x, random_variables()


def with_gates(variables, kinds=None, ffn_off_block=None, key=3):
    """A copy of ``variables`` with random gate logits, or each block's attention forced to ``kinds``."""
    rng = np.random.default_rng(key)
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    for i in range(DEPTH):
        blk = params[f"block{i}"]
        msa = rng.standard_normal(3) if kinds is None else FORCE[kinds[i]]
        blk["attn"]["msa_gate_logits"] = jnp.asarray(msa, jnp.float32)
        ffn = rng.standard_normal(HIDDEN) if i != ffn_off_block else np.full(HIDDEN, -1.0)
        blk["ffn_gate_logits"] = jnp.asarray(ffn, jnp.float32)
    return {"params": params, "batch_stats": variables["batch_stats"]}


SCENARIOS = {
    "random": dict(),
    "forced": dict(kinds=("skip", "1x1", "3x3")),
    "forced2": dict(kinds=("msa", "3x3", "1x1")),
    "empty_ffn": dict(kinds=("1x1", "msa", "skip"), ffn_off_block=1),
}


def compact_of(variables):
    arch = sc.extract_architecture(variables["params"])
    return arch, CompactViT.from_architecture(arch), sc.compact_variables(variables, arch)


@pytest.mark.parametrize("scenario, jit", [(s, True) for s in sorted(SCENARIOS)]
                         + [("forced2", False)])
@pytest.mark.slow
def test_compact_model_equals_the_supernet_in_eval(setup, scenario, jit):
    x, variables = setup
    variables = with_gates(variables, **SCENARIOS[scenario])
    arch, model, cvars = compact_of(variables)
    if "kinds" in SCENARIOS[scenario]:
        assert [b["attention"] for b in arch["blocks"]] == list(SCENARIOS[scenario]["kinds"])
    # The compact tree is exactly what the compact model's init builds (names, shapes).
    init = jax.eval_shape(model.init, jax.random.key(0), x)
    init = {"params": init["params"], "batch_stats": init.get("batch_stats", {})}
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(cvars)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, init, cvars))
    if jit:
        ref_logits, ref_feats = SUPERNET_EVAL(variables, x)
        logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(cvars, x)
    else:
        ref_logits, ref_feats = SUPERNET.apply(variables, x, train=False)
        logits, feats = model.apply(cvars, x, train=False)
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    for f, r in zip(feats, ref_feats):
        np.testing.assert_allclose(f, r, rtol=0, atol=1e-4 * float(jnp.abs(r).max()))


@pytest.mark.slow
def test_compact_model_in_training_mode_matches_the_supernet(setup):
    """train=True: the BatchNorm of the found branch uses batch statistics in both, with the same result."""
    x, variables = setup
    variables = with_gates(variables, kinds=("3x3", "1x1", "msa"), ffn_off_block=2)
    arch, model, cvars = compact_of(variables)
    msa, ffn = sc.supernet_gates(arch)
    ref, ref_upd = jax.jit(lambda v, x: SUPERNET.apply(v, x, train=True, msa_gates=msa, ffn_gates=ffn,
                                                       mutable=["batch_stats"]))(variables, x)
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(cvars, x)
    np.testing.assert_allclose(out[0], ref[0], **TOL)
    np.testing.assert_allclose(upd["batch_stats"]["block0"]["attn"]["bn_3x3"]["mean"],
                               ref_upd["batch_stats"]["block0"]["attn"]["bn_3x3"]["mean"], atol=1e-6)


def test_folded_weights(setup):
    """The folded 3x3 kernel is the head mixture of v tap by tap; the FFN keeps exactly the gated units."""
    _, variables = setup
    variables = with_gates(variables, kinds=("3x3", "1x1", "skip"))
    arch, _, cvars = compact_of(variables)
    src = variables["params"]["block0"]
    a = np.asarray(jax.nn.softmax(src["attn"]["head_probs"] / spvit.HEAD_PROBS_ALPHA, axis=0))
    wv = np.asarray(src["attn"]["v"]["kernel"]).reshape(D, HEADS, HD)
    kernel = np.asarray(cvars["params"]["block0"]["attn"]["conv_3x3"]["kernel"])
    for kh in range(3):
        for kw in range(3):
            want = np.einsum("dhc,h->dc", wv, a[:, kh + 3 * kw])
            np.testing.assert_allclose(kernel[kh, kw], want, atol=1e-6)
    units = arch["blocks"][0]["ffn_units"]
    assert units == [u for u in range(HIDDEN) if float(src["ffn_gate_logits"][u]) > 0]
    np.testing.assert_array_equal(cvars["params"]["block0"]["fc1"]["kernel"],
                                  np.asarray(src["fc1"]["kernel"])[:, units])
    np.testing.assert_array_equal(cvars["params"]["block0"]["fc2"]["kernel"],
                                  np.asarray(src["fc2"]["kernel"])[units])
    assert "attn" not in cvars["params"]["block2"] and "norm1" not in cvars["params"]["block2"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_architecture_agrees_with_vit_costs_and_counts(setup, scenario):
    _, variables = setup
    variables = with_gates(variables, **SCENARIOS[scenario])
    arch, _, cvars = compact_of(variables)
    p = variables["params"]
    msa_logits = jnp.stack([p[f"block{i}"]["attn"]["msa_gate_logits"] for i in range(DEPTH)])
    ffn_logits = [p[f"block{i}"]["ffn_gate_logits"] for i in range(DEPTH)]
    blocks = mc.arch_blocks(arch)
    assert blocks == vit_costs.arch_from_gates(msa_logits, ffn_logits)
    assert {k: arch[k] for k in mc.SHAPE_FIELDS} == dict(
        image_size=IMAGE, patch_size=PATCH, in_chans=3, dim=D, depth=DEPTH, num_heads=HEADS,
        mlp_hidden=HIDDEN, num_classes=CLASSES)
    kw = mc.arch_cost_kwargs(arch)
    # Parameters: vit_arch_params' folded count, less norm1 (2 D) of each skipped block: a skipped slot adds
    # 0 here (the supernet's eval), so its LayerNorm is dead and not kept; vit_costs counts two norms per
    # block whatever the slot (SPViT's fine-tuning model returns LN(x) from a skipped slot and keeps it).
    # Likewise norm2 of an FFN that kept no unit: only fc2's bias remains of it.
    skips = sum(kind == "skip" for kind, _ in blocks) + sum(width == 0 for _, width in blocks)
    n = count_params(cvars["params"])
    assert n == vit_costs.vit_arch_params(blocks, convention="folded", **kw) - 2 * D * skips
    assert n < count_params(p)
    # MACs below the dense ViT's, and the supernet's differentiable count agrees at the eval threshold.
    macs = vit_costs.vit_arch_macs(blocks, **kw)
    assert macs < vit_costs.vit_macs(IMAGE, PATCH, D, DEPTH, HEADS, 4, CLASSES)
    np.testing.assert_allclose(float(vit_costs.supernet_macs(msa_logits, ffn_logits, **kw)), macs, rtol=1e-6)


def xla_macs(model, image_size):
    """XLA's flops of the compiled forward (shapes only: nothing is computed) / 2."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    cost = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"]) / 2


def test_macs_cross_check_against_xla_at_deit_tiny_scale():
    """vit_arch_macs of an architecture extracted from a DeiT-Ti supernet vs XLA's count of the compact model.

    XLA counts 2 flops per MAC of each dot and convolution, and 1 per element of every elementwise op.
    Beyond the analytic rule it therefore counts: the FFN on the class token (the rule counts the HW patch
    tokens only: 2 D w MACs per block, added below), and the elementwise work (biases, residuals, the
    exact GELU's erf polynomial, softmax, LayerNorm and BatchNorm arithmetic, ReLU) that the rule leaves
    out except for its 2 D N per block for the norms. It counts fewer 3x3-conv MACs than the rule: only the
    taps that fall inside the zero-padded grid, (3 s - 2)^2 per channel pair on an s x s grid instead of
    9 s^2 (the rule, as SPViT's flops(), counts the padding taps). At DeiT-Ti's shape the net excess is
    5-8 %: the test takes the rule (plus the class token's FFN, less the padding taps) as a lower bound
    and allows 10 % above it.
    """
    cfg = dict(num_classes=1000, image_size=224, patch_size=16, dim=192, depth=12, num_heads=3)
    shapes = jax.eval_shape(spvit.SupernetViT(**cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
    params = dict(shapes)
    rng = np.random.default_rng(0)
    for i in range(12):  # real gate logits; every other leaf stays a shape (extraction reads only shapes)
        blk = dict(params[f"block{i}"])
        blk["attn"] = dict(blk["attn"], msa_gate_logits=jnp.asarray(rng.normal(size=3) + 0.5, jnp.float32))
        blk["ffn_gate_logits"] = jnp.asarray(rng.normal(size=768) + 0.3, jnp.float32)
        params[f"block{i}"] = blk
    arch = sc.extract_architecture(params)
    blocks, kw = mc.arch_blocks(arch), mc.arch_cost_kwargs(arch)
    assert len({kind for kind, _ in blocks}) >= 3, blocks  # the seed gives a mixed architecture
    analytic = vit_costs.vit_arch_macs(blocks, **kw)
    s, hd = 14, 64
    padding_taps = sum(kind == "3x3" for kind, _ in blocks) * 192 * hd * (9 * s * s - (3 * s - 2) ** 2)
    lower = analytic + sum(2 * 192 * w for _, w in blocks) - padding_taps
    xla = xla_macs(CompactViT.from_architecture(arch), 224)
    assert lower <= xla <= 1.10 * lower, (xla, analytic, lower)


def test_xla_3x3_minus_1x1_is_the_conv_macs_inside_the_grid():
    """Two architectures that differ in one block's conv (3x3 vs 1x1) differ in XLA's count by the 3x3
    conv's extra MACs alone (the BN, ReLU, biases and projections are the same): the rule's 8 D hd HW,
    less the padding taps XLA does not count, D hd (9 HW - (3 s - 2)^2)."""
    cfg = dict(image_size=224, patch_size=16, dim=192, num_heads=3, num_classes=1000)
    s, d = cfg["image_size"] // cfg["patch_size"], cfg["dim"]
    hd = d // cfg["num_heads"]
    counts = {}
    for kind in ("3x3", "1x1"):
        blocks = (("msa", 50), (kind, 50), ("msa", 50))
        model = CompactViT(attention=tuple(k for k, _ in blocks), ffn_widths=(50,) * 3, **cfg)
        counts[kind] = (xla_macs(model, cfg["image_size"]), vit_costs.vit_arch_macs(blocks, **cfg))
    rule = counts["3x3"][1] - counts["1x1"][1]
    assert rule == 8 * d * hd * s * s
    np.testing.assert_allclose(counts["3x3"][0] - counts["1x1"][0],
                               rule - d * hd * (9 * s * s - (3 * s - 2) ** 2), rtol=1e-5)


def test_architecture_json_round_trip(setup, tmp_path):
    _, variables = setup
    arch = sc.extract_architecture(with_gates(variables)["params"])
    path = tmp_path / "arch.json"
    sc.save_architecture(path, arch)
    assert sc.load_architecture(path) == arch
    assert all(isinstance(u, int) for b in arch["blocks"] for u in b["ffn_units"])


def test_malformed_architectures_are_refused():
    base = {"format": mc.ARCH_FORMAT, "image_size": 16, "patch_size": 4, "in_chans": 3, "dim": 8, "depth": 1,
            "num_heads": 2, "mlp_hidden": 4, "num_classes": 3,
            "blocks": [{"attention": "msa", "ffn_units": [0, 2]}]}
    mc.validate_architecture(base)
    for bad in ({"format": "x"}, {"depth": 2}, {"blocks": [{"attention": "conv", "ffn_units": []}]},
                {"blocks": [{"attention": "msa", "ffn_units": [2, 0]}]},
                {"blocks": [{"attention": "msa", "ffn_units": [4]}]}):
        with pytest.raises(ValueError):
            mc.validate_architecture({**base, **bad})
