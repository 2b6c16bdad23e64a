"""The run directory's rules on small hand-made run directories (no training): which config changes make
another run, what counts as history, and where what is set aside goes."""

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from tiny_runs import ROOT, tiny_config

from alite_jax import methods, run_dir
from alite_jax.errors import RunDirError


def test_only_where_files_are_logging_and_the_attention_impl_may_change_on_resume(tmp_path):
    workdir = str(tmp_path)
    run_dir.write_run_config(workdir, tiny_config("baseline"), num_classes=10, channels=1)
    run_dir.append_metrics(workdir, {"epoch": 0, "test_accuracy": 0.5})
    changed = tiny_config("baseline")
    changed.data.data_dir, changed.data.manual_dir, changed.data.download = "/data", "/manual", False
    changed.teacher.workdir, changed.baseline_workdir = "/moved/teacher", "/moved/baseline"
    changed.log_every_steps, changed.checkpoint_max_to_keep, changed.model.impl = 7, 5, "patches"
    run_dir.check_same_run(workdir, changed, methods.registered_may_change())
    changed.data.image_size = 16
    with pytest.raises(RunDirError, match=r"data\.image_size is 8 in its config\.json, 16 now\. .*--fresh .*"
                                          + tmp_path.name + r"\.previous-1"):
        run_dir.check_same_run(workdir, changed, methods.registered_may_change())


