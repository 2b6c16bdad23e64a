"""``python -m alite_jax.export --workdir=<run> --format=stablehlo|tflite|onnx [--batch=N|dynamic]
[--sparse_weights=auto|on|off]``

Writes an inference artifact of a finished run's model, its normalisation folded in (it takes float32
images in [0, 1], NHWC, the run's size and channels, and returns logits), into ``<workdir>/export/<format>/``
or ``--out``: the artifact file and ``metadata.json``. docs/export.md says how to load each format.

Exit status: 0 when the artifact is written; 2 for a user error (a directory without a finished model,
an unknown format, a missing optional package, a layer the format cannot represent): one line
``error: <what and how to fix it>`` on stderr; 1 for a bug, with its traceback.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from alite_jax.errors import UserError, exit_on_user_error, exit_with_user_error, parse_flags_or_exit
from alite_jax.export.formats import FORMATS, WEIGHTS_FILE, check_format, export
from alite_jax.export.compactors import AUTO
from alite_jax.export.inference import (COMPACTORS, PORTABLE_IMPL, TFLITE_IMPL, check_finished_run,
                                        inference_function)

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run directory (config.json and model/).")
_FORMAT = flags.DEFINE_string("format", None, f"One of {', '.join(FORMATS)}.")
_BATCH = flags.DEFINE_string("batch", "", "A fixed batch size N, or 'dynamic' (any batch size). Default: "
                             "dynamic for stablehlo, 1 for tflite.")
_OUT = flags.DEFINE_string("out", None, "The artifact directory (default <workdir>/export/<format>).")
_COMPACT = flags.DEFINE_string("compact", AUTO, "How to compact the model before export: auto (column for a "
                               "column-pruned student, spvit for an SPViT fine-tuning, else as trained), "
                               "column, spvit, as_trained (the model as it is, dense or masked).")
_IMPL = flags.DEFINE_string("impl", None, "A student's local-attention implementation (default: blocked, "
                            "or blocked_unchunked for tflite; both take a dynamic batch).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the run's data set is prepared, when "
                                "data.normalization='dataset' (its statistics are recomputed).")
_SPARSE = flags.DEFINE_enum("sparse_weights", "auto", ["auto", "on", "off"],
                            "stablehlo: store the weights as non-zero values plus bitmasks, in a second "
                            "program (weights.jax_export) that returns them at load; auto: for an "
                            "irregularly pruned run.")
_NO_SELECT = flags.DEFINE_bool("builtins_only", False, "tflite: refuse a model that needs Select TF ops "
                               "(the Flex delegate), naming them, instead of including them.")


def parse_batch(text: str, fmt: str) -> int | None:
    """--batch: None for 'dynamic', else a positive integer; '' is the format's default."""
    if not text:
        return 1 if fmt == "tflite" else None
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch must be a positive integer or 'dynamic', got {text!r}")
    return int(text)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value or not _FORMAT.value:
        exit_with_user_error(f"give --workdir=<a finished run> and --format=<{'|'.join(FORMATS)}>")
    fmt = _FORMAT.value
    start = time.perf_counter()
    sparse = {"auto": None, "on": True, "off": False}[_SPARSE.value]
    with exit_on_user_error(filesystem=True):  # every check that reads no model comes first
        check_format(fmt, sparse)
        batch = parse_batch(_BATCH.value, fmt)
        check_finished_run(_WORKDIR.value)
        if _COMPACT.value not in COMPACTORS:
            raise UserError(f"unknown --compact={_COMPACT.value!r}; choose one of {sorted(COMPACTORS)}")
        impl = _IMPL.value or (TFLITE_IMPL if fmt == "tflite" else PORTABLE_IMPL)
        fn, variables, meta = inference_function(_WORKDIR.value, _COMPACT.value, impl=impl,
                                                 data_dir=_DATA_DIR.value)
        out = _OUT.value or os.path.join(_WORKDIR.value, "export", fmt)
        options = {"allow_select_tf_ops": not _NO_SELECT.value} if fmt == "tflite" else {}
        path = export(fn, variables, meta, fmt, out, batch, sparse, **options)
    weights = os.path.join(os.path.dirname(path), WEIGHTS_FILE)
    also = f", {weights} ({os.path.getsize(weights):,} bytes)" if os.path.exists(weights) else ""
    print(f"wrote {path} ({os.path.getsize(path):,} bytes){also} and its metadata.json in "
          f"{time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
