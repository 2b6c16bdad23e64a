"""Random-access sources (open_split): TFDS data sets in array_record, ImageNet's manual tars, the digits."""

import multiprocessing
import os
import pickle
import socket
import time
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_imagenet import SYNSETS, VAL_TAR, train_colour, val_colour, write_fake_imagenet

from alite_jax.data import sources, tiny_imagenet
from alite_jax.errors import MissingFileError

TFDS_IMAGENET = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")


def _lines(name):
    with open(os.path.join(TFDS_IMAGENET, name)) as f:
        return f.read().split()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The fake ImageNet, prepared once by TFDS's own imagenet2012 builder in array_record."""
    data_dir = tmp_path_factory.mktemp("imagenet")
    shapes = write_fake_imagenet(data_dir / "downloads" / "manual")  # the default manual_dir
    train = sources.open_split("imagenet2012", "train", data_dir=str(data_dir))
    return data_dir, shapes, train


def test_fake_imagenet_through_tfds_end_to_end(imagenet):
    data_dir, shapes, train = imagenet
    synsets = _lines("labels.txt")
    assert sources.default_splits("imagenet2012") == ("train", "validation")
    assert train.num_classes == 1000 and train.class_names == tuple(synsets) and synsets == sorted(synsets)
    assert train.channels == 3 and train.image_size is None and len(train) == 4 * 3
    assert sorted(os.listdir(data_dir / "imagenet2012" / "5.1.0")).count(
        "imagenet2012-train.array_record-00000-of-00001") == 1
    # Train: the colour says which class tar and image an example came from; the label is that synset's
    # position in TFDS's sorted list, the shape that of the JPEG.
    seen = set()
    for k in range(len(train)):
        record = train.records[k]
        assert set(record) == {"image", "label"} and record["image"].dtype == np.uint8
        grey = int(round(float(record["image"].mean())))
        (c, i), = [(c, i) for c in range(4) for i in range(3) if abs(train_colour(c, i) - grey) <= 2]
        assert record["label"] == synsets.index(SYNSETS[c]) and isinstance(record["label"], int)
        assert record["image"].shape == shapes[f"{SYNSETS[c]}_{10026 + 7 * i}.JPEG"] + (3,)
        seen.add((c, i))
    assert len(seen) == 12
    # Validation: labels from TFDS's validation_labels.txt (line k: the k-th file name in sorted order).
    val = sources.open_split("imagenet2012", "validation", data_dir=str(data_dir))
    expected = _lines("validation_labels.txt")
    assert len(val) == 6
    for k in range(6):
        record = val.records[k]
        n = [n for n in range(6) if abs(val_colour(n) - float(record["image"].mean())) <= 2][0]
        assert record["image"].shape == shapes[f"ILSVRC2012_val_{n + 1:08d}.JPEG"] + (3,)
        assert synsets[record["label"]] == expected[n]


def test_slicing_picks_the_same_records(imagenet):
    data_dir, _, train = imagenet
    part = sources.open_split("imagenet2012", "train[3:7]", data_dir=str(data_dir))
    half = sources.open_split("imagenet2012", "train[50%:]", data_dir=str(data_dir))
    assert len(part) == 4 and len(half) == 6
    for records, offset in ((part.records, 3), (half.records, 6)):
        for k in range(len(records)):
            np.testing.assert_array_equal(records[k]["image"], train.records[offset + k]["image"])
            assert records[k]["label"] == train.records[offset + k]["label"]
    assert [r["label"] for r in part.records.__getitems__([0, 2])] == [part.records[0]["label"],
                                                                      part.records[2]["label"]]
    with pytest.raises(IndexError):
        part.records[4]


def _read(records, index, queue):
    record = records[index]
    queue.put((record["image"].tobytes(), record["image"].shape, record["label"]))


