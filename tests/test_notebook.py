"""notebooks/quickstart.ipynb: it runs top to bottom on CPU (tiny setting), and its one settings cell
switches it to the paper's own configs."""

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from xla_flags import without_fast_compile
from tiny_runs import load_config
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # end-to-end: deselected by the fast tier, -m "not slow"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def code_cells(nb) -> dict:
    """The notebook's code cells by their tag (each has exactly one)."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(len(c.metadata.get("tags", [])) == 1 for c in cells)
    return {c.metadata["tags"][0]: c for c in cells}


def printed(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")



def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    # The kernel trains 8 epochs on the digits: run time, not compile time, dominates, so it runs at
    # XLA's default CPU code rather than with the session's fast-compile flags (tests/xla_flags.py).
    monkeypatch.setenv("XLA_FLAGS", without_fast_compile(os.environ.get("XLA_FLAGS", "")))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=1500, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = code_cells(nb)

    assert "alite_jax is already installed" in printed(cells["install"])
    assert "teacher: resnet50 on digits" in printed(cells["configure"])
    for tag in ("teacher", "distill"):  # progress with speed and ETA, then every epoch's line
        out = printed(cells[tag])
        assert re.search(r"steps/s [\d.]+ images/s ETA \d+h\d\dm\d\ds", out), out[-2000:]
        assert "epoch 3:" in out
    pngs = [base64.b64decode(o.data["image/png"]) for o in cells["plots"].outputs
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 2 and all(p[:8] == b"\x89PNG\r\n\x1a\n" and len(p) > 5000 for p in pngs)

    table = printed(cells["table"]).splitlines()
    assert table[0].startswith("| student | dataset | distill | pruning | density | accuracy (%)")
    assert table[2].startswith("| sa_resnet26 hybrid | digits | kd+at | irregular | 0.1 | ")
    assert re.search(r"\| \d+\.\d\dx \| \d+\.\d\dx \|$", table[2])  # parameter and FLOPs reductions

    run = tmp_path / "alite_runs" / "sa_resnet26_digits_d0.1_irregular"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["density"] == pytest.approx(0.1, abs=1e-5)
    assert summary["teacher_test_accuracy"] > 0.3  # the 4-epoch teacher learnt (measured 0.51; chance 0.1)
    assert f"{summary['params_nonzero']:,} non-zero of {summary['params_dense']:,}" in printed(cells["table"])

    own = printed(cells["own_code"])
    match = re.search(r"train accuracy ([\d.]+)%, density ([\d.]+)", own)
    assert match and float(match[2]) == 0.3, own  # the user's optimizer keeps the budget exactly
    assert float(match[1]) > 50, own  # and the pruned CNN learnt (measured 64%)


def test_the_settings_cell_switches_to_the_papers_configs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(nb)
    settings = cells["settings"].source.replace('SETTING = "tiny"', 'SETTING = "paper"')
    assert settings != cells["settings"].source
    namespace: dict = {}
    exec(settings, namespace)
    exec(cells["configure"].source, namespace)
    assert namespace["teacher"].to_dict() == load_config("teacher_cifar10").to_dict()
    expected = load_config("cifar10")
    expected.teacher.workdir = namespace["TEACHER_DIR"]
    assert namespace["student"].to_dict() == expected.to_dict()

    # On a TPU v2-8 (8 devices) the paper's batch of 100 cannot split: the cell rounds it up to 104.
    script = settings + "\n" + cells["configure"].source + "\nprint('BATCH', teacher.data.batch_size, " \
                                                           "student.data.eval_batch_size)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"})
    assert "BATCH 104 104" in result.stdout, result.stderr[-2000:]
    assert "batch size rounded up to 104, a multiple of 8 devices" in result.stdout


@pytest.mark.parametrize("source,accelerator,expected", [
    ("git+https://example.org/alite_jax.git", "none", "alite_jax @ git+https://example.org/alite_jax.git"),
    ("git+https://example.org/alite_jax.git", "gpu", "alite_jax[cuda12] @ git+https://example.org/alite_jax.git"),
    ("git+https://example.org/alite_jax.git", "tpu", "alite_jax[tpu] @ git+https://example.org/alite_jax.git"),
    (ROOT, "tpu", ROOT + "[tpu]"),  # a clone on disk: pip takes its path
])
def test_install_cell_asks_pip_for_the_right_build(monkeypatch, source, accelerator, expected):
    """Where alite_jax is missing, the install cell installs it with the runtime's JAX build (pip mocked)."""
    cells = code_cells(nbformat.read(NOTEBOOK, as_version=4))
    find_spec = importlib.util.find_spec
    missing = {"alite_jax"} | ({"libtpu"} if accelerator != "tpu" else set())
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" and accelerator == "tpu"
                        else None if name in missing else find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if accelerator == "gpu" else None)
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(cells["install"].source, {"ALITE_JAX_SOURCE": source})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", expected]]
