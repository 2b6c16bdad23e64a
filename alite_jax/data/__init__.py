"""Input pipelines: data sources (TFDS in array_record, the embedded digits), augmentation, and the
grain pipeline that shards, shuffles, augments and batches them.

TensorFlow Datasets is imported only when a TFDS source is used (the digits, the models and the training
step run without it); importing :mod:`alite_jax.data.tiny_imagenet` registers the ``tiny_imagenet``
builder with TFDS, as :mod:`alite_jax.data.sources` does before it builds one.
"""

from alite_jax.data.sources import DEMO, SplitSource, num_classes_of, open_split, shard_range
from alite_jax.data.pipeline import (InputPipeline, build_input_pipeline, check_data_config,
                                     create_input_pipeline, default_config)
