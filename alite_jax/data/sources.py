"""Data sources: a split of an image classification data set, read into memory as uint8 arrays.

Every data set comes through one function, :func:`load_split`:

* ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 grayscale images shipped inside the
  scikit-learn package, 10 classes), the embedded demo data set that needs no download. Split by a fixed
  permutation into ``train`` (1,438) and ``test`` (359).
* any TFDS image classification data set with ``image`` and ``label`` features: ``cifar10`` and
  ``cifar100`` (splits ``train`` / ``test``), ``tiny_imagenet`` (this package's builder, splits
  ``train`` / ``validation``), ``mnist``, ... Grayscale data sets keep one channel.

Each process reads only its own shard of a split (``process_index`` of ``process_count``), so a
multi-host run reads every example once. Images are resized to the requested size when it differs
from the data set's (e.g. 28x28 MNIST to 32x32).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

DEMO = "digits"
DEFAULT_SPLITS = {"digits": ("train", "test"), "cifar10": ("train", "test"),
                  "cifar100": ("train", "test"), "tiny_imagenet": ("train", "validation")}


def default_splits(name: str) -> tuple[str, str]:
    """(train split, eval split) of a data set: train/test, or train/validation for Tiny-ImageNet."""
    return DEFAULT_SPLITS.get(name, ("train", "test"))


@dataclasses.dataclass(frozen=True)
class Split:
    """One process's shard of a split: uint8 images (N, H, W, C) and int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def shard_range(n: int, process_index: int, process_count: int, drop_remainder: bool) -> tuple[int, int]:
    """[start, end) of process ``process_index``'s contiguous shard of n examples.

    With ``drop_remainder`` every shard has n // process_count examples (training: all processes run
    the same number of steps); without, the first n % process_count shards have one more (evaluation:
    every example is read exactly once).
    """
    if drop_remainder:
        size = n // process_count
        return process_index * size, (process_index + 1) * size
    base, extra = divmod(n, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with antialiasing, rounded back to uint8, in chunks (JAX on the host's default
    device; upscaling the digits gives exactly what tf.image.resize gave, so the demo needs no TF)."""
    if images.shape[1:3] == (size, size):
        return images
    out = [np.asarray(jax.image.resize(jnp.asarray(images[i:i + 4096], jnp.float32),
                                       (len(images[i:i + 4096]), size, size, images.shape[-1]), "linear",
                                       antialias=True))
           for i in range(0, len(images), 4096)]
    return np.clip(np.round(np.concatenate(out)), 0, 255).astype(np.uint8)


def _parse_split(split: str) -> tuple[str, slice]:
    """'train' -> ('train', [:]); 'train[:512]' / 'test[10:20]' -> the name and the slice."""
    match = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", split)
    if not match:
        raise ValueError(f"cannot read split {split!r}: use a name, optionally sliced like 'train[:512]'")
    name, start, end = match.groups()
    return name, slice(int(start) if start else None, int(end) if end else None)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    split, part = _parse_split(split)

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(round(0.8 * len(images)))
    parts = {"train": order[:cut], "test": order[cut:]}
    if split not in parts:
        raise ValueError(f"the digits demo data set has splits 'train' and 'test', not {split!r}")
    idx = np.sort(parts[split])[part]
    return images[idx], digits.target[idx].astype(np.int32), tuple(str(i) for i in range(10))


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    from alite_jax.data import tiny_imagenet  # noqa: F401  (registers the builder)

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown data set {name!r}: use {DEMO!r} (embedded), 'cifar10', 'cifar100', "
                         f"'tiny_imagenet' or another TFDS image classification data set "
                         f"(tfds.list_builders())") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"data set {name!r} has no 'image' and 'label' features "
                         f"(it has {sorted(features)}): it is not an image classification data set")
    return builder


def unreachable_hosts(builder, timeout: float = 5.0) -> list[str]:
    """The hosts a TFDS builder downloads from that do not answer, as "host (reason)".

    Hosts are those of the data set's registered download URLs; a builder without them, or an
    environment with an HTTP(S) proxy (which this direct probe would bypass), gives []: the download
    then tells for itself. One TCP connection per host, ``timeout`` seconds at most: without network,
    TFDS would retry every download for minutes before failing.
    """
    if any(urllib.request.getproxies().get(k) for k in ("http", "https", "all")):
        return []
    hosts = {}
    for url in builder.url_infos or {}:
        parsed = urllib.parse.urlparse(url)
        if parsed.hostname:
            hosts[parsed.hostname] = parsed.port or (80 if parsed.scheme == "http" else 443)
    unreachable = []
    for host, port in sorted(hosts.items()):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            unreachable.append(f"{host} ({type(e).__name__}: {e})")
    return unreachable


def num_classes_of(name: str, data_dir: str | None = None) -> int:
    """Number of classes of a data set, from its metadata (no data is read)."""
    if name == DEMO:
        return 10
    return int(_tfds_builder(name, data_dir).info.features["label"].num_classes)


def load_split(name: str, split: str, *, data_dir: str | None = None, image_size: int | None = None,
               process_index: int = 0, process_count: int = 1, drop_remainder: bool = False,
               download: bool = True, manual_dir: str | None = None) -> Split:
    """Reads this process's shard of a split into memory.

    Args:
      name: "digits", or a TFDS name ("cifar10", "cifar100", "tiny_imagenet", ...).
      split: a split name, optionally sliced TFDS-style ("train[:10000]").
      data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
      image_size: resize to image_size x image_size if the data set's size differs (None: keep).
      process_index, process_count: which shard this process reads.
      drop_remainder: equal shards (training) or exact cover (evaluation), see :func:`shard_range`.
      download: let TFDS download and prepare the data set if it is not prepared yet.
      manual_dir: where manually downloaded files are (default <data_dir>/downloads/manual).
    """
    if name == DEMO:
        images, labels, class_names = _load_digits(split)
        start, end = shard_range(len(labels), process_index, process_count, drop_remainder)
        images, labels = images[start:end], labels[start:end]
    else:
        import tensorflow_datasets as tfds

        builder = _tfds_builder(name, data_dir)
        if download:
            unreachable = [] if builder.is_prepared() else unreachable_hosts(builder)
            if unreachable:
                raise FileNotFoundError(
                    f"data set {name!r} is not prepared in {builder.data_dir} and its download "
                    f"host{'s' if len(unreachable) > 1 else ''} {', '.join(unreachable)} cannot be reached: "
                    f"prepare it on a machine with network (python -c \"import tensorflow_datasets as tfds; "
                    f"tfds.builder('{name}', data_dir='<dir>').download_and_prepare()\"), copy <dir> here "
                    f"and set data.data_dir to it (now {builder.data_dir_root}); or, for a data set whose "
                    f"files you download by hand, set data.download=False to see where they go")
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=config)
        elif not builder.is_prepared():
            manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
            raise FileNotFoundError(
                f"data set {name!r} is not prepared in {builder.data_dir} and download is off: set "
                f"download=True to prepare it" + (f". {manual}" if manual else ""))
        # Shard with TFDS's own split arithmetic, so a shard is read without reading the rest.
        shards = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)
        chunks = list(tfds.as_numpy(builder.as_dataset(split=shards[process_index], batch_size=1024)))
        if not chunks:
            raise ValueError(f"split {split!r} of {name!r} has no examples for process {process_index}")
        images = np.concatenate([c["image"] for c in chunks])
        labels = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
        label = builder.info.features["label"]
        class_names = tuple(label.names)
    if image_size is not None:
        images = _resize(images, image_size)
    return Split(images=np.ascontiguousarray(images), labels=labels, num_classes=len(class_names),
                 class_names=class_names)

