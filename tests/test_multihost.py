"""Multi-host data parallelism: 2 processes on loopback (CPU, gloo) train exactly like one process.

The two processes run ``python -m alite_jax.main`` as a user would on two hosts: JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID make ``--distributed=auto`` start jax.distributed; each process has
one CPU device and reads its own shard of the data. The reference is one process with two CPU devices
and the data cut into the same two shards, so both see the same global batches on a mesh of the same
shape: the result must be identical, not merely close.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_runs import ROOT, assert_same_model, epoch_rows, run_main, tiny_config, write_config

from alite_jax import distributed, run_dir
from alite_jax.models import abstract_variables, model_from_config

pytestmark = pytest.mark.slow  # end-to-end: deselected by the fast tier, -m "not slow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, workdir, port, num_processes=2):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes)}
    cmd = [sys.executable, "-m", "alite_jax.main", f"--config={config_path}", f"--workdir={workdir}"]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(num_processes)]


def finish(procs, timeout=600):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outs


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher run directory with an untrained ResNet-50 (He-normal kernels drawn with numpy, so
    nothing compiles), exported as the trainer exports one: what is tested is how the student trains."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = tiny_config("teacher")
    model = model_from_config(config.model, 10)
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return (rng.standard_normal(x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1]))).astype(x.dtype)
        return (np.ones if name.endswith(("['scale']", "['var']")) else np.zeros)(x.shape, x.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(model, 8, channels=1))
    run_dir.write_run_config(workdir, config, num_classes=10, channels=1)
    run_dir.export_model(workdir, variables)
    return workdir


def test_two_processes_preempted_and_resumed_equal_one_process(teacher_dir, tmp_path):
    """Sparse distillation in 2 processes; SIGTERM reaches one of them mid-epoch; both checkpoint at the
    same step, the job is started again, resumes, and ends with exactly the one-process result."""
    config_path = write_config(tmp_path / "distill.py", "distill", epochs=3, teacher=teacher_dir)
    reference = str(tmp_path / "one_process")
    run_main(config_path, reference, env={"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"},
             flags=["--config.data.data_shards=2"])

    workdir = str(tmp_path / "two_processes")
    procs = launch(config_path, workdir, free_port())
    lines = []
    for line in procs[0].stdout:  # only process 0 prints progress
        lines.append(line)
        if line.startswith("epoch 1 step 5/"):  # 4 steps per epoch: inside epoch 1
            procs[1].send_signal(signal.SIGTERM)  # the notice reaches the other host only
            break
    rest, _ = procs[0].communicate(timeout=600)
    outs = ["".join(lines) + rest] + finish(procs[1:])
    assert procs[0].returncode == 0, outs[0][-4000:]
    assert "process 0 of 2 (JAX_COORDINATOR_ADDRESS): 1 local of 2 devices" in outs[0]
    assert "on 2 device(s) in 2 processes" in outs[0]
    stopped = [re.findall(r"^preempted: checkpoint at step (\d+);", out, re.M) for out in outs]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], outs  # the same step on both processes
    step = int(stopped[0][0])
    assert 5 <= step < 12 and not os.path.exists(os.path.join(workdir, "summary.json")), outs[0][-3000:]
    assert "epoch 1 step" not in outs[1], "process 1 printed progress"

    outs = finish(launch(config_path, workdir, free_port()))
    assert f"resuming {workdir} at step {step} " in outs[0], outs[0][-3000:]

    assert_same_model(reference, workdir)
    assert epoch_rows(workdir) == epoch_rows(reference)
    summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (reference, workdir)]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    assert summaries[1]["density"] == pytest.approx(0.2, abs=1e-5)


def test_environment_decides_when_to_start():
    assert distributed.requested_by({}) is None
    assert distributed.requested_by({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert distributed.requested_by({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.requested_by({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "Slurm"
    assert distributed.requested_by({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert distributed.requested_by({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert distributed.requested_by({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "TPU slice"
    assert distributed.explicit_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                           "JAX_PROCESS_ID": "1"}) == dict(
        coordinator_address="h:1", num_processes=2, process_id=1)
    # Slurm supplies the count and rank itself; JAX's detection fills them in.
    assert distributed.explicit_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_JOB_ID": "7"}) == dict(
        coordinator_address="h:1")
    # Off, or nothing asking for it: no initialization (this process stays one process).
    assert not distributed.initialize("off", {"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert not distributed.initialize("auto", {})


@pytest.mark.parametrize("environ,match", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "needs a port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"must be in \[0"),
])
def test_bad_environment_fails_before_connecting(environ, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize("auto", environ)


def test_on_without_a_cluster_says_what_to_set():
    script = ("from alite_jax import distributed\n"
              "try:\n    distributed.initialize('on', {})\n"
              "except ValueError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if not k.startswith("JAX_COORD")})
    assert "no cluster" in result.stdout and "JAX_NUM_PROCESSES" in result.stdout, result.stderr[-2000:]


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="distributed mode must be one of"):
        distributed.initialize("yes", {})
    result = subprocess.run([sys.executable, "-m", "alite_jax.main", "--config=configs/demo.py",
                             "--workdir=unused", "--distributed=maybe"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "--distributed" in result.stderr
