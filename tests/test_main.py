"""``python -m alite_jax.main`` on a phased config (the demo): a preemption stops the whole command, a rerun
resumes the interrupted phase, and every phase is checked before the first one runs."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_runs import ROOT, run_main, write_config

from alite_jax import main, train
from alite_jax.errors import ConfigError

pytestmark = pytest.mark.slow  # end-to-end: deselected by the fast tier, -m "not slow"


def demo_config(switch="smoke"):
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(switch)


def test_demo_smoke_switch_shrinks_every_phase():
    config = demo_config()
    for name in config.phase_order:
        phase = config.phases[name]
        assert phase.num_epochs == 2 and phase.data.train_split == "train[:512]", name
    assert demo_config(None).phases.teacher.num_epochs == 30


def test_a_preempted_phase_stops_the_demo_and_a_rerun_resumes_it(tmp_path, monkeypatch, capsys):
    """The notice comes in the teacher phase: the teacher checkpoints, and neither the baseline nor the
    student starts (before, the baseline trained and the student failed for want of a finished teacher).
    Run again, the teacher phase resumes where it stopped (and is stopped again, one step later, to keep
    the test short)."""
    workdir = str(tmp_path / "demo")
    monkeypatch.setattr(train.Preemption, "should_stop", lambda self, step: step == 1)
    assert main.run(demo_config(), workdir) == {"phase": "teacher", "preempted_at_step": 1}
    assert os.listdir(workdir) == ["teacher"]
    assert os.listdir(os.path.join(workdir, "teacher", "checkpoints")) == ["1"]
    capsys.readouterr()

    monkeypatch.setattr(train.Preemption, "should_stop", lambda self, step: step == 2)
    assert main.run(demo_config(), workdir) == {"phase": "teacher", "preempted_at_step": 2}
    out = capsys.readouterr().out
    assert f"resuming {os.path.join(workdir, 'teacher')} at step 1 " in out, out[-3000:]
    assert os.listdir(workdir) == ["teacher"]


def test_every_phase_is_checked_before_the_first_one_runs(tmp_path):
    config = demo_config()
    config.phases.student.distill.alpha = 2.0
    workdir = tmp_path / "demo"
    with pytest.raises(ConfigError, match=r"phase student: config\.distill\.alpha must be in \[0, 1\]"):
        main.run(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_notice_during_the_set_up_stops_cleanly_and_leaves_no_empty_directory(sig, tmp_path):
    """SIGTERM or Ctrl-C before the first step (here while the run reads its data and builds its state,
    once it holds the workdir's lock): the promised clean stop, exit status 0 and the line saying to run
    again, no traceback; no empty checkpoints/ left behind. The same command then trains the run (after
    SIGTERM: either signal leaves the same directory behind, so one rerun covers both)."""
    config_path = write_config(tmp_path / "config.py", "baseline", epochs=1)
    workdir = str(tmp_path / "run")
    proc = run_main(config_path, workdir, wait=False)
    lock = os.path.join(workdir, "lock")
    deadline = time.monotonic() + 120
    while not os.path.exists(lock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by a preemption notice: run the same command again to resume" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    if os.path.exists(workdir):  # the notice may land after the first step: then it checkpointed
        assert os.path.exists(os.path.join(workdir, "checkpoints")) == bool(
            [line for line in out.splitlines() if line.startswith("preempted: checkpoint at step")]), out
        assert "lock" not in os.listdir(workdir)
    if sig == signal.SIGTERM:
        run_main(config_path, workdir)
        assert os.path.exists(os.path.join(workdir, "summary.json"))


def test_a_full_disk_stops_with_one_line_and_a_rerun_on_a_freed_disk_resumes(tmp_path):
    """The workdir on a 7 MB filesystem (a tmpfs; one checkpoint of the tiny run is 4.4 MB): the second
    epoch's save fails. Before: 800-4,000 lines of stderr, the partial step directory left filling the
    disk, the failure noticed at the next save. Now: one line naming the filesystem, the step and the
    last good checkpoint, exit status 2, no partial directory; with space freed, the same command
    resumes from the last good checkpoint and finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        config_path = write_config(tmp_path / "config.py", "baseline", epochs=2)
        workdir = str(disk / "run")
        cmd = [sys.executable, "-m", "alite_jax.main", f"--config={config_path}", f"--workdir={workdir}"]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (
            f"error: no space left on {disk} while saving step 8: the last good checkpoint is step 4. Free "
            f"space there (or move the workdir) and run the same command again to resume"), \
            result.stderr[-3000:]
        assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr[-3000:]  # was 800-4,000
        assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        out = run_main(config_path, workdir)
        assert f"resuming {workdir} at step 4" in out, out
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
        assert [json.loads(line)["epoch"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [0, 1]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
