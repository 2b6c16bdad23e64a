"""A TFDS builder for Tiny-ImageNet (tiny-imagenet-200), which TFDS itself does not have.

Registered as ``tiny_imagenet`` when this module is imported (the data sources import it before they
build a TFDS data set). It reads the official
``tiny-imagenet-200.zip`` from TFDS's manual_dir (``<data_dir>/downloads/manual/`` by default) or
downloads it from the CS231n site. Splits: ``train`` (100,000 images, labels from the class folders) and
``validation`` (10,000 images, labels from ``val/val_annotations.txt``). The test split has no labels and
is left out. Images are 64x64 RGB (the few grayscale JPEGs decode to 3 channels); labels index the 200 WordNet
ids in sorted order, whose names ship with this package (``tiny_imagenet_classes.txt``).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from importlib import resources

import tensorflow_datasets as tfds

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_NAME = "tiny-imagenet-200.zip"
ROOT = "tiny-imagenet-200/"


@functools.cache
def class_list() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet ids, human-readable names) of the 200 classes, in label order (sorted ids)."""
    text = resources.files("alite_jax.data").joinpath("tiny_imagenet_classes.txt").read_text("utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet: 200 classes of 64x64 images, 500 train and 50 validation images per class."""

    DOWNLOAD_URLS = (URL,)  # what alite_jax.data.sources probes before a download (no checksums file)
    MANUAL_FILES = (ZIP_NAME,)  # in the manual_dir, no download is needed
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (alite_jax)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {ZIP_NAME} from {URL} and place it, unextracted, in the manual_dir "
        f"(by default <data_dir>/downloads/manual/).")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Tiny-ImageNet (CS231n): 200 ImageNet classes downsampled to 64x64.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=class_list()[0]),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            citation="@misc{tinyimagenet, title={Tiny ImageNet Visual Recognition Challenge}, "
                     "author={Le, Ya and Yang, Xuan}, year={2015}}",
        )

    def _zip_path(self, dl_manager: tfds.download.DownloadManager) -> str:
        manual_dir = dl_manager._manual_dir  # noqa: SLF001 (the public property raises when empty)
        if manual_dir is not None and os.path.exists(os.path.join(manual_dir, ZIP_NAME)):
            return os.path.join(manual_dir, ZIP_NAME)
        try:
            return os.fspath(dl_manager.download(URL))
        except Exception as e:  # no network, refused, forbidden: say what to do instead
            raise FileNotFoundError(
                f"Tiny-ImageNet needs {ZIP_NAME}: it is not in the manual_dir ({manual_dir}) and "
                f"downloading {URL} failed ({type(e).__name__}: {e}). Download it on a machine with "
                f"internet and put it, unextracted, at {os.path.join(str(manual_dir), ZIP_NAME)}.") from e

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = self._zip_path(dl_manager)
        with zipfile.ZipFile(path) as archive:
            found = archive.read(ROOT + "wnids.txt").decode().split()
        unknown = sorted(set(found) - set(class_list()[0]))
        if unknown:
            raise ValueError(f"{path} lists classes that are not Tiny-ImageNet's: {unknown[:5]}")
        return {"train": self._generate_examples(path, "train"),
                "validation": self._generate_examples(path, "validation")}

    def _generate_examples(self, path: str, split: str):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if split == "train":
                # train/<wnid>/images/<wnid>_<i>.JPEG
                members = [(n, n.split("/")[2]) for n in names
                           if n.startswith(ROOT + "train/") and n.endswith(".JPEG")]
            else:
                # val/images/val_<i>.JPEG, labelled by val/val_annotations.txt (file, wnid, box)
                rows = archive.read(ROOT + "val/val_annotations.txt").decode().splitlines()
                labels = dict(r.split("\t")[:2] for r in rows if r.strip())
                members = [(ROOT + "val/images/" + f, w) for f, w in labels.items()]
            for name, wnid in members:
                # The JPEG bytes are stored as they are; decoding asks for 3 channels, so the few
                # grayscale images come out RGB.
                key = os.path.basename(name)
                yield key, {"image": io.BytesIO(archive.read(name)), "label": wnid, "id": key}