@pytest.mark.slow
def test_records_pickle_small_and_read_in_a_spawned_process(imagenet):
    _, _, train = imagenet
    raw = pickle.dumps(train.records)
    assert len(raw) < 400  # the directory and the split, no data (133 bytes here)
    copy = pickle.loads(raw)
    assert len(copy) == len(train) and copy[5]["label"] == train.records[5]["label"]
    # grain's worker processes are spawned: the records go pickled and open the files there.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_read, args=(train.records, 5, queue))
    process.start()
    image, shape, label = queue.get(timeout=120)
    process.join(30)
    parent = train.records[5]
    assert process.exitcode == 0 and label == parent["label"] and shape == parent["image"].shape
    assert image == parent["image"].tobytes()


def test_missing_imagenet_tars_are_named_with_their_directory(tmp_path):
    manual = tmp_path / "manual"
    pattern = (r"ILSVRC2012_img_train\.tar and ILSVRC2012_img_val\.tar in {dir}: {missing} (is|are) not "
               r"there.*put them, unextracted, in {dir}.*ILSVRC2012_img_test\.tar is optional")
    default = str(tmp_path / "d" / "downloads" / "manual")
    with pytest.raises(MissingFileError, match=pattern.format(
            dir=default, missing=r"ILSVRC2012_img_train\.tar and ILSVRC2012_img_val\.tar")):
        sources.open_split("imagenet2012", "train", data_dir=str(tmp_path / "d"))
    write_fake_imagenet(manual, per_class=1, num_val=1)
    os.remove(manual / VAL_TAR)
    for download in (True, False):
        with pytest.raises(MissingFileError, match=pattern.format(
                dir=str(manual), missing=r"ILSVRC2012_img_val\.tar")):
            sources.open_split("imagenet2012", "validation", data_dir=str(tmp_path / "d"),
                               manual_dir=str(manual), download=download)


def test_digits_records_equal_the_in_memory_split():
    for split in ("train", "test", "test[10:20]"):
        images, labels, names = sources._load_digits(split)
        source = sources.open_split("digits", split)
        assert len(source) == len(labels) and source.class_names == names == tuple(map(str, range(10)))
        assert source.channels == 1 and source.image_size == (8, 8) and source.num_classes == 10
        for k in range(len(source)):
            assert source.records[k]["label"] == labels[k]
            np.testing.assert_array_equal(source.records[k]["image"], images[k])
        assert pickle.loads(pickle.dumps(source.records))[3]["label"] == labels[3]
    assert len(sources.open_split("digits", "test[10:20]")) == 10
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        sources.open_split("digits", "validation")


@pytest.fixture
def reachable(monkeypatch):
    """mock_data serves made-up examples without downloading: say the download hosts answer."""
    monkeypatch.setattr(sources, "unreachable_hosts", lambda builder: [])


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100)])
def test_mocked_tfds_data_sources_keep_their_channels(name, shape, classes, tmp_path, reachable):
    with tfds.testing.mock_data(num_examples=6):  # TFDS 4.9.10's mock_data mocks as_data_source too
        source = sources.open_split(name, "test", data_dir=str(tmp_path))
        records = [source.records[k] for k in range(len(source))]
    assert len(records) == 6 and source.channels == shape[-1] and source.image_size == shape[:2]
    assert source.num_classes == classes
    for record in records:
        assert set(record) == {"image", "label"} and record["image"].shape == shape
        assert record["image"].dtype == np.uint8 and 0 <= record["label"] < classes


def _tiny_imagenet_zip(path, wnids):
    import io

    from PIL import Image

    with zipfile.ZipFile(path, "w") as z:
        root = "tiny-imagenet-200/"
        z.writestr(root + "wnids.txt", "\n".join(wnids) + "\n")
        rows = []
        for c, w in enumerate(wnids):
            for i in range(2):
                out = io.BytesIO()
                Image.fromarray(np.full((64, 64, 3), 40 * c + 10 * i, np.uint8)).save(out, format="JPEG")
                z.writestr(root + f"train/{w}/images/{w}_{i}.JPEG", out.getvalue())
                z.writestr(root + f"val/images/val_{2 * c + i}.JPEG", out.getvalue())
                rows.append(f"val_{2 * c + i}.JPEG\t{w}\t0\t0\t63\t63")
        z.writestr(root + "val/val_annotations.txt", "\n".join(rows) + "\n")


