"""alite_jax: AttentionLite in JAX/Flax (local self-attention students, sparse distillation)."""

__version__ = "0.1.0"
