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
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from xla_flags import without_fast_compile
from tiny_runs import tiny_config

from alite_jax import health, methods, run_dir, train
from alite_jax.batch_norm_stats import batch_statistics, make_recompute
from alite_jax.config import base_config
from alite_jax.distributed import make_mesh
from alite_jax.models import create_model, init_model
from alite_jax.sparsity.masks import path_name

TESTS = os.path.dirname(os.path.abspath(__file__))


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


@pytest.mark.slow
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
    found = jax.jit(functools.partial(batch_statistics, model))(variables, batches[0]["image"])
    assert len(found) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    np.testing.assert_allclose(found[("stem_bn",)]["mean"], conv[0].mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.slow
def test_recomputed_statistics_draw_the_methods_random_streams():
    """A model whose train mode draws random numbers (here dropout before a BatchNorm, as SPViT's sampled
    gates) gets them from ``rngs`` of the key folded with the batch's index, and refuses to run
    without a key."""
    import flax.linen as nn

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dropout(0.5, deterministic=not train)(x)
            self.sow("intermediates", "dropped", x)
            return nn.BatchNorm(use_running_average=not train, name="bn")(x)

    model, x = Noisy(), jnp.arange(1.0, 33.0).reshape(8, 4)
    variables = model.init(jax.random.key(0), x)
    rngs = lambda key: {"dropout": key}  # noqa: E731
    recompute = make_recompute(model, rngs=rngs)
    with pytest.raises(ValueError, match="pass a key"):
        recompute(variables, [{"image": x}])
    key = jax.random.key(3)
    stats = recompute(variables, [{"image": x}] * 2, key)
    # By hand: what BatchNorm saw under the keys folded with 0 and 1, the batch's mean and variance of each.
    dropped = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.fold_in(key, i)},
                           mutable=["batch_stats", "intermediates"])[1]["intermediates"]["dropped"][0]
               for i in range(2)]
    np.testing.assert_allclose(stats["bn"]["mean"], np.mean([d.mean(0) for d in dropped], 0), rtol=1e-6)
    np.testing.assert_allclose(stats["bn"]["var"], np.mean([d.var(0) for d in dropped], 0), rtol=1e-5)
    assert not np.allclose(dropped[0], dropped[1])  # the two batches drew different masks


