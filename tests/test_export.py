"""alite_jax.export: inference artifacts of finished runs, their outputs against JAX's, and the refusals.

Tiny finished runs (config.json + model/, written directly) of a ResNet teacher (width 0.125), the
SA-ResNet26 students (width 0.25, hybrid and homogeneous) and a 2-block DeiT, on the 8x8 digits. Their
BatchNorm running statistics are perturbed so that eval mode is not the identity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from command_line import run_cli

from alite_jax import run_dir
from alite_jax.config import base_config
from alite_jax.data.pipeline import default_config
from alite_jax.errors import RunDirError
from alite_jax.export import formats, inference
from alite_jax.methods import get_method
from alite_jax.compact import spvit as compact_spvit
from alite_jax.models import abstract_variables

# Max abs difference of the logits, relative to their largest magnitude: float32, but XLA (JAX), the
# deserialized StableHLO and LiteRT's kernels fuse and order the sums differently. Measured (pytest -s
# prints them): StableHLO 0 to 3.5e-7, TFLite 2.8e-7 to 6.8e-7.
RTOL = 1e-5
KINDS = ("resnet", "hybrid", "homogeneous", "deit")
PLAIN_JAX_KINDS = ("resnet", "hybrid", "deit")


def make_run(workdir: str, kind: str, normalization: str = "dataset") -> None:
    """A finished run directory of a tiny model on the 8x8 digits (1 channel, 10 classes)."""
    c = base_config()
    c.data = default_config("digits", image_size=8, batch_size=32)
    c.data.update(train_split="train[:128]", eval_split="test[:64]", normalization=normalization)
    if kind == "resnet":
        c.mode, c.model = "teacher", dict(name="resnet50", layout="cifar", width=0.125, dtype="float32")
    elif kind in ("hybrid", "homogeneous"):
        c.mode = "baseline"
        c.model.update(width=0.25, variant=kind)
    else:
        c.mode = "teacher"
        c.model = dict(name="deit_tiny", dtype="float32", patch_size=4, dim=16, depth=2, num_heads=2)
    model = get_method(c, 10).student()
    variables = random_variables(abstract_variables(model, 8, 1), np.random.default_rng(1))
    os.makedirs(workdir, exist_ok=True)
    run_dir.write_run_config(workdir, c, 10, 1)
    run_dir.export_model(workdir, variables)


def random_variables(abstract, rng):
    """Variables of the abstract tree's shapes, drawn without initialising (compiling) the model: weights
    scaled by 1/sqrt(fan-in), BatchNorm scales near 1, running means near 0 and variances near 1, so
    the logits are O(1) and eval mode is not the identity."""

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 100
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for kind in KINDS:
        make_run(str(root / kind), kind)
    return {kind: str(root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def column_run(tmp_path_factory):
    """The hybrid student's run, column-pruned at d = 0.5 (:func:`column_pruned_run`)."""
    workdir = str(tmp_path_factory.mktemp("column"))
    column_pruned_run(workdir)
    return workdir


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)


REFERENCES = {}


def reference(workdir, images):
    """(fn, variables, meta, JAX's logits on ``images``) of a run, computed once per run."""
    if workdir not in REFERENCES:
        fn, variables, meta = inference.inference_function(workdir)
        REFERENCES[workdir] = fn, variables, meta, np.asarray(jax.jit(fn)(variables, images))
    return REFERENCES[workdir]


