"""SPViT's search as a method of the trainer (mode "spvit_search"): the miniature end to end, the two
optimizer groups, the FLOPs term, the gates' rng, the pretrained start and the refused configs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import load_config

from alite_jax import run_dir, train
from alite_jax.errors import ConfigError, MissingFileError
from alite_jax.methods import METHODS, SPViTSearch
from alite_jax.methods.spvit import merge_pretrained, search_optimizer
from alite_jax.models import init_model, model_from_config

DEPTH = 2



def tiny(epochs=2):
    """The miniature's search, smaller still: depth 2, random init, 128 training images, batch 32."""
    c = load_config("spvit_demo").phases.search
    c.spvit.pretrained_workdir = ""
    c.num_epochs = epochs
    c.model.depth = DEPTH
    c.data.image_size = 8
    c.data.train_split, c.data.eval_split = "train[:128]", "test[:64]"
    c.data.batch_size = c.data.eval_batch_size = 32
    c.log_every_steps = 2
    return c


def test_registered():
    assert METHODS["spvit_search"] is SPViTSearch
    assert METHODS["spvit_search"] is SPViTSearch


@pytest.mark.slow
def test_optimizer_groups_on_a_handcrafted_tree():
    """Gate logits: their own lr, no weight decay; weights: the lr and weight decay (kernels only)."""
    lr, wd, arch_lr = 0.01, 0.5, 0.2
    params = {"block0": {"attn": {"msa_gate_logits": jnp.ones(3), "head_probs": jnp.ones((2, 9)),
                                  "v": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
                         "ffn_gate_logits": jnp.ones(8)}}
    tx = search_optimizer(lr, wd, arch_lr)
    state = tx.init(params)
    # Zero gradients: Adam's step is 0, what is left is the decoupled weight decay -lr * wd * param.
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["block0"]["attn"]["v"]["kernel"], -lr * wd)
    np.testing.assert_allclose(updates["block0"]["attn"]["head_probs"], -lr * wd)
    np.testing.assert_allclose(updates["block0"]["attn"]["v"]["bias"], 0.0)
    np.testing.assert_allclose(updates["block0"]["attn"]["msa_gate_logits"], 0.0)
    np.testing.assert_allclose(updates["block0"]["ffn_gate_logits"], 0.0)
    # Unit gradients: Adam's first step is -lr * sign (bias-corrected), each group at its own lr.
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, state, params)
    np.testing.assert_allclose(updates["block0"]["attn"]["msa_gate_logits"], -arch_lr, rtol=1e-5)
    np.testing.assert_allclose(updates["block0"]["ffn_gate_logits"], -arch_lr, rtol=1e-5)
    np.testing.assert_allclose(updates["block0"]["attn"]["v"]["kernel"], -lr * (1 + wd), rtol=1e-5)
    np.testing.assert_allclose(updates["block0"]["attn"]["v"]["bias"], -lr, rtol=1e-5)


@pytest.fixture(scope="module")
def search():
    """One compiled step of the miniature with a FLOPs term that dominates (target far below), a fresh
    state, a batch: (method, step, state, batch)."""
    config = tiny()
    config.spvit.update(lambda_=1e12, target_gflops=1e-6, arch_lr=0.2)
    method = SPViTSearch(config, 10)
    model, tx = method.student(), method.optimizer(10)
    step = jax.jit(train.make_train_step(method, model, None, tx, 10, seed=config.data.seed))
    init = jax.jit(lambda key: train.create_train_state(method, model, tx, key, config.data.image_size,
                                                        channels=1))
    rng = np.random.default_rng(0)
    batch = dict(image=jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
                 label=jnp.asarray(rng.integers(0, 10, 16), jnp.int32))
    return method, step, lambda: init(jax.random.key(config.seed)), batch


@pytest.mark.slow
def test_the_flops_term_pushes_the_macs_down_to_the_target(search):
    method, step, init, batch = search
    state = init()
    before = method.architecture(state["params"])["arch_gmacs"]
    assert before == method.architecture(state["params"])["dense_gmacs"]  # theta 1.5: every gate on
    for _ in range(15):
        state, metrics = step(state, batch, None)
    after = method.architecture(state["params"])["arch_gmacs"]
    assert after < 0.5 * before, (before, after)
    assert float(metrics["gmacs"]) == pytest.approx(after, rel=1e-5)  # the loss's F is the thresholded arch