@pytest.mark.slow
def test_recomputed_statistics_leave_training_untouched(tmp_path):
    """Train mode normalises with each batch's own statistics, so a run that recomputes BatchNorm's
    statistics before each evaluation trains the same weights as one that keeps the running averages;
    only the exported statistics differ. (That such a run resumes exactly is the trainer's resume tests':
    their runs recompute, tests/test_train.py.)"""
    config = tiny_config("distill", epochs=2)
    config.distill.loss = "ce"
    runs = {}
    for bn_batches in (2, 0):
        config.bn_batches = bn_batches
        workdir = str(tmp_path / f"bn_batches_{bn_batches}")
        train.train_and_evaluate(config, workdir)
        runs[bn_batches] = methods.load_run(workdir, make_mesh())[1]
    recomputed, running = runs[2], runs[0]
    for a, b in zip(jax.tree.leaves(recomputed["params"]), jax.tree.leaves(running["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    var = [v["batch_stats"]["stem_bn"]["var"] for v in (recomputed, running)]
    assert not np.allclose(var[0], var[1])


EPOCHS = 2  # the first prune/regrow round ends epoch 0: the blow-up is in epoch 1's first steps
RUNS = (("dense", "baseline", {}), ("sparse", "distill", {}),
        ("paper", "distill", dict(keep_channels=False, fan_in_init=False, revive_dormant=False,
                                  bn_batches=0)))


def _run_16x16(workdir, mode, **sparsity):
    """One run at 16x16 (1,024 training images, batch 64, d = 0.1, CE alone: the blow-up needs no
    teacher), then what the tests check: every kernel's max |w| and the final model's accuracy on the
    evaluation images in eval mode (running statistics) and in train mode (each batch's own)."""
    from alite_jax import data

    config = tiny_config(mode, epochs=EPOCHS)
    config.distill.loss = "ce"
    config.data.image_size = 16
    config.data.batch_size = config.data.eval_batch_size = 64
    config.data.train_split, config.data.eval_split = "train[:1024]", "test[:256]"
    config.sparsity.density = 0.1
    config.bn_batches = sparsity.pop("bn_batches", base_config().bn_batches)  # tiny runs turn it off
    config.sparsity.update(sparsity)
    train.train_and_evaluate(config, str(workdir))
    model, variables = methods.load_run(str(workdir), make_mesh())
    max_abs = {path_name(p): float(jnp.max(jnp.abs(x)))
               for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
               if path_name(p).endswith("kernel")}
    pipe = data.create_input_pipeline(config.data, make_mesh())
    apply = jax.jit(functools.partial(model.apply, mutable=["batch_stats"]), static_argnames="train")
    correct = {False: 0, True: 0}
    for batch in pipe.eval_batches():
        for mode in correct:
            (logits, _), _ = apply(variables, batch["image"], train=mode)
            correct[mode] += int(jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]))
    return dict(workdir=str(workdir), max_abs=max_abs, eval_mode=correct[False] / pipe.num_eval_examples,
                train_mode=correct[True] / pipe.num_eval_examples)


def measure_all(root: str) -> None:
    """The three runs into ``root``, their measurements into ``root``/measured.json (run in a
    subprocess by the fixture)."""
    measured = {name: _run_16x16(os.path.join(root, name), mode, **dict(fields))
                for name, mode, fields in RUNS}
    with open(os.path.join(root, "measured.json"), "w") as f:
        json.dump(measured, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The runs execute more than they compile: one subprocess with XLA's default CPU code (not the
    # session's fast-compile flags, tests/xla_flags.py) takes about 2/3 of the time in-process runs do.
    root = str(tmp_path_factory.mktemp("health"))
    env = {**os.environ, "XLA_FLAGS": without_fast_compile(os.environ.get("XLA_FLAGS", "")),
           "JAX_PLATFORMS": "cpu"}
    script = (f"import sys; sys.path.insert(0, {TESTS!r}); import test_training_health as t; "
              f"t.measure_all({root!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(TESTS), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(root, "measured.json")) as f:
        return json.load(f)


# Measured (2 epochs, seed 0, XLA's default level on an AMD EPYC): the sparse run's largest ratio of a
# layer's max |w| to the dense run's was 12.8 (stage1_block1/proj_conv); the paper's rule gave 7.1e5
# (stage1_block1/attention/value), and 1e10 for the stem by the third epoch. At XLA's level 0 (code that
# rounds differently, as another CPU's would): 13.7 and 8.6e3; train-mode accuracy 24.2% at the least.
# BatchNorm makes each layer's function independent of its weights' scale, so a sparse layer may settle
# at several times the dense one's (its gradients are larger per weight); orders of magnitude is the
# singularity (the same 12.8 with revive_dormant).
# Over 3 seeds and 20 epochs the defaults keep every layer within 103x (benchmarks/RESULTS.md, issue 28).
SCALE_FACTOR = 100.0


@pytest.mark.slow
def test_sparse_weights_stay_at_the_dense_scale(runs):
    dense = runs["dense"]["max_abs"]
    for name, worst_allowed in (("sparse", SCALE_FACTOR), ("paper", None)):
        ratios = {k: v / dense[k] for k, v in runs[name]["max_abs"].items()}
        worst = max(ratios, key=ratios.get)
        print(f"{name}: largest max |w| over the dense run's: {ratios[worst]:.3g} ({worst})")
        if worst_allowed is not None:
            assert ratios[worst] <= worst_allowed, (name, worst, ratios[worst])
        else:  # the old rule fails the check: the test can fail
            assert ratios[worst] > 10 * SCALE_FACTOR, (name, worst, ratios[worst])


# Eval mode against train mode on the same 256 images (batches of 64), measured after 2 epochs: 32.4
# and 27.7% (dense), 30.5 and 31.3% (sparse) with recomputed statistics; the old rule with running
# averages 9.8 (chance) against 25.0%. Batch statistics of 64 images move a few predictions; lagging
# averages move a third of them.
EVAL_MARGIN = 0.08


@pytest.mark.slow
def test_evaluation_agrees_with_train_mode_on_the_same_images(runs):
    for name in ("dense", "sparse"):
        eval_mode, train_mode = runs[name]["eval_mode"], runs[name]["train_mode"]
        print(name, eval_mode, train_mode)
        assert train_mode > 0.2, (name, train_mode)  # trained well above chance (0.1): a real comparison
        assert abs(eval_mode - train_mode) <= EVAL_MARGIN, (name, eval_mode, train_mode)
    eval_mode, train_mode = runs["paper"]["eval_mode"], runs["paper"]["train_mode"]
    print("paper", eval_mode, train_mode)
    assert train_mode - eval_mode > EVAL_MARGIN  # the old rule and running averages: the check can fail


@pytest.mark.slow
def test_every_epoch_records_its_health_and_the_report_plots_it(runs):
    rows = run_dir.read_metrics(runs["sparse"]["workdir"])
    assert len(rows) == EPOCHS
    for row in rows:
        assert set(row["param_norm"]) >= {"stem_conv/kernel", "stem_bn/scale", "head/kernel"}
        assert all(math.isfinite(v) for v in row["param_norm"].values())
        assert set(row["bn_var"]) >= {"stem_bn", "stage1_block1/bn1"}
        assert set(row["bn_mean"]) == set(row["bn_var"])
    # the round after epoch 0 (not after the last) counts the weights it drew in dormant channels
    assert isinstance(rows[0]["revived"], int) and "revived" not in rows[-1]
    assert os.path.exists(os.path.join(runs["sparse"]["workdir"], "health.png"))
