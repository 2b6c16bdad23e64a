"""The config as a user meets it: every field settable from the command line, every numeric field checked
against its meaning before anything is read or compiled, and the CLI's one-line answer to a user error."""

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from command_line import run_cli
from ml_collections import config_flags
from tiny_runs import ROOT, tiny_config, write_config

from alite_jax import config as alite_config
from alite_jax import train
from alite_jax.errors import ConfigError

CIFAR10 = os.path.join(ROOT, "configs", "cifar10.py")


def parse_command_line(*overrides: str):
    """The config ``python -m alite_jax.main --config=configs/cifar10.py <overrides>`` would run."""
    argv = ["main", f"--config={CIFAR10}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False, sys_argv=argv)
    values(argv)
    return values.config


def leaves(config, prefix=""):
    """{dotted field name: value} of every field of a ConfigDict, nested sections flattened."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def other_value(value) -> tuple[str, object]:
    """A command-line text for a field holding ``value`` and what it parses to (a value of the same type;
    None stands for a text field with no default)."""
    if isinstance(value, bool):
        return str(not value), not value
    if isinstance(value, int):
        return str(value + 3), value + 3
    if isinstance(value, float):
        return repr(value / 2 + 1), value / 2 + 1
    if isinstance(value, tuple):
        return "(7, 9)", (7, 9)
    return "/some/where", "/some/where"


def documented_fields() -> dict[str, str]:
    """{field: its "allowed" cell} of the user guide's config table (docs/guide.md)."""
    guide = open(os.path.join(ROOT, "docs", "guide.md")).read()
    section = guide.split("## Config fields", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([a-z_.]+)` \|.*\| ([^|]+) \|$", section, flags=re.M))


@pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated")  # config_flags' loader
def test_every_field_can_be_set_from_the_command_line():
    """Each field of the config, the text fields without a default (data.data_dir, ...) included."""
    fields = leaves(alite_config.base_config())
    assert {"data.data_dir", "data.manual_dir", "data.train_split", "data.eval_split"} <= set(fields)
    documented = documented_fields()
    assert set(documented) == set(fields), set(documented) ^ set(fields)
    texts, expected = {}, {}
    for name, value in fields.items():
        texts[name], expected[name] = other_value(value)
    config = parse_command_line(*(f"--config.{name}={text}" for name, text in texts.items()))
    assert leaves(config) == expected


# Bad values the issue met, with the range the message must give.
ISSUE_CASES = [
    ("optimizer.lr", -0.1, "> 0"),
    ("distill.alpha", 1.5, "[0, 1]"),
    ("distill.alpha", -0.5, "[0, 1]"),
    ("sparsity.prune_rate", 1.5, "[0, 1]"),
    ("distill.temperature", 0.0, "> 0"),
    ("optimizer.lr", float("nan"), "> 0"),
    ("optimizer.lr", float("inf"), "> 0"),  # non-finite values are refused like out-of-range ones
    ("distill.beta", float("inf"), ">= 0"),
]


def outside(allowed: alite_config.Range) -> float:
    """A value just outside ``allowed``."""
    if allowed.low > -math.inf:
        return allowed.low if allowed.low_open else allowed.low - 1
    return allowed.high if allowed.high_open else allowed.high + 1


def set_field(config, name, value):
    *sections, key = name.split(".")
    holder = config
    for section in sections:
        holder = holder[section]
    holder[key] = value


def test_every_numeric_field_has_a_range_and_the_readme_gives_it():
    """A numeric field added to the config without a range fails here: every one is checked."""
    numeric = {name for name, value in leaves(alite_config.base_config()).items()
               if isinstance(value, (int, float, tuple)) and not isinstance(value, bool)}
    assert numeric == set(alite_config.all_field_ranges())
    documented = documented_fields()
    for name, allowed in alite_config.all_field_ranges().items():
        assert str(allowed) in documented[name], (name, str(allowed), documented[name])


@pytest.mark.parametrize("name,value,allowed", ISSUE_CASES + [
    (name, outside(allowed), str(allowed)) for name, allowed in alite_config.all_field_ranges().items()])
def test_bad_numbers_are_refused_before_anything_is_written(name, value, allowed, tmp_path):
    """In any mode (the distillation's fields too), with the field and its allowed range named."""
    config = tiny_config("distill", teacher=str(tmp_path / "no_teacher_needed_to_refuse_this"))
    set_field(config, name, (int(value),) if name == "optimizer.decay_epochs" else value)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(f"config.{name} must be ") + ".*" + re.escape(allowed)):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_several_bad_fields_are_named_at_once():
    config = tiny_config("baseline")
    config.optimizer.lr, config.distill.alpha = -1.0, 2.0
    with pytest.raises(ConfigError, match=r"config\.optimizer\.lr .*; config\.distill\.alpha "):
        train.check_config(config, 1)


@pytest.mark.parametrize("config,flag,message", [
    ("tiny", "--config.distill.temperature=0",
     "error: config.distill.temperature must be > 0 (the softmax temperature rho), got 0.0"),
    ("configs/no_such_config.py", "", "No such file or directory: 'configs/no_such_config.py'"),
    ("configs/cifar10.py:smoek", "",
     "error: --config: unknown config switch 'smoek': the only one is 'smoke'"),
    # Overrides and flags absl and ml_collections refuse (before, a 46-line traceback and exit 1, or
    # absl's "FATAL Flags parsing error" and exit 1).
    ("tiny", "--config.sparsity.densty=0.2", "error: --config.sparsity.densty: the config has no field "
     "'densty'; did you mean \"density\" instead of \"densty\"? (the fields are those of "
     "alite_jax/config.py; a phased config's are under config.phases.<phase>)"),
    ("tiny", "--config.optimizer.lr=fast",
     "error: flag --config.optimizer.lr=fast: could not convert string to float: 'fast'"),
    ("tiny", "--workdirr=elsewhere", "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
])
def test_cli_prints_one_line_for_a_user_error(config, flag, message, tmp_path):
    if config == "tiny":
        config = write_config(tmp_path / "config.py", "baseline", epochs=1)
    workdir = tmp_path / "run"
    result = run_cli("alite_jax.main", f"--config={config}", f"--workdir={workdir}",
                     *([flag] if flag else []))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(message), result.stderr[-3000:]
    assert not workdir.exists()


@pytest.mark.slow
def test_cli_keeps_the_traceback_of_a_bug(tmp_path):
    """An error that is not the user's (a bug; here one is planted) is not hidden behind one line."""
    config_path = write_config(tmp_path / "config.py", "baseline", epochs=1)
    script = textwrap.dedent(f"""
        import sys
        from absl import app
        from alite_jax import main, train

        def bug(*args, **kwargs):
            raise RuntimeError("a bug")

        train.train_and_evaluate = bug
        sys.argv = ["main", "--config={config_path}", "--workdir={tmp_path / 'run'}"]
        app.run(main.main, flags_parser=main.parse_flags)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "RuntimeError: a bug"