def relative_difference(out, ref):
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------------------------------
# The inference function: normalisation folded in, eval mode.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inference_function_folds_the_pipelines_normalisation(runs, images):
    fn, variables, meta, logits = reference(runs["resnet"], images)
    mean, std = np.asarray(meta["normalization"]["mean"]), np.asarray(meta["normalization"]["std"])
    # The digits' training split (dark background): the statistics the pipeline computed, not 0 and 1.
    assert 0.1 < mean[0] < 0.5 and 0.2 < std[0] < 0.5
    model = get_method(ml_collections.ConfigDict(run_dir.read_run_config(runs["resnet"])), 10).student()
    direct, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, (images - mean) / std)
    np.testing.assert_allclose(logits, np.asarray(direct), rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    assert meta["input"] == {**meta["input"], "shape": [None, 8, 8, 1], "dtype": "float32",
                             "range": [0.0, 1.0]}
    assert meta["output"]["shape"] == [None, 10] and meta["normalization"]["folded"]

    config = ml_collections.ConfigDict(dict(data=dict(normalization="imagenet", dataset="imagenet2012")))
    mean, std = inference.normalization_stats(config)
    assert mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert std.tolist() == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.slow
def test_a_compactor_replaces_the_model(runs, images):
    calls = []

    def halve(model, variables, summary):
        calls.append(summary)
        return (lambda v, x: 0.5 * model.apply(v, x, train=False)[0]), variables

    fn, variables, meta = inference.inference_function(runs["deit"], compactor=halve)
    _, _, _, logits = reference(runs["deit"], images)
    np.testing.assert_allclose(np.asarray(fn(variables, images)), 0.5 * logits, rtol=1e-6, atol=1e-7)
    assert calls == [None] and meta["model"]["compactor"] == "halve"


# --------------------------------------------------------------------------------------------------
# stablehlo: plain JAX runs it where alite_jax cannot be imported.
# --------------------------------------------------------------------------------------------------

PLAIN_JAX = textwrap.dedent("""
    import sys
    sys.path[:] = [p for p in sys.path if p] + [{site!r}]  # site-packages without its .pth files
    try:
        import alite_jax
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("alite_jax is importable: " + alite_jax.__file__)
    import json
    import jax
    import numpy as np
    import os
    out = {{}}
    for name, path in json.load(open("artifacts.json")).items():
        exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
        weights_file = os.path.join(os.path.dirname(path), "weights.jax_export")
        weights = ()  # sparse weights: a second program returns them, once
        if os.path.exists(weights_file):
            weights = (jax.export.deserialize(bytearray(open(weights_file, "rb").read())).call(),)
        x = np.load("images.npy")
        out[name] = np.asarray(exported.call(*weights, x)).tolist()
        if name == "hybrid":  # the symbolic batch: another size, same program
            out["hybrid, batch 1"] = np.asarray(exported.call(x[:1])).tolist()
    json.dump(out, open("out.json", "w"))
""")


@pytest.mark.slow
def test_stablehlo_runs_in_plain_jax_without_alite_jax(runs, images, tmp_path):
    # The homogeneous student (attention stem) is exported by the CLI's test. "irregular": an irregularly
    # pruned student (d = 0.1), whose weights the export stores as non-zeros in a second program.
    irregular_run(str(tmp_path / "irregular_run"))
    runs = dict(runs, irregular=str(tmp_path / "irregular_run"))
    artifacts, references = {}, {}
    for kind in PLAIN_JAX_KINDS + ("irregular",):
        fn, variables, meta, references[kind] = reference(runs[kind], images)
        artifacts[kind] = formats.export(fn, variables, meta, "stablehlo", str(tmp_path / kind))
        written = json.load(open(tmp_path / kind / formats.METADATA))
        assert written["input"]["shape"] == [None, 8, 8, 1] and written["format"] == "stablehlo"
        assert written["source_run"] == os.path.abspath(runs[kind])
        assert written["weights"] == ("sparse" if kind == "irregular" else "embedded")
    # Against the dense weights' own bytes (an embedded artifact adds its program to them): much smaller.
    dense = sum(np.asarray(x).nbytes for x in jax.tree.leaves(reference(runs["irregular"], images)[1]))
    sparse = os.path.getsize(artifacts["irregular"]) + os.path.getsize(tmp_path / "irregular" /
                                                                       formats.WEIGHTS_FILE)
    print(f"\nirregular d=0.1: sparse artifact {sparse:,} bytes, dense weights {dense:,}")
    assert sparse < 0.4 * dense
    (tmp_path / "artifacts.json").write_text(json.dumps(artifacts))
    np.save(tmp_path / "images.npy", images)
    site = os.path.dirname(os.path.dirname(jax.__file__))
    assert site == sysconfig.get_paths()["purelib"] or os.path.isdir(site)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", PLAIN_JAX.format(site=site)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.load(open(tmp_path / "out.json"))
    for kind in PLAIN_JAX_KINDS + ("irregular",):
        diff = relative_difference(np.asarray(out[kind]), references[kind])
        print(f"\nstablehlo {kind}: max relative difference {diff:.2e}")
        assert diff < RTOL, (kind, diff)
    assert relative_difference(np.asarray(out["hybrid, batch 1"]), references["hybrid"][:1]) < RTOL


# --------------------------------------------------------------------------------------------------
# tflite: LiteRT's interpreter against JAX; a layer TFLite cannot represent is named.
# --------------------------------------------------------------------------------------------------


def tflite_outputs(path, images):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own copy (deprecated in favour of ai-edge-litert)
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "hybrid", "deit", "column"])
def test_tflite_matches_jax(runs, column_run, images, tmp_path, kind):
    # The students as the CLI exports them for TFLite: impl="blocked_unchunked"; "column": the compact form
    # of a column-pruned student, against the trained (masked) model.
    if kind == "column":
        from alite_jax.export import compactors

        logits = reference(column_run, images)[3]
        fn, variables, meta = inference.inference_function(column_run, compactors.AUTO,
                                                           impl=inference.TFLITE_IMPL)
    elif kind == "hybrid":
        fn, variables, meta = inference.inference_function(runs[kind], impl=inference.TFLITE_IMPL)
        logits = reference(runs[kind], images)[3]
    else:
        fn, variables, meta, logits = reference(runs[kind], images)
    path = formats.export(fn, variables, meta, "tflite", str(tmp_path / "tflite"), batch=3,
                          allow_select_tf_ops=False)  # built-in ops only
    diff = relative_difference(tflite_outputs(path, images), logits)
    print(f"\ntflite {kind}: max relative difference {diff:.2e}")
    assert diff < RTOL, diff
    assert json.load(open(tmp_path / "tflite" / formats.METADATA))["conversion"]["select_tf_ops"] == []


