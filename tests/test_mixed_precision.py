"""bfloat16 compute for the models and the sparse-distillation step, against float32.

Tolerances (stated in docs/guide.md): one full sparse-distillation step (student and teacher in bfloat16,
parameters and optimizer state in float32, losses in float32) gives every loss term within 2% of the
float32 step, and a parameter update whose cosine similarity with the float32 update is at least 0.9
(measured: 0.96; bfloat16 keeps 8 mantissa bits, so the backward pass through BatchNorm and attention
differs by a few per cent per element).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alite_jax import config as config_lib
from alite_jax import sparsity, train
from alite_jax.methods import AttentionLite
from alite_jax.models import compute_dtype, create_model, init_model, model_from_config

pytestmark = pytest.mark.slow  # two full sparse-distillation steps compile for minutes on 2 cores


def _configs():
    cfg = config_lib.base_config()
    cfg.model.width = 0.25
    cfg.sparsity.density = 0.5
    cfg.data.image_size = 16
    teacher_cfg = config_lib.teacher_config("cifar10")
    teacher_cfg.model.width = 0.25
    return cfg, teacher_cfg


def _initial():
    """The float32 state both steps start from, built once by the float32 models (the compute dtype does
    not change the parameters; this also saves compiling the bfloat16 initialisers). Eagerly: under jit
    the whole initialisation compiles as one program, which costs more CPU time (measured)."""
    cfg, teacher_cfg = _configs()
    method = AttentionLite(cfg, 10)
    teacher_variables = init_model(model_from_config(teacher_cfg.model, 10), jax.random.key(1), 16)
    state = train.create_train_state(method, model_from_config(cfg.model, 10), method.optimizer(10),
                                     jax.random.key(0), 16)
    return teacher_variables, state


def _step(dtype: str, initial):
    cfg, teacher_cfg = _configs()
    rng = np.random.default_rng(0)
    batch = dict(image=jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
                 label=jnp.asarray(rng.integers(0, 10, 16)))
    student = model_from_config(cfg.model, 10, dtype)
    teacher = model_from_config(teacher_cfg.model, 10, dtype)
    teacher_variables, state = initial  # both steps start from the same float32 state
    method = AttentionLite(cfg, 10)
    tx = method.optimizer(10)
    new_state, metrics = jax.jit(train.make_train_step(method, student, teacher, tx, steps_per_epoch=10))(
        state, batch, teacher_variables)
    # The stage outputs' dtypes, from the traced forward (nothing to compile).
    _, features = jax.eval_shape(lambda v, x: student.apply(v, x, train=False),
                                 {"params": state["params"], "batch_stats": state["batch_stats"]},
                                 batch["image"])
    return state, new_state, metrics, features


@pytest.fixture(scope="module")
def steps():
    initial = _initial()
    return {dtype: _step(dtype, initial) for dtype in ("float32", "bfloat16")}


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(steps):
    _, new_state, _, features = steps["bfloat16"]
    # Every stage runs in bfloat16 (the pooled head and the logits stay float32 by design).
    assert [f.dtype for f in features] == [jnp.dtype(jnp.bfloat16)] * 4
    assert {x.dtype for x in jax.tree.leaves(new_state["params"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_state["opt_state"]) if x.dtype != jnp.bool_
            } <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def test_bfloat16_step_agrees_with_float32(steps):
    state, new32, m32, _ = steps["float32"]
    _, new16, m16, _ = steps["bfloat16"]
    for term in ("ce", "kd", "at", "total"):
        assert abs(float(m16[term]) - float(m32[term])) <= 0.02 * abs(float(m32[term])), term
    up32 = jnp.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(new32["params"]),
                                                           jax.tree.leaves(state["params"]))])
    up16 = jnp.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(new16["params"]),
                                                           jax.tree.leaves(state["params"]))])
    cosine = float(up16 @ up32 / (jnp.linalg.norm(up16) * jnp.linalg.norm(up32)))
    assert cosine >= 0.9, cosine
    # The sparse masks are the same, so pruned weights stay exactly zero in both.
    mask_leaves = jax.tree.leaves(sparsity.get_masks(new16["opt_state"]))
    assert mask_leaves and all(m.dtype == jnp.bool_ for m in mask_leaves)
    flat16 = jax.tree.leaves(sparsity.apply_masks(new16["params"], sparsity.get_masks(new16["opt_state"])))
    for a, b in zip(flat16, jax.tree.leaves(new16["params"])):
        np.testing.assert_array_equal(a, b)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of .'float32', 'bfloat16'."):
        compute_dtype("bf16")
    with pytest.raises(ValueError, match="unknown compute dtype 'float64'"):
        create_model("resnet50", 10, dtype="float64")
    assert compute_dtype("bfloat16") == jnp.bfloat16


def test_bad_teacher_dtype_fails_before_compiling():
    cfg = config_lib.base_config()
    cfg.data.dataset, cfg.data.image_size = "digits", 8
    cfg.teacher.dtype = "fp16"
    with pytest.raises(ValueError, match="unknown compute dtype 'fp16'"):
        train.check_config(cfg, num_devices=1)
    cfg.teacher.dtype, cfg.model.dtype = "", "half"
    with pytest.raises(ValueError, match="unknown compute dtype 'half'"):
        train.check_config(cfg, num_devices=1)
