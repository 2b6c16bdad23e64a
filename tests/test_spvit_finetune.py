"""SPViT's fine-tuning as a method of the trainer (mode "spvit_finetune") and the miniature's whole path:
DeiT's hard distillation against a hand computation, the found architecture started from the dense
DeiT's weights, the refused inputs, and search -> extract -> fine-tune (-> distilled and sparse) end to end
through ``python -m alite_jax.main`` with the run directories it leaves (architecture.json, models that
reload, the folded model equal to the fine-tuned one, the report)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import load_config

from alite_jax import distill, methods, run_dir, train
from alite_jax.compact import spvit as compact_spvit
from alite_jax.distributed import make_mesh
from alite_jax.errors import ConfigError, MissingFileError
from alite_jax.methods import METHODS, SPViTFinetune
from alite_jax.models import init_model, model_from_config
from alite_jax.models import spvit_compact
from alite_jax.models.vit import VisionTransformer

CLASSES = 10



# ---- DeiT's hard distillation ----------------------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_hard_distillation_against_a_hand_computation(jit):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 3, 1, 4])
    fn = jax.jit(distill.hard_distillation_loss) if jit else distill.hard_distillation_loss
    total, terms = fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels), 0.5)
    log_p = s - np.log(np.exp(s).sum(-1, keepdims=True))
    ce = -np.mean([log_p[i, labels[i]] for i in range(4)])
    hard = -np.mean([log_p[i, int(np.argmax(t[i]))] for i in range(4)])
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(terms["hard_kd"], hard, rtol=1e-6)
    np.testing.assert_allclose(total, 0.5 * ce + 0.5 * hard, rtol=1e-6)
    # soft targets (Mixup, smoothing) for the base term; the teacher's argmax stays a hard label
    soft = np.full((4, 5), 0.05, np.float32)
    soft[np.arange(4), labels] = 0.8
    total_soft, _ = distill.hard_distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(soft), 0.25)
    np.testing.assert_allclose(total_soft, 0.75 * -np.mean((soft * log_p).sum(-1)) + 0.25 * hard, rtol=1e-6)
    # the gradient reaches the student only: d/ds of alpha CE(s, argmax t) + (1-alpha) CE(s, y)
    g_s, g_t = jax.grad(lambda a, b: distill.hard_distillation_loss(a, b, jnp.asarray(labels), 0.5)[0],
                        argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    p = np.exp(log_p)
    expected = (p - 0.5 * np.eye(5)[labels] - 0.5 * np.eye(5)[np.argmax(t, -1)]) / 4
    np.testing.assert_allclose(g_s, expected, atol=1e-6)
    assert not np.any(np.asarray(g_t))


# ---- The method, from a hand-written architecture and a dense run ------------------------------------

def finetune_config(tmp_path, arch_path, pretrained=""):
    c = load_config("spvit_demo").phases.finetune
    c.model.depth = 2
    c.spvit.update(architecture=str(arch_path), pretrained_workdir=pretrained)
    c.data.train_split, c.data.eval_split = "train[:128]", "test[:64]"
    c.data.batch_size = c.data.eval_batch_size = 32
    c.num_epochs = 2
    return c


def write_arch(tmp_path, config, blocks):
    arch = {"format": spvit_compact.ARCH_FORMAT, "image_size": config.data.image_size,
            "patch_size": config.model.patch_size, "in_chans": 1, "dim": config.model.dim,
            "depth": len(blocks), "num_heads": config.model.num_heads, "mlp_hidden": 4 * config.model.dim,
            "num_classes": CLASSES, "blocks": blocks}
    path = tmp_path / "architecture.json"
    compact_spvit.save_architecture(path, arch)
    return path, arch


def dense_run(tmp_path, config):
    """A finished dense DeiT run directory of the config's shapes (random weights)."""
    dense = config.copy_and_resolve_references()
    dense.mode = "baseline"
    model = model_from_config(dense.model, CLASSES, image_size=dense.data.image_size)
    variables = init_model(model, jax.random.key(7), dense.data.image_size, 1)
    workdir = str(tmp_path / "dense")
    os.makedirs(workdir)
    run_dir.write_run_config(workdir, dense, CLASSES, 1)
    run_dir.export_model(workdir, variables)
    return workdir, model, variables


