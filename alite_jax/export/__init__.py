"""Models out: what a user deploys from a finished run.

* :mod:`alite_jax.export.compactors`: the compactors by name (the column-pruned student without its
  pruned rows and channels, the SPViT model folded, the model as trained; the weight surgery itself is
  :mod:`alite_jax.compact`'s, docs/compaction.md) and the compact model of a finished run;
* :mod:`alite_jax.export.inference`: the function an artifact holds (raw images in [0, 1] -> logits, the
  run's normalisation folded in, the model in eval mode, compacted by one of the compactors);
* :mod:`alite_jax.export.formats`: that function as a StableHLO (``jax.export``), TFLite (LiteRT) or ONNX
  artifact; ``python -m alite_jax.export --workdir=<run> --format=...`` (docs/export.md).

Nothing heavy is imported here.
"""
