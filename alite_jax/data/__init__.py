"""Input pipelines: data sources (TFDS, Tiny-ImageNet, the embedded digits) and batch iterators."""

from alite_jax.data import tiny_imagenet  # noqa: F401  (registers the 'tiny_imagenet' TFDS builder)
from alite_jax.data.sources import DEMO, Split, load_split, num_classes_of, shard_range
from alite_jax.data.pipeline import (InputPipeline, augment, check_data_config, create_input_pipeline,
                                     default_config, make_mesh, normalize, prefetch)
