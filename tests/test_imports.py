"""Import cost: the package loads no TensorFlow, TFDS or Pallas until a TFDS data set or impl="pallas"
is used; and what a module knows does not depend on what else was imported (the export's compactors).
Checked in a fresh interpreter, since this test session has imported everything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters, a few seconds each: not in the fast tier

HEAVY = textwrap.dedent("""
    import sys
    def heavy():
        return sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
                      or m.startswith("jax.experimental.pallas") or m.endswith("local_attention.pallas"))
""")


def _run(code: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", HEAVY + textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_importing_the_package_loads_no_tensorflow_tfds_or_pallas():
    out = _run("""
        import alite_jax, alite_jax.main, alite_jax.train, alite_jax.costs, alite_jax.report
        from alite_jax import data, models
        models.create_model("sa_resnet26", 10, width=0.25)
        print(heavy())
    """)
    assert out.strip() == "[]", out


def test_the_digits_demo_data_loads_no_tensorflow_and_data_imports_no_models():
    out = _run("""
        from alite_jax import data
        pipe = data.create_input_pipeline(data.default_config("digits", image_size=16, batch_size=64))
        batch = next(iter(pipe.train_epoch(0)))
        models = sorted(m for m in sys.modules if m.startswith("alite_jax.models"))
        print(batch["image"].shape, heavy(), models)
    """)
    assert out.strip().endswith("[] []"), out


def test_pallas_loads_on_first_use():
    out = _run("""
        import jax.numpy as jnp
        from alite_jax.models import IMPLS
        assert "pallas" in IMPLS and not heavy(), heavy()
        x = jnp.ones((1, 4, 4, 1, 2))
        y = IMPLS["pallas"](x, x, x, jnp.zeros((3, 1, 2)), jnp.zeros((3, 1, 2)), kernel_size=3,
                            qk_scale=1.0, qr_scale=1.0)
        assert y.shape == x.shape and float(jnp.abs(y - 1).max()) < 1e-6  # uniform weights over v = 1
        print("alite_jax.models.local_attention.pallas" in heavy(), IMPLS["pallas"].__name__)
    """)
    assert out.split() == ["True", "pallas_local_attention"], out


def test_the_export_knows_every_compactor_on_a_fresh_import():
    # inference_function(workdir, compactor="column") looks the name up in COMPACTORS: importing the
    # inference module alone must be enough, whichever module defines the compactors.
    out = _run("""
        from alite_jax.export import inference
        print(sorted(inference.COMPACTORS), inference.COMPACTORS["column"].__module__)
    """)
    assert out.strip() == "['as_trained', 'auto', 'column', 'spvit'] alite_jax.export.compactors", out
