"""Data sources: a split of an image classification data set, read record by record.

Every data set comes through :func:`open_split`, which returns a :class:`SplitSource` (random-access
records; TFDS data sets in the array_record file format, docs/data.md):

* ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 grayscale images shipped inside the
  scikit-learn package, 10 classes), the embedded demo data set that needs no download. Split by a fixed
  permutation into ``train`` (1,438) and ``test`` (359).
* any TFDS image classification data set with ``image`` and ``label`` features: ``cifar10`` and
  ``cifar100`` (splits ``train`` / ``test``), ``tiny_imagenet`` (this package's builder, splits
  ``train`` / ``validation``), ``mnist``, ... Grayscale data sets keep one channel.

The pipeline (:mod:`alite_jax.data.pipeline`) reads only its process's shards of a split
(:func:`shard_range`), so a multi-host run reads every example once, and resizes images to the
configured size in its transforms (e.g. 28x28 MNIST to 32x32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from alite_jax.errors import MissingFileError

DEMO = "digits"
DEFAULT_SPLITS = {"digits": ("train", "test"), "cifar10": ("train", "test"),
                  "cifar100": ("train", "test"), "tiny_imagenet": ("train", "validation"),
                  "imagenet2012": ("train", "validation")}


def default_splits(name: str) -> tuple[str, str]:
    """(train split, eval split) of a data set: train/test, or train/validation for Tiny-ImageNet."""
    return DEFAULT_SPLITS.get(name, ("train", "test"))


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

    Hosts are those of the data set's registered download URLs (and of a builder's own
    ``DOWNLOAD_URLS``, for a builder that downloads in its code); a builder without them, or an
    environment with an HTTP(S) proxy (which this direct probe would bypass), gives []: the download
    then tells for itself. One TCP connection per host, ``timeout`` seconds at most: without network,
    TFDS would retry every download for minutes before failing.
    """
    if any(urllib.request.getproxies().get(k) for k in ("http", "https", "all")):
        return []
    hosts = {}
    for url in [*(builder.url_infos or {}), *getattr(builder, "DOWNLOAD_URLS", ())]:
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


# ---------------------------------------------------------------------------------------------
# Random-access sources: a split read record by record (for the grain pipeline).
# ---------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

IMAGENET = "imagenet2012"
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
ARRAY_RECORD = "array_record"


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """A split of an image classification data set, read record by record.

    ``records`` is a random-access sequence: ``len(records)``, and ``records[i]`` is
    ``{"image": uint8 (H, W, C), "label": int}``. It is picklable and cheap to pickle (a TFDS source
    pickles as its directory and split, a few hundred bytes; each process opens the files itself), so
    grain can send it to its worker processes. ``image_size`` is (H, W) when every image has that size,
    None when sizes vary (ImageNet).
    """

    records: Any
    num_classes: int
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int] | None

    def __len__(self) -> int:
        return len(self.records)


