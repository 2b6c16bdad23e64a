"""Tiny trainer runs shared by the trainer and multi-host tests (and the benchmarks that run them): a
config file, running main, reading results; and :func:`load_config`, a config file of configs/ as the
trainer reads it."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
from alite_jax.config import base_config
from alite_jax.models import abstract_variables


def get_config(arg=None):
    c = base_config()
    c.mode = {mode!r}
    c.num_epochs = {epochs}
    c.data.dataset = "digits"
    c.data.image_size = 8
    c.data.batch_size = c.data.eval_batch_size = 32
    c.data.train_split = "train[:{images}]"
    c.data.eval_split = "test[:64]"
    c.optimizer.lr = 0.05
    c.optimizer.decay_epochs = (2,)
    c.sparsity.density = 0.2
    c.log_every_steps = 1
    # BatchNorm statistics recomputed before each evaluation cost a compile per run; the runs that test
    # it set it (the trainer's resume tests, tests/test_training_health.py), the rest keep the running
    # averages.
    c.bn_batches = {bn_batches}
    c.teacher.workdir = {teacher!r}
    if {mix}:  # DeiT's batch mixing in the step: Mixup or CutMix, label smoothing
        c.data.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    if c.mode == "teacher":
        c.model.name, c.model.width = "resnet50", 0.125
    else:
        c.model.width = 0.25
    return c
"""


def load_config(name, arg=None):
    """``configs/<name>.py``'s ``get_config(arg)``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(mode, epochs=3, teacher="", mix=False, bn_batches=0, images=128):
    namespace = {}
    source = TINY.format(mode=mode, epochs=epochs, teacher=teacher, mix=mix, bn_batches=bn_batches,
                         images=images)
    exec(source, namespace)
    return namespace["get_config"]()


def write_config(path, mode, epochs=3, teacher="", mix=False, bn_batches=0, images=128):
    path.write_text(TINY.format(mode=mode, epochs=epochs, teacher=teacher, mix=mix, bn_batches=bn_batches,
                                images=images))
    return str(path)


def run_main(config_path, workdir, env=None, wait=True, flags=()):
    cmd = [sys.executable, "-m", "alite_jax.main", f"--config={config_path}", f"--workdir={workdir}",
           *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def final_params(workdir):
    """The exported model of a run, on this process's first device (whatever devices saved it)."""
    path = os.path.abspath(os.path.join(workdir, "model"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              checkpointer.metadata(path).item_metadata.tree)
        return checkpointer.restore(path, target)


def assert_same_model(workdir_a, workdir_b):
    """The two runs exported bit-identical variables (same tree, same values)."""
    a, b = final_params(workdir_a), final_params(workdir_b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def epoch_rows(workdir):
    """metrics.jsonl without the wall-clock field (the only one a resumed run may change)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    for r in rows:
        r.pop("epoch_time_s")
    return rows