BLOCKS = [{"attention": "3x3", "ffn_units": [0, 5, 17, 100]},
          {"attention": "msa", "ffn_units": list(range(0, 128, 2))}]


def test_registered():
    assert METHODS["spvit_finetune"] is SPViTFinetune
    assert methods.METHODS["spvit_finetune"] is SPViTFinetune


@pytest.mark.slow
def test_the_found_architecture_starts_from_the_dense_weights(tmp_path):
    config = finetune_config(tmp_path, "")
    arch_path, arch = write_arch(tmp_path, config, BLOCKS)
    pretrained, dense_model, dense_vars = dense_run(tmp_path, config)
    config.spvit.update(architecture=str(arch_path), pretrained_workdir=pretrained)
    num_classes = train.check_config(config, 1)
    method = SPViTFinetune(config, num_classes)
    model = method.student()
    assert isinstance(model, spvit_compact.CompactViT) and not model.folded
    fresh = init_model(model, jax.random.key(0), 8, 1)
    params = method.prepare_params(fresh["params"], None, method.initial_inputs())
    d = jax.device_get(dense_vars["params"])
    units = np.asarray(BLOCKS[0]["ffn_units"])
    np.testing.assert_array_equal(params["block0"]["fc1"]["kernel"], d["block0"]["fc1"]["kernel"][:, units])
    np.testing.assert_array_equal(params["block0"]["fc2"]["kernel"], d["block0"]["fc2"]["kernel"][units])
    for block, layer in (("block0", "v"), ("block1", "qk")):
        kernel = params[block]["attn"][layer]["kernel"]
        np.testing.assert_array_equal(kernel, d[block]["attn"][layer]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], d["head"]["kernel"])
    np.testing.assert_array_equal(params["block0"]["attn"]["head_probs"],
                                  fresh["params"]["block0"]["attn"]["head_probs"])
    # The loop's whole start: the same through the trainer's state (AdamW, no masks at density 1).
    tx = method.optimizer(4)
    state = train.create_train_state(method, model, tx, jax.random.key(0), 8, 1, method.initial_inputs())
    np.testing.assert_array_equal(state["params"]["block1"]["fc1"]["kernel"],
                                  d["block1"]["fc1"]["kernel"][:, np.asarray(BLOCKS[1]["ffn_units"])])
    assert isinstance(dense_model, VisionTransformer)


def test_refused_inputs(tmp_path):
    config = finetune_config(tmp_path, tmp_path / "none.json")
    with pytest.raises(MissingFileError, match="no architecture"):
        train.check_config(config, 1)
    config.spvit.architecture = ""
    with pytest.raises(ConfigError, match="needs config.spvit.architecture"):
        train.check_config(config, 1)
    arch_path, _ = write_arch(tmp_path, config, BLOCKS + BLOCKS)  # depth 4, the config says 2
    config.spvit.architecture = str(arch_path)
    with pytest.raises(ConfigError, match="depth"):
        train.check_config(config, 1)
    arch_path, _ = write_arch(tmp_path, config, BLOCKS)
    config.spvit.update(architecture=str(arch_path), distill="soft")
    with pytest.raises(ConfigError, match="spvit.distill"):
        train.check_config(config, 1)
    config.spvit.distill = "hard"
    with pytest.raises(MissingFileError, match="teacher"):
        train.check_config(config, 1)