def test_what_counts_as_history(tmp_path):
    """A config.json alone (a run stopped before its first epoch ended) is no history, and is replaced by
    another config; orbax's temporary directory of an unfinished save is none either."""
    workdir = str(tmp_path)
    run_dir.write_run_config(workdir, tiny_config("baseline"), num_classes=10, channels=1)
    os.makedirs(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1712"))
    assert run_dir.history(workdir) == []
    run_dir.check_same_run(workdir, tiny_config("teacher"))
    run_dir.check_nothing_to_lose(workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", "4.corrupt-1"))
    assert run_dir.history(workdir) == ["checkpoints"]
    with pytest.raises(RunDirError, match=r"history \(checkpoints\) but no checkpoint.*--fresh"):
        run_dir.check_nothing_to_lose(workdir)
    with pytest.raises(RunDirError, match=r"holds another run: .*mode is 'baseline' in its config\.json"):
        run_dir.check_same_run(workdir, tiny_config("teacher"))


def test_a_fresh_start_sets_the_whole_run_aside(tmp_path):
    workdir = str(tmp_path / "run")
    for n in (1, 2):
        os.makedirs(workdir)
        run_dir.write_run_config(workdir, tiny_config("baseline", epochs=n), num_classes=10, channels=1)
        assert run_dir.set_aside_run(workdir) == f"{workdir}.previous-{n}"
        assert not os.path.exists(workdir)
        assert run_dir.read_run_config(f"{workdir}.previous-{n}")["num_epochs"] == n
    os.makedirs(workdir)
    assert run_dir.set_aside_run(workdir) is None and os.path.isdir(workdir)  # empty: nothing to move


def test_checkpoint_max_to_keep_counts_epoch_checkpoints(tmp_path):
    """Two stops mid-epoch (steps 23 and 27, 10 steps an epoch) keep both epoch checkpoints of
    max_to_keep = 2; a stop's checkpoint stays while it is the newest and goes after the next save."""
    manager = run_dir.checkpoint_manager(str(tmp_path), 2, steps_per_epoch=10)
    kept = {}
    for step in (10, 20, 23, 27, 30, 33, 40):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": jnp.full(2, step)})))
        manager.wait_until_finished()
        kept[step] = sorted(manager.all_steps())
    assert kept == {10: [10], 20: [10, 20], 23: [10, 20, 23], 27: [10, 20, 27], 30: [20, 30],
                    33: [20, 30, 33], 40: [30, 40]}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "40"]
    # without steps_per_epoch (a manager that only reads): the newest max_to_keep, as orbax's own
    plain = run_dir.checkpoint_manager(str(tmp_path / "plain"), 2)
    for step in (10, 20, 23, 27):
        plain.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": jnp.full(2, step)})))
        plain.wait_until_finished()
    assert sorted(plain.all_steps()) == [23, 27]


def read_export(workdir):
    with ocp.StandardCheckpointer() as checkpointer:
        return float(checkpointer.restore(os.path.join(workdir, "model"))["params"]["w"][0])


def test_a_models_export_is_replaced_never_deleted_first(tmp_path, monkeypatch):
    """A finished run exported again (a rerun) keeps a whole model/ at every moment: a kill while the new
    one is written leaves the old one; a kill between the two renames that swap it in is finished by the
    next reader (a distillation's teacher check), which then finds the new one."""
    workdir = str(tmp_path)
    run_dir.write_run_config(workdir, tiny_config("baseline"), num_classes=10, channels=1)
    run_dir.export_model(workdir, {"params": {"w": jnp.full(3, 1.0)}})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            run_dir.export_model(workdir, {"params": {"w": jnp.full(3, 2.0)}})
    assert run_dir.is_finished_run(workdir) and read_export(workdir) == 1.0

    renames = []
    real_rename = os.rename

    def rename(src, dst):
        renames.append(os.path.basename(dst))
        if os.path.basename(dst) == "model":  # model -> model.old done, model.new -> model not yet
            raise KeyboardInterrupt
        real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            run_dir.export_model(workdir, {"params": {"w": jnp.full(3, 3.0)}})
    assert renames[-2:] == ["model.old", "model"]
    assert {"model.new", "model.old"} <= set(os.listdir(workdir)) and "model" not in os.listdir(workdir)
    assert run_dir.is_finished_run(workdir) and read_export(workdir) == 3.0
    run_dir.export_model(workdir, {"params": {"w": jnp.full(3, 4.0)}})
    assert read_export(workdir) == 4.0
    assert sorted(os.listdir(workdir)) == ["config.json", "model"]


def test_a_second_run_in_a_workdir_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    """Another process holds the workdir (a run in another terminal): a run there is refused, naming the
    holder, before anything is read or written; so is a second lock in the same process. Once the holder
    is killed (SIGKILL: no clean-up), the next run takes the lock over and says what happened."""
    from alite_jax import train

    workdir = str(tmp_path / "run")
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from alite_jax import run_dir\n"
            f"with run_dir.workdir_lock({workdir!r}):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = rf"{re.escape(workdir)} is in use by another run \(pid {holder.pid} on host .+, started "
        with pytest.raises(RunDirError, match=refused + r".*nothing was changed. Wait for it to end"):
            train.train_and_evaluate(tiny_config("baseline"), workdir)
        assert os.listdir(workdir) == ["lock"]
    finally:
        holder.kill()
        holder.wait()
    with run_dir.workdir_lock(workdir):
        out = capsys.readouterr().out
        assert re.search(rf"the last run in {re.escape(workdir)} \(pid {holder.pid} .*\) ended without "
                         r"releasing its lock \(it was killed\): taking it over", out), out
        assert open(os.path.join(workdir, "lock")).read().startswith(f"pid {os.getpid()} on host ")
        with pytest.raises(RunDirError, match="is in use by another run"):
            with run_dir.workdir_lock(workdir):
                pass
    assert os.listdir(workdir) == []  # the lock goes with the run; the directory was there before it
    fresh = str(tmp_path / "new")
    with pytest.raises(RunDirError):  # a run its checks refuse leaves no directory it created
        with run_dir.workdir_lock(fresh):
            raise RunDirError("refused")
    assert not os.path.exists(fresh)


def test_a_teacher_run_whose_model_is_empty_is_a_user_error(tmp_path):
    """A finished run's model/ emptied (a copy cut short, a disk fault): loading it, as a distillation
    loads its teacher, says which directory and what to do, instead of orbax's traceback."""
    from alite_jax.distributed import make_mesh

    workdir = str(tmp_path)
    run_dir.write_run_config(workdir, tiny_config("baseline"), num_classes=10, channels=1)
    os.makedirs(os.path.join(workdir, "model"))
    assert run_dir.is_finished_run(workdir)
    with pytest.raises(RunDirError, match=re.escape(os.path.join(workdir, "model")) + r" cannot be read as "
                       r"the model its config.json describes \(.+\); run that run again to export it"):
        methods.load_run(workdir, make_mesh())


def test_a_missing_teacher_names_the_teacher_config_of_the_data_set():
    from alite_jax.config import base_config, tiny_imagenet
    from alite_jax.errors import MissingFileError
    from alite_jax.methods.teacher import TEACHER_CONFIGS, check_teacher_run

    config = tiny_imagenet(base_config())
    config.teacher.workdir = ""
    with pytest.raises(MissingFileError, match=r"--config=configs/teacher_tiny_imagenet\.py --workdir=<dir>"):
        check_teacher_run(config, 200)
    assert all(os.path.exists(os.path.join(ROOT, path)) for path in TEACHER_CONFIGS.values())
