"""Batches for training and evaluation: augmentation, normalisation, sharding over a device mesh.

* Training: random crop with reflective padding (image_size / 8 pixels: 4 at 32x32, 8 at 64x64) and a
  random horizontal flip (paper §4.1), then per-channel normalisation. Every epoch is a fresh
  permutation; all randomness derives from (seed, epoch, step, shard), so a run is deterministic and
  can restart at any step of any epoch (``train_epoch(epoch, start_step)``).
* Evaluation: no augmentation; every example exactly once: the last batch is padded and its ``mask``
  marks the real examples, so accuracy is exact.
* Devices and hosts: batches are global ``jax.Array``\\ s sharded over the mesh axis ``"data"``. The data
  is cut into ``data_shards`` contiguous shards (default: one per process); each process reads only its
  own shards, and a global batch is the concatenation of equal sub-batches of every shard. The order of
  the data depends on ``data_shards`` only, not on how many processes there are.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alite_jax.data.sources import DEMO, Split, default_splits, load_split
from alite_jax.distributed import make_mesh

Batch = dict[str, jax.Array]


def augment(images: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Random crop of the reflect-padded image (any shift in [-pad, pad]) and random horizontal flip."""
    n, h, w, _ = images.shape
    if pad:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        dy = rng.integers(0, 2 * pad + 1, n)
        dx = rng.integers(0, 2 * pad + 1, n)
        images = np.moveaxis(windows[np.arange(n), dy, dx], 1, -1)  # (n, c, h, w) -> (n, h, w, c)
    flip = rng.random(n) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 -> float32 with zero mean and unit variance per channel."""
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


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


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, ``size`` items ahead (host work overlaps the step).

    Closing the returned generator (or dropping it, e.g. after ``next(iter(...))``) stops the thread
    and waits for it, so no producer is left running JAX work at shutdown.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # re-raised in the consumer
            put(e)
        put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@dataclasses.dataclass
class InputPipeline:
    """Train and eval batches of one data set for one process.

    Build with :func:`create_input_pipeline`. ``steps_per_epoch`` and ``eval_steps`` are global (the same
    on every process).
    """

    train_shards: list[Split]
    eval_shards: list[Split]
    shard_ids: list[int]
    num_shards: int
    batch_size: int
    eval_batch_size: int
    image_size: int
    seed: int
    mean: np.ndarray
    std: np.ndarray
    mesh: Mesh
    num_classes: int
    class_names: tuple[str, ...]
    steps_per_epoch: int
    eval_steps: int
    num_eval_examples: int

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def _global(self, local: dict[str, np.ndarray]) -> Batch:
        return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}

    def _train_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        sub = self.batch_size // self.num_shards
        orders = [np.random.default_rng([self.seed, epoch, v]).permutation(len(s))
                  for v, s in zip(self.shard_ids, self.train_shards)]
        for step in range(start_step, self.steps_per_epoch):
            images, labels = [], []
            for v, shard, order in zip(self.shard_ids, self.train_shards, orders):
                idx = order[step * sub:(step + 1) * sub]
                rng = np.random.default_rng([self.seed, epoch, step, v])
                images.append(augment(shard.images[idx], rng, self.image_size // 8))
                labels.append(shard.labels[idx])
            yield self._global({"image": normalize(np.concatenate(images), self.mean, self.std),
                                "label": np.concatenate(labels)})

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Augmented batches {'image': (B, H, W, C) float32, 'label': (B,) int32} of one epoch.

        ``start_step`` resumes mid-epoch: the batches are exactly those an uninterrupted epoch yields.
        """
        return prefetch(self._train_batches(epoch, start_step))

    def _eval_batches(self) -> Iterator[Batch]:
        sub = self.eval_batch_size // self.num_shards
        for step in range(self.eval_steps):
            parts = []
            for shard in self.eval_shards:
                lo, hi = step * sub, min((step + 1) * sub, len(shard))
                n = max(hi - lo, 0)
                images = np.zeros((sub,) + shard.images.shape[1:], np.float32)
                labels = np.zeros((sub,), np.int32)
                if n:
                    images[:n] = normalize(shard.images[lo:hi], self.mean, self.std)
                    labels[:n] = shard.labels[lo:hi]
                parts.append((images, labels, np.arange(sub) < n))
            yield self._global({"image": np.concatenate([p[0] for p in parts]),
                                "label": np.concatenate([p[1] for p in parts]),
                                "mask": np.concatenate([p[2] for p in parts])})

    def eval_batches(self) -> Iterator[Batch]:
        """Every evaluation example once: {'image', 'label', 'mask'}; padding has mask False."""
        return prefetch(self._eval_batches())