def test_tfrecord_prepared_data_set_is_converted_to_array_record(tmp_path):
    """A data set prepared in the TFRecord format (TFDS's default before) cannot be read record by record:
    with download off the error says where it is and how to convert it; with download on it is converted
    in place and reads the same examples as the TFRecord files."""
    wnids = tiny_imagenet.class_list()[0]
    manual = tmp_path / "manual"
    manual.mkdir()
    _tiny_imagenet_zip(manual / "tiny-imagenet-200.zip", [wnids[3], wnids[1]])
    data_dir = str(tmp_path / "data")
    builder = tfds.builder("tiny_imagenet", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    files = os.listdir(builder.data_dir)
    assert any(".tfrecord-" in f for f in files) and not any(".array_record-" in f for f in files)
    with pytest.raises(MissingFileError, match=(
            rf"prepared in {builder.data_dir} in the tfrecord file format.*download is off.*"
            rf"tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record.*"
            rf"download_and_prepare\(file_format='array_record'\)")):
        sources.open_split("tiny_imagenet", "train", data_dir=data_dir, download=False)
    source = sources.open_split("tiny_imagenet", "train", data_dir=data_dir)
    assert sorted(f for f in os.listdir(builder.data_dir) if ".array_record-" in f) == [
        "tiny_imagenet-train.array_record-00000-of-00001",
        "tiny_imagenet-validation.array_record-00000-of-00001"]
    expected = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(source) == len(expected) == 4 and source.image_size == (64, 64) and source.channels == 3
    for k, example in enumerate(expected):
        np.testing.assert_array_equal(source.records[k]["image"], example["image"])
        assert source.records[k]["label"] == example["label"]
    assert sorted(source.records[k]["label"] for k in range(4)) == [1, 1, 3, 3]
    # Opened again: nothing left to convert, both formats are there.
    assert len(sources.open_split("tiny_imagenet", "validation", data_dir=data_dir, download=False)) == 4


def test_unprepared_data_set_without_network_fails_fast(tmp_path, monkeypatch):
    def no_network(address, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def download(self, *args, **kwargs):
        raise AssertionError("download_and_prepare was called: without network it retries for minutes")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    start = time.perf_counter()
    with pytest.raises(MissingFileError, match=(
            r"data set 'mnist' is not prepared in .*mnist.* and its download host storage\.googleapis\.com "
            r"\(gaierror: .*\) cannot be reached: prepare it on a machine with network.*data\.data_dir"
            r".*data\.download=False")):
        sources.open_split("mnist", "test", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    with pytest.raises(MissingFileError, match=r"'mnist' is not prepared in .* and download is off"):
        sources.open_split("mnist", "test", data_dir=str(tmp_path), download=False)
    # Tiny-ImageNet's builder downloads in its own code (no registered URL): probed all the same (before,
    # 206 s of TFDS retries); with its zip in the manual directory nothing is downloaded, so no probe.
    start = time.perf_counter()
    with pytest.raises(MissingFileError, match=r"'tiny_imagenet' .* its download host cs231n\.stanford\.edu "
                                               r"\(gaierror: .*\) cannot be reached.*Download "
                                               r"tiny-imagenet-200\.zip from .* in the manual_dir"):
        sources.open_split("tiny_imagenet", "validation", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "tiny-imagenet-200.zip").write_bytes(b"")
    with pytest.raises(AssertionError, match="download_and_prepare was called"):
        sources.open_split("tiny_imagenet", "validation", data_dir=str(tmp_path))


def test_unknown_and_non_classification_data_sets_fail_clearly():
    with pytest.raises(ValueError, match="unknown data set 'imagenet_typo'"):
        sources.open_split("imagenet_typo", "train")
    with pytest.raises(ValueError, match="no 'image' and 'label' features.*not an image classification"):
        sources.open_split("coco", "train")
