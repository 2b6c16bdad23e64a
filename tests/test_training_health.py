"""A sparse run that keeps its weights at the dense run's scale and evaluates what it trained.

* :mod:`alite_jax.health`: the per-layer records, the growth warning and the non-finite check, by hand.
* :mod:`alite_jax.batch_norm_stats`: recomputed statistics equal each BatchNorm's batch statistics
  computed by hand.
* The regression: the digits at 16x16, where sparse training with the paper's round blew a layer's
  weights up by 1e6-1e11 within an epoch of the first prune/regrow round (an emptied channel regrown at
  zero under BatchNorm; docs/sparse_learning.md) and its evaluation reported a fraction of what the model
  scored in train mode. Every layer's max |w| must stay within a factor of the dense baseline's and the
  evaluation within a margin of the train-mode accuracy on the same images; the same run with the old
  rule must fail the first check (so the test can fail).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import tiny_config

from alite_jax import health, run_dir, train
from alite_jax.batch_norm_stats import batch_statistics, make_recompute
from alite_jax.config import base_config
from alite_jax.distributed import make_mesh
from alite_jax.models import create_model, init_model
from alite_jax.sparsity.masks import path_name


def test_health_records_and_checks_by_hand():
    params = {"conv": {"kernel": jnp.full((2, 2), 3.0)}, "bn": {"scale": jnp.array([0.0, 4.0])}}
    stats = {"bn": {"mean": jnp.array([-1.0, 2.0]), "var": jnp.array([0.25, 9.0])}}
    row = dict(epoch=3, **health.layer_health(params, stats))
    assert row["param_norm"] == {"conv/kernel": 6.0, "bn/scale": 4.0}
    assert row["bn_mean"] == {"bn": [-1.0, 2.0]} and row["bn_var"] == {"bn": [0.25, 9.0]}
    assert health.nonfinite(row) is None and health.check(None, row, 10.0) == []
    # The norm grows 6 -> 61 (more than 10x): named; the variance 9 -> 400 is a scale of 3 -> 20 (6.7x):
    # not named; with the check off nothing is.
    grown = dict(epoch=4, param_norm={"conv/kernel": 61.0, "bn/scale": 4.0}, bn_mean={"bn": [-1.0, 2.0]},
                 bn_var={"bn": [0.25, 400.0]})
    lines = health.check(row, grown, 10.0)
    assert lines == ["warning: epoch 4: conv/kernel's parameter norm grew 10.2x in one epoch (6 -> 61; "
                     "config.health_factor=10)"]
    assert health.check(row, grown, 0.0) == []
    grown["bn_var"] = {"bn": [0.25, float("inf")]}
    assert health.nonfinite(grown) == "bn (running var)"


def test_recomputed_statistics_are_the_batches_own():
    model = create_model("sa_resnet26", 10, width=0.25)
    variables = init_model(model, jax.random.key(0), 8, 1)
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)} for _ in range(3)]
    stats = make_recompute(model)(variables, batches)
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    # The stem's BatchNorm sees the stem convolution of the images: its statistics by hand.
    kernel = variables["params"]["stem_conv"]["kernel"]
    conv = [jax.lax.conv_general_dilated(b["image"], kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) for b in batches]
    mean = np.mean([c.mean(axis=(0, 1, 2)) for c in conv], axis=0)
    var = np.mean([c.var(axis=(0, 1, 2)) for c in conv], axis=0)
    np.testing.assert_allclose(stats["stem_bn"]["mean"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["stem_bn"]["var"], var, rtol=1e-4)
    # Every BatchNorm was reached, and the captured statistics are the ones BatchNorm normalised with.
    found = batch_statistics(model, variables, batches[0]["image"])
    assert len(found) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    np.testing.assert_allclose(found[("stem_bn",)]["mean"], conv[0].mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-7)


def _run_16x16(workdir, mode, **sparsity):
    config = tiny_config(mode, epochs=3)
    config.distill.loss = "ce"  # sparse training alone: the blow-up needs no teacher
    config.data.image_size = 16
    config.data.batch_size = config.data.eval_batch_size = 64
    config.data.train_split, config.data.eval_split = "train[:1024]", "test[:256]"
    config.sparsity.density = 0.1
    config.bn_batches = sparsity.pop("bn_batches", base_config().bn_batches)  # tiny runs turn it off
    config.sparsity.update(sparsity)
    train.train_and_evaluate(config, str(workdir))
    model, variables = run_dir.load_model(str(workdir), make_mesh())
    return dict(config=config, model=model, variables=variables, workdir=str(workdir))


def _max_abs(variables):
    return {path_name(p): float(jnp.max(jnp.abs(x)))
            for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
            if path_name(p).endswith("kernel")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    return {name: _run_16x16(root / name, mode, **fields) for name, mode, fields in (
        ("dense", "baseline", {}), ("sparse", "distill", {}),
        ("paper", "distill", dict(keep_channels=False, fan_in_init=False, bn_batches=0)))}


# Measured (3 epochs, seed 0): the sparse run's largest ratio of a layer's max |w| to the dense run's was
# 2.9; the paper's rule gave 1e10 (the stem). BatchNorm makes each layer's function independent of its
# weights' scale, so a sparse layer may settle at a few times the dense one's (its gradients are larger
# per weight); orders of magnitude is the singularity.
SCALE_FACTOR = 20.0


@pytest.mark.slow
def test_sparse_weights_stay_at_the_dense_scale(runs):
    dense = _max_abs(runs["dense"]["variables"])
    for name, worst_allowed in (("sparse", SCALE_FACTOR), ("paper", None)):
        ratios = {k: v / dense[k] for k, v in _max_abs(runs[name]["variables"]).items()}
        worst = max(ratios, key=ratios.get)
        print(f"{name}: largest max |w| over the dense run's: {ratios[worst]:.3g} ({worst})")
        if worst_allowed is not None:
            assert ratios[worst] <= worst_allowed, (name, worst, ratios[worst])
        else:  # the old rule fails the check: the test can fail
            assert ratios[worst] > 10 * SCALE_FACTOR, (name, worst, ratios[worst])


def _eval_and_train_mode_accuracy(run):
    """The final model's accuracy on the evaluation images in eval mode (running statistics) and in
    train mode (each batch's own statistics)."""
    from alite_jax import data

    pipe = data.create_input_pipeline(run["config"].data, make_mesh())
    apply = jax.jit(functools.partial(run["model"].apply, mutable=["batch_stats"]), static_argnames="train")
    correct = {False: 0, True: 0}
    for batch in pipe.eval_batches():
        for mode in correct:
            (logits, _), _ = apply(run["variables"], batch["image"], train=mode)
            correct[mode] += int(jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]))
    return tuple(correct[mode] / pipe.num_eval_examples for mode in (False, True))