def channel_stats(shards: list[Split]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (of pixel values in [0, 1]) over the shards of all processes."""
    sums = []
    for s in shards:
        x = s.images.astype(np.float64) / 255.0
        c = x.shape[-1]
        sums.append([x.sum(axis=(0, 1, 2)), np.square(x).sum(axis=(0, 1, 2)),
                     np.full(c, x.size / c)])
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


def create_input_pipeline(config: Any, mesh: Mesh | None = None) -> InputPipeline:
    """Reads this process's shards of the train and eval splits and returns the pipeline.

    ``config`` fields: dataset, data_dir (None: TFDS default), train_split, eval_split (None: the data
    set's defaults), image_size, batch_size and eval_batch_size (global), seed, download, manual_dir,
    data_shards (0: one per process). See :func:`default_config`.
    """
    mesh = mesh if mesh is not None else make_mesh()
    process_count, process_index = jax.process_count(), jax.process_index()
    check_data_config(config, mesh.devices.size, process_count)
    train_split, eval_split = config.train_split, config.eval_split
    if train_split is None or eval_split is None:
        defaults = default_splits(config.dataset)
        train_split, eval_split = train_split or defaults[0], eval_split or defaults[1]
    num_shards = config.get("data_shards", 0) or process_count
    per_process = num_shards // process_count
    shard_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
    common = dict(data_dir=config.data_dir, image_size=config.image_size, process_count=num_shards,
                  download=config.download, manual_dir=config.manual_dir)
    train = [load_split(config.dataset, train_split, process_index=v, drop_remainder=True, **common)
             for v in shard_ids]
    evals = [load_split(config.dataset, eval_split, process_index=v, drop_remainder=False, **common)
             for v in shard_ids]
    mean, std = channel_stats(train)
    steps = len(train[0]) // (config.batch_size // num_shards)
    if steps == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training split "
                         f"({len(train[0]) * num_shards} examples)")
    eval_sub = config.eval_batch_size // num_shards
    local_max = max(len(s) for s in evals)
    eval_steps = int(_allgather(np.asarray(-(-local_max // eval_sub))).max())
    num_eval = int(_allgather(np.asarray(sum(len(s) for s in evals))).sum())
    return InputPipeline(train_shards=train, eval_shards=evals, shard_ids=shard_ids,
                         num_shards=num_shards, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, image_size=config.image_size,
                         seed=config.seed, mean=mean, std=std, mesh=mesh,
                         num_classes=train[0].num_classes, class_names=train[0].class_names,
                         steps_per_epoch=steps, eval_steps=eval_steps, num_eval_examples=num_eval)


def default_config(dataset: str = DEMO, image_size: int = 32, batch_size: int = 100):
    """An ml_collections ConfigDict with every field :func:`create_input_pipeline` reads.

    The text fields without a default (data_dir, manual_dir, train_split, eval_split: None) are typed
    placeholders, so ``--config.data.data_dir=...`` can set them from the command line.
    """
    import ml_collections
    from ml_collections.config_dict import placeholder

    return ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir=placeholder(str), manual_dir=placeholder(str), download=True,
        train_split=placeholder(str), eval_split=placeholder(str), image_size=image_size,
        batch_size=batch_size, eval_batch_size=batch_size, seed=0, data_shards=0))
