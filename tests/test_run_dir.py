"""The run directory's rules on small hand-made run directories (no training): which config changes make
another run, what counts as history, and where what is set aside goes."""

import os

import pytest
from tiny_runs import tiny_config

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