@pytest.mark.slow
def test_tflite_names_the_layer_it_cannot_represent_and_the_fix(runs, column_run, tmp_path):
    # impl="patches": rank-6 einsums (TFLite's BATCH_MATMUL takes rank <= 5); impl="blocked" with a
    # dynamic batch: its chunk loop; the compact column student with a dynamic batch: its channel gathers.
    from alite_jax.export import compactors

    for workdir, compactor, impl, expected in [
            (runs["hybrid"], inference.AS_TRAINED, "patches", "tfl.batch_matmul in LocalSelfAttention "
             "(models/local_attention/patches.py:"),
            (runs["hybrid"], inference.AS_TRAINED, "blocked", "LocalSelfAttention (models/local_attention/"
             "blocked.py:"),
            (column_run, compactors.AUTO, inference.TFLITE_IMPL, "give a fixed batch size")]:
        fn, variables, meta = inference.inference_function(workdir, compactor, impl=impl)
        with pytest.raises(formats.ExportError) as error:
            formats.export(fn, variables, meta, "tflite", str(tmp_path / "tflite"),
                           batch=1 if impl == "patches" else None)
        message = str(error.value)
        print(f"\n{message}")
        assert expected in message and "\n" not in message
        if impl == "blocked":
            assert "impl='blocked_unchunked' (the CLI's default" in message
        assert not os.path.exists(tmp_path / "tflite")  # nothing written


def test_converter_messages_name_ops_and_layers():
    message = ("/x/alite_jax/models/local_attention/halo.py:121:9: error: failed to legalize operation "
               "'tfl.mul' that was explicitly marked illegal\n/x/alite_jax/models/local_attention/halo.py:"
               "236:13: note: called from\nSome ops are not supported by the native TFLite runtime\n"
               "TF Select ops: XlaGather, Einsum\n")
    assert formats.ops_and_layers(message) == (
        ["tf.Einsum", "tf.XlaGather", "tfl.mul"], ["LocalSelfAttention (models/local_attention/halo.py:121)"])


