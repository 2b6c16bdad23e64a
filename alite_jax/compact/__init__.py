"""Weight surgery for deployment: trained variables -> the smaller model computing the same function.

* :mod:`alite_jax.compact.column`: column-pruned ResNets / SA-ResNets without their pruned im2col rows
  and dead channels (BatchNorm folded), the model-free :class:`~alite_jax.compact.column.CompactResNet`
  that runs them, and its .npz artifact (docs/compaction.md);
* :mod:`alite_jax.compact.spvit`: an SPViT search's found architecture as JSON-able data (extraction
  from the supernet's gates, validation, files), the compact model's variables from the supernet's or a
  dense DeiT's, and the folding of its conv blocks (docs/spvit_single_path.md);
* :mod:`alite_jax.compact.sparse_store`: irregularly pruned variables stored as non-zeros plus bitmasks;
* :mod:`alite_jax.compact.tree`: the nested dict <-> flat {path: leaf} dict all of them use.

The Linen modules these variables belong to are in :mod:`alite_jax.models`; what reads a run directory
and writes an artifact is :mod:`alite_jax.export`. Nothing is imported here.
"""
