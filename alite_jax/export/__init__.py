"""Export of trained models for inference: the compact form of pruned students (:mod:`.compact`) and the
compact storage of irregularly pruned ones (:mod:`.sparse_store`); docs/compaction.md."""