# --------------------------------------------------------------------------------------------------
# Refusals and the CLI
# --------------------------------------------------------------------------------------------------


def test_missing_package_unknown_format_and_sparse_tflite_are_refused(monkeypatch):
    monkeypatch.setitem(formats.NEEDS, "tflite", (("no_such_module_for_the_test", "no-such-pkg"),))
    with pytest.raises(formats.ExportError, match="--format=tflite needs no-such-pkg, which is not installed "
                                                  "here: pip install no-such-pkg"):
        formats.check_format("tflite")
    with pytest.raises(formats.ExportError, match="--format=onnx is not supported: no maintained"):
        formats.check_format("onnx")
    with pytest.raises(formats.ExportError, match="unknown format 'savedmodel'; choose one of stablehlo"):
        formats.check_format("savedmodel")
    with pytest.raises(formats.ExportError, match="--format=tflite stores the weights as constants of its "
                                                  "graph, dense: sparse weights are for --format=stablehlo"):
        formats.check_format("tflite", sparse_weights=True)
    formats.check_format("stablehlo", sparse_weights=True)


def test_unfinished_run_is_refused(runs, tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(runs["deit"], "config.json")).read())
    with pytest.raises(RunDirError, match="holds no finished model \\(no model\\)"):
        inference.inference_function(str(tmp_path))


@pytest.mark.slow
def test_cli_writes_the_artifact_and_refuses_bad_input(runs, images, tmp_path):
    out = tmp_path / "artifact"
    result = run_cli("alite_jax.export", f"--workdir={runs['homogeneous']}", "--format=stablehlo",
                     "--batch=3", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}/model.jax_export" in result.stdout
    meta = json.load(open(out / formats.METADATA))
    assert meta["input"]["shape"] == [3, 8, 8, 1] and meta["model"]["impl"] == "blocked"
    exported = jax.export.deserialize(bytearray((out / "model.jax_export").read_bytes()))
    _, _, _, logits = reference(runs["homogeneous"], images)
    assert relative_difference(np.asarray(exported.call(images)), logits) < RTOL

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "file").write_text("a file where the artifact's directory should go")
    for flags, expected in [
            ((f"--workdir={unfinished}", "--format=stablehlo"),
             "holds no finished model (no config.json and no model)"),
            ((f"--workdir={runs['deit']}", "--format=savedmodel"), "unknown format 'savedmodel'"),
            ((f"--workdir={runs['deit']}", "--format=onnx"), "--format=onnx is not supported: no maintained"),
            ((f"--workdir={runs['hybrid']}", "--format=stablehlo", "--impl=nope"), "unknown"),
            ((f"--workdir={runs['deit']}", "--format=tflite", "--batch=0"), "--batch must be a positive"),
            ((f"--workdir={runs['deit']}",), "give --workdir=<a finished run> and --format="),
            ((f"--workdir={runs['deit']}", "--format=stablehlo", "--batch_sise=2"),
             "Unknown command line flag 'batch_sise'"),
            ((f"--workdir={runs['deit']}", "--format=stablehlo", f"--out={unfinished}/file/artifact"),
             f"{unfinished}/file")]:
        result = run_cli("alite_jax.export", *flags)
        assert result.returncode == 2, (flags, result.stderr[-2000:])
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(os.path.join(runs["deit"], "export"))


# --------------------------------------------------------------------------------------------------
# Compaction in the export: "auto" picks the compact form, which computes what the trained model does.
# --------------------------------------------------------------------------------------------------


def column_pruned_run(workdir):
    """The hybrid student's run with random column masks at density 0.5 applied (zeros in model/), and a
    summary that says so."""
    from alite_jax import sparsity

    make_run(workdir, "hybrid")
    model = get_method(ml_collections.ConfigDict(run_dir.read_run_config(workdir)), 10).student()
    variables = random_variables(abstract_variables(model, 8, 1), np.random.default_rng(3))
    masks, _ = sparsity.init_masks(variables["params"], 0.5, "column", seed=0)
    variables = dict(variables, params=sparsity.apply_masks(variables["params"], masks))
    run_dir.export_model(workdir, variables)
    run_dir.write_summary(workdir, {"structure": "column", "density": 0.5})


