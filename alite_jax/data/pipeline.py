"""Batches for training and evaluation on grain: sharding, a global shuffle, augmentation in workers.

The pipeline is a `grain <https://github.com/google/grain>`_ ``MapDataset`` per data shard, built from a
random-access source (:func:`alite_jax.data.sources.open_split`: TFDS data sets in the array_record
format, or the embedded digits):

* Training: ``source[shard] -> shuffle -> random_map(augment) -> batch -> repeat``. grain's global shuffle
  is a function of (seed, epoch), so every epoch is a fresh permutation; the augmentation's generator
  is a function of (seed, epoch, position), so a batch is the same whenever and wherever it is read.
  Images that already have the output size under the ``cifar`` or ``none`` recipe (the digits, CIFAR)
  are batched first and augmented a whole batch at a time (``batch -> random_map``, vectorised).
  An epoch is ``steps_per_epoch`` full batches (the remainder of a shard's permutation is dropped).
* Evaluation: no augmentation, every example exactly once: the last batches are padded and their
  ``mask`` marks the real examples, so accuracy is exact.
* Devices and hosts: the data is cut into ``data_shards`` contiguous shards (default: one per process);
  each process reads only its own shards, and a global batch is the concatenation of equal sub-batches
  of every shard (grain's ``ZipMapDataset``). The order of the data depends on ``data_shards`` only, not
  on how many processes there are. Batches are global ``jax.Array``\\ s sharded over the mesh axis
  ``"data"``.
* Decoding and augmentation run in ``data.workers`` worker processes (grain's ``mp_prefetch``; 0: in
  this process), and a thread keeps a few batches ahead of the step (grain's thread prefetch).
* Resume: the training iterator is a grain ``DatasetIterator`` whose state (``get_state``) the trainer
  saves in the same orbax checkpoint as the train state; restored, it yields exactly the batches an
  uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
import jax
from absl import flags
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alite_jax.data import augment as augment_lib
from alite_jax.data.sources import DEMO, SplitSource, default_splits, open_split, shard_range
from alite_jax.distributed import make_mesh

Batch = dict[str, jax.Array]

NORMALIZATIONS = ("dataset", "imagenet")
# The per-channel mean and std of ImageNet's training images (pixel values in [0, 1]), with which
# torchvision's and timm's pretrained models were trained.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# "dataset" normalisation reads at most this many evenly spaced training images per shard.
STATS_IMAGES = 10_000


def _allgather(x: np.ndarray) -> np.ndarray:
    """(processes, ...) stack of x from every process, exactly (any dtype, float64 included).

    JAX arrays are float32 unless x64 is on, so the values travel as their raw bytes: every process then
    gets bit-identical statistics, the same as a one-process run computes.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))
    return raw.view(x.dtype).reshape((raw.shape[0],) + x.shape)