@pytest.mark.slow
def test_same_seed_same_params_and_the_gates_rng_changes_with_the_step(search):
    _, step, init, batch = search
    runs = []
    for _ in range(2):
        state = init()
        for _ in range(3):
            state, _ = step(state, batch, None)
        runs.append(jax.device_get(state["params"]))
    jax.tree.map(np.testing.assert_array_equal, *runs)
    # Same params and batch, another step number: other gate samples, so another CE.
    ce = {}
    for s in (0, 1, 0):
        _, metrics = step(dict(init(), step=jnp.asarray(s, jnp.int32)), batch, None)
        ce.setdefault(s, []).append(float(metrics["ce"]))
    assert ce[0][0] == ce[0][1]
    assert ce[0][0] != ce[1][0]


def test_no_rngs_for_a_method_that_asks_none():
    """The default seam passes no rngs (AttentionLite's step is unchanged); "dropout" only for drop path."""
    from alite_jax.config import base_config

    config = base_config()
    assert METHODS["distill"](config, 10).apply_rngs(jax.random.key(0)) == {}
    config.model.drop_path_rate = 0.1
    assert set(METHODS["baseline"](config, 10).apply_rngs(jax.random.key(0))) == {"dropout"}


def dense_run(tmp_path, config, **changes):
    """A finished dense DeiT run directory of the miniature's shapes (random weights)."""
    dense = config.copy_and_resolve_references()
    dense.mode = "baseline"
    dense.model.update(changes)
    model = model_from_config(dense.model, 10, image_size=dense.data.image_size)
    variables = init_model(model, jax.random.key(7), dense.data.image_size, 1)
    workdir = str(tmp_path / "dense")
    os.makedirs(workdir)
    run_dir.write_run_config(workdir, dense, 10, 1)
    run_dir.export_model(workdir, variables)
    return workdir, variables["params"]


@pytest.mark.slow
def test_pretrained_dense_weights_start_the_supernet(tmp_path):
    config = tiny()
    config.spvit.pretrained_workdir, dense = dense_run(tmp_path, config)
    method = SPViTSearch(config, 10)
    method.check_inputs()
    model = method.student()
    fresh = init_model(model, jax.random.key(0), 8, 1)["params"]
    params = method.prepare_params(fresh, None, method.initial_inputs())
    merged, taken = merge_pretrained(fresh, dense)
    dense_leaves = len(jax.tree.leaves(dense))
    assert len(taken) == dense_leaves  # every dense weight has its place in the supernet
    np.testing.assert_array_equal(params["block1"]["attn"]["v"]["kernel"],
                                  dense["block1"]["attn"]["v"]["kernel"])
    np.testing.assert_array_equal(params["block0"]["fc1"]["kernel"], dense["block0"]["fc1"]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], dense["head"]["kernel"])
    for name in ("msa_gate_logits", "head_probs"):
        np.testing.assert_array_equal(params["block0"]["attn"][name], fresh["block0"]["attn"][name])
    np.testing.assert_array_equal(params["block0"]["ffn_gate_logits"], fresh["block0"]["ffn_gate_logits"])


@pytest.mark.slow
def test_a_pretrained_run_of_other_shapes_or_none_is_refused(tmp_path):
    config = tiny()
    config.spvit.pretrained_workdir, _ = dense_run(tmp_path, config, dim=16)
    with pytest.raises(ConfigError, match="not a dense DeiT of the shapes"):
        train.check_config(config, 1)
    config.spvit.pretrained_workdir = str(tmp_path / "nothing")
    with pytest.raises(MissingFileError, match="pretrained_workdir"):
        train.check_config(config, 1)


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "deit_huge", "unknown model 'deit_huge'"),
    ("model.name", "resnet50", "works on a DeiT"),
    ("spvit.target_gflops", 0.0, "config.spvit.target_gflops must be > 0"),
    ("spvit.lambda_", -1.0, "config.spvit.lambda_ must be >= 0"),
])
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, field, value, message):
    config = tiny()
    section, key = field.split(".")
    config[section][key] = value
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["spvit_demo", "spvit_deit_tiny_search"])
def test_the_configs_check(name):
    config = load_config(name)
    if name == "spvit_demo":
        config = config.phases.search
    assert config.mode == "spvit_search"
    SPViTSearch(config, 1000 if "imagenet" in config.data.dataset else 10).check()
    if name == "spvit_deit_tiny_search":
        assert (config.spvit.lambda_, config.spvit.target_gflops, config.spvit.arch_lr) == (20.0, 1.0, 1e-3)
        assert config.optimizer.lr * config.data.batch_size / config.optimizer.lr_batch == pytest.approx(1e-4)
        d = config.data
        assert (d.mixup_alpha, d.cutmix_alpha, d.label_smoothing, d.augment) == (0.8, 1.0, 0.1, "deit")
    smoke = load_config(name, "smoke")
    assert (smoke.phases.search if name == "spvit_demo" else smoke).num_epochs == 2