def irregular_run(workdir, density=0.1):
    """The hybrid student's run with random irregular masks applied (zeros in model/), and a summary that
    says so."""
    from alite_jax import sparsity

    make_run(workdir, "hybrid")
    model = get_method(ml_collections.ConfigDict(run_dir.read_run_config(workdir)), 10).student()
    variables = random_variables(abstract_variables(model, 8, 1), np.random.default_rng(5))
    masks, _ = sparsity.init_masks(variables["params"], density, "irregular", seed=0)
    variables = dict(variables, params=sparsity.apply_masks(variables["params"], masks))
    run_dir.export_model(workdir, variables)
    run_dir.write_summary(workdir, {"structure": "irregular", "density": density})


def spvit_finetune_run(workdir):
    """A fine-tuned SPViT miniature's run: a 1x1, a 3x3 and an MSA block (unfolded, random weights)."""
    from alite_jax.compact.spvit import save_architecture
    from alite_jax.models.spvit_compact import ARCH_FORMAT
    from alite_jax.models.spvit_compact import CompactViT

    c = base_config()
    c.data = default_config("digits", image_size=8, batch_size=32)
    c.mode = "spvit_finetune"
    c.model = dict(name="deit_tiny", dtype="float32", patch_size=2, dim=16, depth=3, num_heads=2)
    blocks = [{"attention": k, "ffn_units": list(range(0, 64, s))} for k, s in (("1x1", 3), ("3x3", 1),
                                                                               ("msa", 5))]
    arch = {"format": ARCH_FORMAT, "image_size": 8, "patch_size": 2, "in_chans": 1, "dim": 16,
            "depth": 3, "num_heads": 2, "mlp_hidden": 64, "num_classes": 10, "blocks": blocks}
    os.makedirs(workdir, exist_ok=True)
    save_architecture(os.path.join(workdir, compact_spvit.ARCHITECTURE), arch)
    model = CompactViT.from_architecture(arch, folded=False)
    variables = random_variables(abstract_variables(model, 8, 1), np.random.default_rng(4))
    run_dir.write_run_config(workdir, c, 10, 1, (np.array([0.3]), np.array([0.4])))
    run_dir.export_model(workdir, variables)


@pytest.mark.parametrize("kind", ["column", "spvit"])
@pytest.mark.slow
def test_auto_exports_the_compact_model_computing_the_same(tmp_path, column_run, images, kind):
    from alite_jax.export import compactors

    workdir = column_run
    if kind == "spvit":
        workdir = str(tmp_path / kind)
        spvit_finetune_run(workdir)
    _, trained_vars, _, trained = reference(workdir, images)  # as trained (dense or masked)
    fn, variables, meta = inference.inference_function(workdir, compactors.AUTO)
    assert meta["model"]["compactor"] == "auto"
    compact = np.asarray(jax.jit(fn)(variables, images))
    assert relative_difference(compact, trained) < RTOL
    # The compact artifact through plain JAX; the weights it holds against the trained model's (the
    # artifacts' own sizes, overhead included, are measured by benchmarks/inference.py).
    path = formats.export(fn, variables, meta, "stablehlo", str(tmp_path / f"{kind}_compact"))
    exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
    assert relative_difference(np.asarray(exported.call(images)), trained) < RTOL
    sizes = {name: sum(np.asarray(x).nbytes for x in jax.tree.leaves(v))
             for name, v in (("compact", variables), ("trained", trained_vars))}
    if kind == "column":  # the pruned rows are gone (BatchNorm folded too)
        assert sizes["compact"] < 0.62 * sizes["trained"], sizes
    else:  # folded: plain conv kernels, no v / head_probs left (a 3x3 kernel of 9 D D/h can outgrow them)
        attn = [variables["params"][f"block{i}"]["attn"] for i in range(2)]
        assert set(attn[0]) == {"conv_1x1", "bn_1x1", "proj"}
        assert set(attn[1]) == {"conv_3x3", "bn_3x3", "proj"}
