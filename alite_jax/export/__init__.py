"""Models out: what a user deploys from a finished run.

* :mod:`alite_jax.export.compact`: the compact form of column-pruned students (pruned im2col rows and
  channels dropped physically) and :mod:`alite_jax.export.sparse_store`, the compact storage of
  irregularly pruned ones (docs/compaction.md);
* :mod:`alite_jax.export.inference`: the function an artifact holds (raw images in [0, 1] -> logits, the
  run's normalisation folded in, the model in eval mode, compacted by a registered compactor);
* :mod:`alite_jax.export.formats`: that function as a StableHLO (``jax.export``), TFLite (LiteRT) or ONNX
  artifact; ``python -m alite_jax.export --workdir=<run> --format=...`` (docs/export.md).

Nothing heavy is imported here.
"""