class ArrayRecords:
    """In-memory records: uint8 images (N, H, W, C) and integer labels (N,) (the embedded digits)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}


class TfdsRecords:
    """The records of a split of a TFDS data set prepared in the array_record file format.

    Reads with ``tfds.builder_from_directory(dataset_dir).as_data_source(split)``: each record is a
    serialized ``tf.train.Example`` that TFDS parses with protobuf and whose image it decodes with NumPy
    (OpenCV if installed, else PIL): no TensorFlow op runs per record. Only the directory and the split
    are pickled; the files are opened in each process that reads (again after a fork), so the object can
    go to spawned workers (grain's). A forked child must not read the files after its parent has read a
    record: array_record 0.8.6's reader then crashes (SIGSEGV) in the child.
    """

    def __init__(self, dataset_dir: str, split: str, source=None):
        self.dataset_dir, self.split = os.fspath(dataset_dir), split
        self._source, self._pid = source, (None if source is None else os.getpid())
        self._len = len(self._open())

    def _open(self):
        if self._source is None or self._pid != os.getpid():
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(self.dataset_dir)
            self._source = builder.as_data_source(split=self.split, file_format=ARRAY_RECORD)
            self._pid = os.getpid()
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset_dir": self.dataset_dir, "split": self.split, "_len": self._len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _source=None, _pid=None)

    def __len__(self) -> int:
        return self._len

    @staticmethod
    def _record(example: dict[str, Any]) -> dict[str, Any]:
        return {"image": example["image"], "label": int(example["label"])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"record {index} of a split of {self._len}")
        return self._record(self._open()[index % self._len])

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self._record(e) for e in self._open().__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"TfdsRecords({self.dataset_dir!r}, {self.split!r}, {self._len} records)"


def _manual_dir(builder, manual_dir: str | None) -> str:
    return os.fspath(manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual"))


def check_imagenet_tars(builder, manual_dir: str | None) -> None:
    """Raises MissingFileError naming the ImageNet tars that are not in the manual dir, and where they go."""
    where = _manual_dir(builder, manual_dir)
    missing = [t for t in IMAGENET_TARS if not os.path.isfile(os.path.join(where, t))]
    if missing:
        raise MissingFileError(
            f"ImageNet (imagenet2012) needs {' and '.join(IMAGENET_TARS)} in {where}: "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there. Download them from "
            f"https://image-net.org/download-images (an account is needed) and put them, unextracted, in "
            f"{where} (or set data.manual_dir to the directory that holds them); ILSVRC2012_img_test.tar "
            f"is optional (no labels). TFDS then prepares the data set in {builder.data_dir}")


def _prepare_command(name: str, builder) -> str:
    return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='{builder.data_dir_root}').download_and_prepare(file_format='array_record')\"")


def convert_to_array_record(builder) -> None:
    """Writes an array_record copy of every shard of a data set prepared in the TFRecord file format, next
    to the TFRecord files, and records ``array_record`` as an alternative file format of the data set.

    This is what ``tfds convert_format --dataset_version_dir=<dir> --out_file_format=array_record`` does
    in place (that command needs apache-beam in TFDS 4.9.10; this does not): each shard is copied record by
    record (the serialized examples are the same in both formats), written to a temporary file and renamed,
    so an interrupted conversion leaves no partial shard and resumes where it stopped.
    """
    from etils import epath
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils

    info = builder.info
    reader = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    log.warning("%s is prepared in the %s file format, which cannot be read record by record: writing an "
                "array_record copy of its %d shards next to it (needs as much disk again)",
                builder.data_dir, info.file_format.value,
                sum(s.num_shards for s in info.splits.values()))
    for split_info in info.splits.values():
        template = split_info.filename_template.replace(data_dir=epath.Path(builder.data_dir))
        out_template = template.replace(filetype_suffix=writer.FILE_SUFFIX)
        n = split_info.num_shards
        for i in range(n):
            source = template.sharded_filepath(shard_index=i, num_shards=n)
            target = out_template.sharded_filepath(shard_index=i, num_shards=n)
            if target.exists():
                continue
            log.warning("converting %s -> %s", source.name, target.name)
            rows = ((k, row.numpy()) for k, row in enumerate(reader.make_tf_data(source)))
            with py_utils.incomplete_file(target) as tmp:
                writer.write_examples(path=tmp, iterator=rows)
    info.add_alternative_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.write_dataset_info_json(builder.data_dir)
    log.warning("converted %s to array_record", builder.data_dir)


def _array_record_builder(name: str, data_dir: str | None, download: bool, manual_dir: str | None):
    """The TFDS builder of ``name`` with the data set prepared in array_record: prepared now if it is not
    (``download``), converted if it was prepared in the TFRecord file format."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    builder = _tfds_builder(name, data_dir)
    if builder.is_prepared():
        # The builder of the prepared directory: the registered builder's info leaves out the
        # alternative file formats of dataset_info.json (those a conversion adds).
        builder = tfds.builder_from_directory(builder.data_dir)
        if file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats():
            return builder
        formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
        if not download:
            raise MissingFileError(
                f"data set {name!r} is prepared in {builder.data_dir} in the {formats} file format, which "
                f"cannot be read record by record, and download is off: set download=True to have it "
                f"converted to array_record there (as much disk again), or convert it yourself with "
                f"`pip install apache-beam && tfds convert_format --dataset_version_dir={builder.data_dir} "
                f"--out_file_format=array_record`, or delete {builder.data_dir} and prepare it again with "
                f"{_prepare_command(name, builder)}")
        try:
            convert_to_array_record(builder)
        except Exception as e:  # an API of TFDS's that moved: say how to do it by hand
            raise MissingFileError(
                f"data set {name!r} is prepared in {builder.data_dir} in the {formats} file format, which "
                f"cannot be read record by record, and converting it failed ({type(e).__name__}: {e}): "
                f"convert it with `pip install apache-beam && tfds convert_format --dataset_version_dir="
                f"{builder.data_dir} --out_file_format=array_record`, or delete {builder.data_dir} and "
                f"prepare it again with {_prepare_command(name, builder)}") from e
        return tfds.builder_from_directory(builder.data_dir)
    if name == IMAGENET:
        check_imagenet_tars(builder, manual_dir)
    if not download:
        manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        raise MissingFileError(
            f"data set {name!r} is not prepared in {builder.data_dir} and download is off: set "
            f"download=True to prepare it" + (f". {manual}" if manual else ""))
    # The ImageNet tars are there: its registered download URLs are not used; nor are a builder's when
    # the files it would download are in the manual directory (MANUAL_FILES).
    manual_files = getattr(builder, "MANUAL_FILES", ())
    have_files = manual_files and all(os.path.exists(os.path.join(_manual_dir(builder, manual_dir), f))
                                      for f in manual_files)
    unreachable = [] if name == IMAGENET or have_files else unreachable_hosts(builder)
    if unreachable:
        raise MissingFileError(
            f"data set {name!r} is not prepared in {builder.data_dir} and its download "
            f"host{'s' if len(unreachable) > 1 else ''} {', '.join(unreachable)} cannot be reached: "
            f"prepare it on a machine with network ({_prepare_command(name, builder)} with "
            f"data_dir='<dir>'), copy <dir> here and set data.data_dir to it (now {builder.data_dir_root}); "
            f"or, for a data set whose files you download by hand, set data.download=False to see where "
            f"they go" + (f". {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}" if manual_files else ""))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                                 file_format=ARRAY_RECORD)
    return builder


