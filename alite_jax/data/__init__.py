"""Input pipelines: data sources (TFDS, Tiny-ImageNet, the embedded digits) and batch iterators.

TensorFlow Datasets is imported only when a TFDS source is used (the digits, the models and the training
step run without it); importing :mod:`alite_jax.data.tiny_imagenet` registers the ``tiny_imagenet``
builder with TFDS, as :mod:`alite_jax.data.sources` does before it builds one.
"""

from alite_jax.data.sources import DEMO, Split, load_split, num_classes_of, shard_range
from alite_jax.data.pipeline import (InputPipeline, augment, check_data_config, create_input_pipeline,
                                     default_config, normalize, prefetch)