def _seed(*parts: int) -> int:
    """A 32-bit seed for grain from several integers (the data seed, a shard, a purpose)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# The transforms grain runs (module-level classes, so worker processes can unpickle them).
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainExample(grain.transforms.RandomMap):
    """One training record -> {'image': augmented, normalised float32, 'label': int32}."""

    transform: Any

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": self.transform(record["image"], rng), "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class EvalExample(grain.transforms.Map):
    """One evaluation record -> {'image': resized/cropped, normalised float32, 'label': int32}."""

    transform: Any

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"image": self.transform(record["image"]), "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class TrainBatch(grain.transforms.RandomMap):
    """A batch of records of the output size -> augmented (vectorised), normalised float32 images."""

    transform: Any

    def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": self.transform(batch["image"], rng), "label": batch["label"].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class EvalBatch(grain.transforms.Map):
    """A batch of records of the output size -> normalised float32 images (vectorised)."""

    transform: Any

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": self.transform(batch["image"], None), "label": batch["label"].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class PaddedBatch(grain.transforms.Map):
    """Batch index -> that batch of ``batches`` with a ``mask``, or an all-padding batch past its end
    (every shard then yields the same number of evaluation batches)."""

    batches: Any  # a grain MapDataset of batches of up to `size` examples
    size: int
    image_shape: tuple[int, ...]

    def map(self, index: int) -> dict[str, np.ndarray]:
        image = np.zeros((self.size,) + self.image_shape, np.float32)
        label = np.zeros((self.size,), np.int32)
        n = 0
        if index < len(self.batches):
            batch = self.batches[index]
            n = len(batch["label"])
            image[:n], label[:n] = batch["image"], batch["label"]
        return {"image": image, "label": label, "mask": np.arange(self.size) < n}


@dataclasses.dataclass(frozen=True)
class Concatenate(grain.transforms.Map):
    """The sub-batches of a process's shards (a tuple, from ``ZipMapDataset``) -> one local batch."""

    def map(self, parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------------------------------
# The pipeline.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InputPipeline:
    """Train and eval batches of one data set for one process.

    Build with :func:`create_input_pipeline`. ``train_data`` and ``eval_data`` are this process's grain
    datasets of local batches; ``steps_per_epoch`` and ``eval_steps`` are global (the same on every
    process).
    """

    train_data: grain.MapDataset
    eval_data: grain.MapDataset
    mesh: Mesh
    workers: int
    batch_size: int
    eval_batch_size: int
    image_size: int
    channels: int
    mean: np.ndarray
    std: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    steps_per_epoch: int
    eval_steps: int
    num_eval_examples: int

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def global_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """This process's part of a batch -> global arrays sharded over ``"data"``."""
        return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}

    def _iterator(self, dataset: grain.MapDataset) -> grain.DatasetIterator:
        ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags: outside absl.app
                flags.FLAGS.mark_as_parsed()  # (a notebook, a library caller) take their defaults
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        ds = ds.map(self.global_batch)
        return iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2))

    def train_iterator(self) -> grain.DatasetIterator:
        """Augmented batches {'image': (B, H, W, C) float32, 'label': (B,) int32}, one per training
        step, epoch after epoch without end. Its state (``get_state`` / ``set_state``) is the position
        in that stream; the trainer checkpoints it with the train state."""
        return self._iterator(self.train_data)

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from ``start_step`` on (the same as an uninterrupted stream's)."""
        first = epoch * self.steps_per_epoch + start_step
        count = self.steps_per_epoch - start_step
        return self._batches(self.train_data.slice(slice(first, first + count)))

    def eval_batches(self) -> Iterator[Batch]:
        """Every evaluation example once: {'image', 'label', 'mask'}; padding has mask False."""
        return self._batches(self.eval_data)

    def _batches(self, dataset: grain.MapDataset) -> Iterator[Batch]:
        iterator = self._iterator(dataset)
        try:
            yield from iterator
        finally:  # stops the prefetch thread and the worker processes now, not at garbage collection
            iterator.close()


def channel_stats(sources: Sequence[SplitSource], limit: int = STATS_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (of pixel values in [0, 1]) over up to ``limit`` evenly spaced images of
    each shard, the shards of all processes together."""
    sums = []
    for source in sources:
        picks = np.unique(np.linspace(0, len(source) - 1, min(limit, len(source))).round().astype(int))
        total = np.zeros((3, source.channels))
        for i in picks:
            x = np.asarray(source.records[int(i)]["image"], np.float64).reshape(-1, source.channels) / 255.0
            total += [x.sum(0), np.square(x).sum(0), np.full(source.channels, len(x))]
        sums.append(total)
    total = _allgather(np.sum(np.asarray(sums), axis=0)).sum(axis=0)  # (3, C)
    mean = total[0] / total[2]
    std = np.sqrt(np.maximum(total[1] / total[2] - mean ** 2, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


def check_data_config(config: Any, num_devices: int, process_count: int) -> None:
    """Raises ValueError for data settings that cannot work, before any data is read."""
    shards = config.get("data_shards", 0) or process_count
    for name in ("batch_size", "eval_batch_size"):
        size = config[name]
        if size < 1 or size % num_devices:
            nearest = max(1, round(size / num_devices)) * num_devices
            raise ValueError(f"{name}={size} is not divisible by the {num_devices} devices; use a "
                             f"multiple of {num_devices} (e.g. {nearest})")
        if size % shards:
            raise ValueError(f"{name}={size} is not divisible by data_shards={shards}")
    if shards % process_count:
        raise ValueError(f"data_shards={shards} must be a multiple of the {process_count} processes")
    if config.get("normalization", "dataset") not in NORMALIZATIONS:
        raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
    recipe = config.get("augment", "cifar")
    if recipe not in augment_lib.RECIPES:
        raise ValueError(f"data.augment must be one of {augment_lib.RECIPES}, got {recipe!r}")


def _shard(source: SplitSource, shard: int, num_shards: int, drop_remainder: bool) -> grain.MapDataset:
    start, end = shard_range(len(source), shard, num_shards, drop_remainder)
    return grain.MapDataset.source(source.records).slice(slice(start, end))


def create_input_pipeline(config: Any, mesh: Mesh | None = None) -> InputPipeline:
    """Opens the train and eval splits the config names and returns the pipeline of this process.

    ``config`` fields: dataset, data_dir (None: TFDS default), train_split, eval_split (None: the data
    set's defaults), download, manual_dir, and those :func:`build_input_pipeline` reads. See
    :func:`default_config`.
    """
    mesh = mesh if mesh is not None else make_mesh()
    check_data_config(config, mesh.devices.size, jax.process_count())
    train_split, eval_split = config.train_split, config.eval_split
    if train_split is None or eval_split is None:
        defaults = default_splits(config.dataset)
        train_split, eval_split = train_split or defaults[0], eval_split or defaults[1]
    common = dict(data_dir=config.data_dir, download=config.download, manual_dir=config.manual_dir)
    return build_input_pipeline(config, open_split(config.dataset, train_split, **common),
                                open_split(config.dataset, eval_split, **common), mesh)


def build_input_pipeline(config: Any, train: SplitSource, evals: SplitSource,
                         mesh: Mesh | None = None) -> InputPipeline:
    """The pipeline of this process over two opened splits (any :class:`SplitSource`, e.g. in-memory
    records).

    ``config`` fields: image_size, batch_size and eval_batch_size (global), seed, data_shards (0: one
    per process), augment (a recipe of :mod:`alite_jax.data.augment`), normalization ("dataset": the
    training images' channel statistics; "imagenet": ImageNet's), crop_ratio (the evaluation's centre
    crop, ImageNet recipes), workers (grain worker processes; 0: none).
    """
    mesh = mesh if mesh is not None else make_mesh()
    process_count, process_index = jax.process_count(), jax.process_index()
    check_data_config(config, mesh.devices.size, process_count)
    num_shards = config.get("data_shards", 0) or process_count
    per_process = num_shards // process_count
    shard_ids = range(process_index * per_process, (process_index + 1) * per_process)
    size, seed = config.image_size, config.seed
    per_shard = len(train) // num_shards
    sub, eval_sub = config.batch_size // num_shards, config.eval_batch_size // num_shards
    steps = per_shard // sub
    if steps == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training split "
                         f"({per_shard * num_shards} examples)")
    if config.get("normalization", "dataset") == "imagenet":
        if train.channels != 3:
            raise ValueError(f"data.normalization='imagenet' needs RGB images; {config.dataset!r} has "
                             f"{train.channels} channel(s): use normalization='dataset'")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        shard_sources = [dataclasses.replace(train, records=_shard(train, v, num_shards, True))
                         for v in shard_ids]
        mean, std = channel_stats(shard_sources)
    recipe = config.get("augment", "cifar")
    options = dict(crop_ratio=config.get("crop_ratio", 0.875))
    train_fn = augment_lib.make_train_transform(recipe, size, mean, std)
    eval_fn = augment_lib.make_eval_transform(recipe, size, mean, std, **options)
    # Images that already have the output size, under a recipe without per-image work: whole batches at
    # once (the digits and CIFAR: as fast as the in-memory pipeline before grain, not Python per image).
    train_batch_fn = augment_lib.make_batch_train_transform(recipe, size, mean, std, train.image_size)
    eval_batch_fn = augment_lib.make_batch_train_transform("none", size, mean, std, evals.image_size)
    if recipe not in ("cifar", "none"):
        eval_batch_fn = None

    train_parts, eval_parts, eval_lengths = [], [], []
    for v in shard_ids:
        ds = _shard(train, v, num_shards, drop_remainder=True).shuffle(seed=_seed(seed, v, 0))
        augment_seed = _seed(seed, v, 1)
        if train_batch_fn is None:
            ds = ds.random_map(TrainExample(train_fn), seed=augment_seed).batch(sub, drop_remainder=True)
        else:
            ds = ds.batch(sub, drop_remainder=True).random_map(TrainBatch(train_batch_fn), seed=augment_seed)
        train_parts.append(ds.repeat())
        ev = _shard(evals, v, num_shards, drop_remainder=False)
        eval_lengths.append(len(ev))
        if eval_batch_fn is None:
            eval_parts.append(ev.map(EvalExample(eval_fn)).batch(eval_sub))
        else:
            eval_parts.append(ev.batch(eval_sub).map(EvalBatch(eval_batch_fn)))
    eval_steps = int(_allgather(np.asarray(-(-max(eval_lengths) // eval_sub))).max())
    num_eval = int(_allgather(np.asarray(sum(eval_lengths))).sum())
    shape = (size, size, train.channels)
    eval_parts = [grain.MapDataset.range(eval_steps).map(PaddedBatch(ev, eval_sub, shape))
                  for ev in eval_parts]
    zip_ = lambda parts: grain.experimental.ZipMapDataset(parts).map(Concatenate())
    return InputPipeline(train_data=zip_(train_parts), eval_data=zip_(eval_parts), mesh=mesh,
                         workers=config.get("workers", 0), batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, image_size=size, channels=train.channels,
                         mean=mean, std=std, num_classes=train.num_classes, class_names=train.class_names,
                         steps_per_epoch=steps, eval_steps=eval_steps, num_eval_examples=num_eval)


def default_config(dataset: str = DEMO, image_size: int = 32, batch_size: int = 100):
    """An ml_collections ConfigDict with every field :func:`create_input_pipeline` reads.

    The text fields without a default (data_dir, manual_dir, train_split, eval_split: None) are typed
    placeholders, so ``--config.data.data_dir=...`` can set them from the command line. The batch-level
    mixing (mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing) runs in the training
    step (:mod:`alite_jax.data.mixup`); 0 alphas and 0 smoothing (the default) turn it off.
    """
    import ml_collections
    from ml_collections.config_dict import placeholder

    return ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir=placeholder(str), manual_dir=placeholder(str), download=True,
        train_split=placeholder(str), eval_split=placeholder(str), image_size=image_size,
        batch_size=batch_size, eval_batch_size=batch_size, seed=0, data_shards=0, workers=0,
        augment="cifar", normalization="dataset", crop_ratio=0.875, mixup_alpha=0.0, cutmix_alpha=0.0,
        mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.0))