def open_split(name: str, split: str, *, data_dir: str | None = None, download: bool = True,
               manual_dir: str | None = None) -> SplitSource:
    """Opens a split of a data set for reading record by record, preparing the data set if needed.

    Args:
      name: "digits" (embedded), or a TFDS name ("cifar10", "cifar100", "tiny_imagenet",
        "imagenet2012", "mnist", ...).
      split: a split name, optionally sliced TFDS-style ("train[:512]", "test[10:20]"; TFDS data sets
        also take percentages, "train[:10%]").
      data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
      download: let TFDS download and prepare the data set (in the array_record file format) if it is
        not prepared yet, or convert it to array_record if it was prepared in the TFRecord format.
      manual_dir: where manually downloaded files are (default <data_dir>/downloads/manual): the two
        ImageNet tars, tiny-imagenet-200.zip.
    """
    if name == DEMO:
        images, labels, class_names = _load_digits(split)
        return SplitSource(ArrayRecords(images, labels), num_classes=len(class_names),
                           class_names=class_names, channels=1, image_size=(8, 8))
    builder = _array_record_builder(name, data_dir, download, manual_dir)
    features = builder.info.features
    shape = tuple(features["image"].shape)
    channels = shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"data set {name!r} has images of shape {shape}: only 1 or 3 channels are supported")
    size = shape[:2] if None not in shape[:2] else None
    class_names = tuple(features["label"].names)
    source = builder.as_data_source(split=split, file_format=ARRAY_RECORD)
    return SplitSource(TfdsRecords(builder.data_dir, split, source), num_classes=len(class_names),
                       class_names=class_names, channels=int(channels), image_size=size)