# Eval mode against train mode on the same 256 images (batches of 64), measured: 51.6 and 51.6% (dense),
# 41.4 and 39.5% (sparse) with recomputed statistics; the old rule with running averages 24.6 against
# 39.1%. Batch statistics of 64 images move a few predictions; lagging averages move a third of them.
EVAL_MARGIN = 0.08


@pytest.mark.slow
def test_evaluation_agrees_with_train_mode_on_the_same_images(runs):
    for name in ("dense", "sparse"):
        eval_mode, train_mode = _eval_and_train_mode_accuracy(runs[name])
        print(name, eval_mode, train_mode)
        assert train_mode > 0.3, (name, train_mode)  # trained well above chance (0.1): a real comparison
        assert abs(eval_mode - train_mode) <= EVAL_MARGIN, (name, eval_mode, train_mode)
    eval_mode, train_mode = _eval_and_train_mode_accuracy(runs["paper"])
    print("paper", eval_mode, train_mode)
    assert train_mode - eval_mode > EVAL_MARGIN  # the old rule and running averages: the check can fail


@pytest.mark.slow
def test_every_epoch_records_its_health_and_the_report_plots_it(runs):
    rows = run_dir.read_metrics(runs["sparse"]["workdir"])
    assert len(rows) == 3
    for row in rows:
        assert set(row["param_norm"]) >= {"stem_conv/kernel", "stem_bn/scale", "head/kernel"}
        assert all(math.isfinite(v) for v in row["param_norm"].values())
        assert set(row["bn_var"]) >= {"stem_bn", "stage1_block1/bn1"}
        assert set(row["bn_mean"]) == set(row["bn_var"])
    assert os.path.exists(os.path.join(runs["sparse"]["workdir"], "health.png"))
