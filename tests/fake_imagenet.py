"""A small fake ImageNet (ILSVRC 2012) in the real manual-download layout, for TFDS's imagenet2012 builder.

* ``ILSVRC2012_img_train.tar``: one tar per class, named by its WordNet id (``n01440764.tar``), each
  holding that class's JPEGs named like the real ones (``n01440764_10026.JPEG``).
* ``ILSVRC2012_img_val.tar``: ``ILSVRC2012_val_00000001.JPEG`` ... flat. TFDS labels them with the
  validation labels file it ships (``validation_labels.txt``: line k is the synset of the k-th image name
  in sorted order), so a fake with n images gets the first n labels of that file.

Every image is a small solid-colour JPEG whose size differs per image (ImageNet's sizes vary); the colour
says which image it is (see :func:`train_colour`, :func:`val_colour`), and the sizes are returned.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# Real synsets: 0 (tench), 1 (goldfish), 2 (great white shark) and 999 (toilet tissue) of TFDS's labels.txt,
# listed out of order on purpose: labels follow TFDS's sorted list, not the tar's order.
SYNSETS = ("n15075141", "n01440764", "n01484850", "n01443537")


def train_colour(c: int, i: int) -> int:
    """Grey level of image i of the c-th synset of the train tar."""
    return 20 + 50 * c + 10 * i


def val_colour(k: int) -> int:
    """Grey level of validation image k (0-based: ILSVRC2012_val_{k + 1:08d}.JPEG)."""
    return 15 + 20 * k


def _jpeg(grey: int, height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), grey, np.uint8)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_fake_imagenet(manual_dir: str | os.PathLike, synsets=SYNSETS, per_class: int = 3,
                        num_val: int = 6) -> dict[str, tuple[int, int]]:
    """Writes the two tars into ``manual_dir``; returns {file name: (height, width)} of every JPEG."""
    os.makedirs(manual_dir, exist_ok=True)
    shapes = {}
    with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as train:
        for c, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_synset:
                for i in range(per_class):
                    name = f"{synset}_{10026 + 7 * i}.JPEG"
                    shapes[name] = (30 + i, 40 - c)
                    _add(per_synset, name, _jpeg(train_colour(c, i), *shapes[name]))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as val:
        for k in reversed(range(num_val)):  # tar order is not name order; TFDS sorts the names
            name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
            shapes[name] = (24 + k, 36)
            _add(val, name, _jpeg(val_colour(k), *shapes[name]))
    return shapes