# ---- The miniature end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_miniature_search_extract_finetune_end_to_end(tmp_path):
    """spvit_demo.py:smoke through the CLI's run(): every phase's files, the found architecture carried
    from the search to both fine-tunings, smaller and cheaper than the dense DeiT, models that reload."""
    from alite_jax import main

    config = load_config("spvit_demo", "smoke")
    for phase in config.phases.values():
        phase.data.train_split, phase.data.eval_split = "train[:256]", "test[:128]"
    # The dense DeiT stands in for the CNN teacher (any finished run of the zoo on the data can teach):
    # one network less to compile; the demo's own teacher phase is the AttentionLite demo's.
    config.phase_order = tuple(name for name in config.phase_order if name != "teacher")
    config.phases.finetune_kd_sparse.teacher.workdir = "dense"
    config.phases.search.spvit.arch_lr = 0.1  # 16 steps: fast enough gates to find something smaller
    workdir = tmp_path / "demo"
    main.run(config, str(workdir))
    search = json.loads((workdir / "search" / "summary.json").read_text())
    rows = [json.loads(line) for line in open(workdir / "search" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:  # per epoch: the thresholded architecture and its MACs, the loss terms
        assert len(r["arch_attention"]) == len(r["arch_ffn"]) == 3
        assert set(r["arch_attention"]) <= {"skip", "1x1", "3x3", "msa"}
        assert all(0 <= w <= 128 for w in r["arch_ffn"])
        assert 0 < r["arch_gmacs"] <= r["dense_gmacs"]
        assert {"train_ce", "train_flops_loss", "train_gmacs", "train_total"} <= set(r)
    for key in ("arch_attention", "arch_ffn", "arch_gmacs", "dense_gmacs"):
        assert search[key] == rows[-1][key]
    assert (search["mode"], search["target_gflops"], search["mlp_hidden"]) == ("spvit_search", 0.25e-3, 128)
    arch = compact_spvit.load_architecture(workdir / "search" / compact_spvit.ARCHITECTURE)
    assert [b["attention"] for b in arch["blocks"]] == search["arch_attention"]
    assert arch["search"] == {"target_gflops": 0.25e-3, "lambda_": 1e7}
    mesh = make_mesh()
    for name in ("finetune", "finetune_kd_sparse"):
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert summary["mode"] == "spvit_finetune"
        assert summary["arch_attention"] == search["arch_attention"]
        assert summary["arch_ffn"] == [len(b["ffn_units"]) for b in arch["blocks"]]
        assert summary["arch_gmacs"] == pytest.approx(search["arch_gmacs"])
        assert summary["arch_gmacs"] < summary["dense_gmacs"]
        assert summary["arch_params"] < summary["dense_params"]
        assert summary["dense_test_accuracy"] == json.loads(
            (workdir / "dense" / "summary.json").read_text())["test_accuracy"]
        assert (workdir / name / "spvit_table.md").exists()
        # The run directory reloads as the fine-tuned (unfolded) model; folded, it computes the same.
        model, variables = methods.load_run(str(workdir / name), mesh)
        assert isinstance(model, spvit_compact.CompactViT)
        own = compact_spvit.load_architecture(workdir / name / compact_spvit.ARCHITECTURE)
        folded = spvit_compact.CompactViT.from_architecture(own)
        x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
        np.testing.assert_allclose(folded.apply(compact_spvit.fold_variables(variables, own), x)[0],
                                   model.apply(variables, x)[0], atol=1e-5, rtol=0)
    sparse = json.loads((workdir / "finetune_kd_sparse" / "summary.json").read_text())
    assert sparse["distill"] == "hard" and sparse["structure"] == "irregular"
    assert sparse["density"] == pytest.approx(0.5, abs=0.01)
    assert sparse["teacher_test_accuracy"] is not None
    rows = [json.loads(line) for line in open(workdir / "finetune_kd_sparse" / "metrics.jsonl")]
    assert {"train_ce", "train_hard_kd", "train_total", "prune_rate"} <= set(rows[0])


def test_the_trainer_counts_the_fine_tuned_model_as_spvit_does_up_to_two_conventions():
    """costs.count_costs (the summary's flops) of the unfolded compact model vs SPViT's count
    (vit_costs.vit_arch_macs): the same MACs for every attention kind, except that SPViT runs the FFN on the
    patch tokens only and counts the LayerNorms (2 D per token, two per block)."""
    from alite_jax import costs, vit_costs

    blocks = [{"attention": k, "ffn_units": list(range(w))}
              for k, w in (("msa", 128), ("3x3", 40), ("1x1", 7), ("skip", 0))]
    arch = {"format": spvit_compact.ARCH_FORMAT, "image_size": 8, "patch_size": 2, "in_chans": 1, "dim": 32,
            "depth": 4, "num_heads": 2, "mlp_hidden": 128, "num_classes": CLASSES, "blocks": blocks}
    model = spvit_compact.CompactViT.from_architecture(arch, folded=False)
    ours = costs.count_costs(model, 8, 1)["macs"]
    shapes = spvit_compact.arch_cost_kwargs(arch)
    spvit_count = vit_costs.vit_arch_macs(spvit_compact.arch_blocks(arch), **shapes)
    tokens, d = 17, 32
    cls_ffn = sum(2 * d * len(b["ffn_units"]) for b in blocks)
    norms = 4 * 2 * d * tokens
    assert ours == spvit_count + cls_ffn - norms
