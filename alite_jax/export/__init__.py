"""Inference artifacts of a finished run: ``python -m alite_jax.export --workdir=<run> --format=...``.

:mod:`alite_jax.export.inference` builds the function an artifact holds (raw images in [0, 1] ->
logits, the run's normalisation folded in, the model in eval mode, optionally compacted);
:mod:`alite_jax.export.formats` writes it as a StableHLO (``jax.export``), TFLite (LiteRT) or ONNX
artifact. docs/export.md says how to load each. Nothing heavy is imported here.
"""
