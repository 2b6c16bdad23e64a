"""Input pipelines: sources in their real on-disk formats, augmentation, exact evaluation, sharding."""

import os
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alite_jax import data
from alite_jax.data import sources, tiny_imagenet
from alite_jax.data.pipeline import InputPipeline
from alite_jax.distributed import make_mesh
from alite_jax.data.sources import Split


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


def test_digits_demo_data():
    train = data.load_split("digits", "train")
    test = data.load_split("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.num_classes == 10 and set(np.unique(train.labels)) == set(range(10))
    assert train.images.max() == 255  # sklearn's 0..16 scaled to 0..255
    assert data.load_split("digits", "train", image_size=16).images.shape[1:] == (16, 16, 1)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        data.load_split("digits", "validation")


@pytest.fixture
def reachable(monkeypatch):
    """mock_data serves made-up examples without downloading: say the download hosts answer, so that
    load_split's check for an unprepared data set sends nothing over the network."""
    monkeypatch.setattr(sources, "unreachable_hosts", lambda builder: [])


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_tfds(name, classes, tmp_path, reachable):
    with tfds.testing.mock_data(num_examples=12):
        cfg = data.default_config(name, image_size=32, batch_size=4)
        cfg.data_dir = str(tmp_path)
        pipe = data.create_input_pipeline(cfg)
    assert pipe.num_classes == classes and pipe.steps_per_epoch == 3 and pipe.eval_steps == 3
    batch = next(iter(pipe.train_epoch(0)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert 0 <= int(batch["label"].min()) and int(batch["label"].max()) < classes


def test_grayscale_tfds_data_set_keeps_one_channel(tmp_path, reachable):
    with tfds.testing.mock_data(num_examples=4):
        split = data.load_split("mnist", "test", data_dir=str(tmp_path), image_size=32)
    assert split.images.shape == (4, 32, 32, 1)


def test_unprepared_data_set_without_network_fails_fast(tmp_path, monkeypatch):
    """mnist is not prepared in an empty data_dir and its download host does not answer: the error says at
    once what to do (before: TFDS retried every download for minutes and ended in a requests traceback)."""
    def no_network(address, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def download(self, *args, **kwargs):
        raise AssertionError("download_and_prepare was called: without network it retries for minutes")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=(
            r"data set 'mnist' is not prepared in .*mnist.* and its download host storage\.googleapis\.com "
            r"\(gaierror: .*\) cannot be reached: prepare it on a machine with network.*data\.data_dir"
            r".*data\.download=False")):
        data.load_split("mnist", "test", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def _jpeg(color, channels=3) -> bytes:
    image = np.full((64, 64, channels), color, np.uint8)
    return tf.io.encode_jpeg(image, quality=100).numpy()


def write_tiny_imagenet_zip(path, wnids, per_class=3, val_labels=(0, 1, 2, 0, 2)):
    """A small tiny-imagenet-200.zip in the official layout; image colour encodes (class, index)."""
    root = "tiny-imagenet-200/"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(root + "wnids.txt", "\n".join(wnids) + "\n")
        z.writestr(root + "words.txt", "".join(f"{w}\tname of {w}\n" for w in wnids))
        for c, w in enumerate(wnids):
            z.writestr(root + f"train/{w}/{w}_boxes.txt", "")
            for i in range(per_class):
                z.writestr(root + f"train/{w}/images/{w}_{i}.JPEG", _jpeg(40 * c + 10 * i))
        rows = []
        for i, c in enumerate(val_labels):
            gray = i == 1  # the real data has a few grayscale JPEGs
            z.writestr(root + f"val/images/val_{i}.JPEG", _jpeg(40 * c + 5, 1 if gray else 3))
            rows.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
        z.writestr(root + "val/val_annotations.txt", "\n".join(rows) + "\n")
        z.writestr(root + "test/images/test_0.JPEG", _jpeg(0))


def test_tiny_imagenet_builder_end_to_end(tmp_path):
    all_wnids, names = tiny_imagenet.class_list()
    assert len(all_wnids) == 200 == len(set(all_wnids)) and list(all_wnids) == sorted(all_wnids)
    wnids = [all_wnids[7], all_wnids[0], all_wnids[150]]  # any order: labels follow the sorted list
    manual = tmp_path / "manual"
    manual.mkdir()
    write_tiny_imagenet_zip(manual / "tiny-imagenet-200.zip", wnids)
    common = dict(data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    train = data.load_split("tiny_imagenet", "train", **common)
    val = data.load_split("tiny_imagenet", "validation", **common)
    assert len(train) == 9 and len(val) == 5  # the test split (no labels) is left out
    assert train.num_classes == 200 and train.class_names == all_wnids
    assert train.images.shape[1:] == (64, 64, 3) and val.images.shape[1:] == (64, 64, 3)
    # Train labels come from the folder names; the colour tells which folder an image came from.
    # Image colour 40 c + 10 i marks the zip's class c; its label is that wnid's sorted position.
    expected = {0: 7, 1: 0, 2: 150}
    classes = [int(round(float(image.mean()))) // 40 for image in train.images]
    assert sorted(classes) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [expected[c] for c in classes] == list(train.labels)
    # Validation labels come from val_annotations.txt: classes (0, 1, 2, 0, 2) of the zip's list.
    by_colour = sorted(zip([float(i.mean()) for i in val.images], val.labels))
    np.testing.assert_array_equal([lab for _, lab in by_colour], [7, 7, 0, 150, 150])
    assert names[all_wnids.index("n01443537")].startswith("goldfish")


def test_tiny_imagenet_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    def refused(self, url):  # no network here: TFDS's real downloader would retry for minutes
        raise ConnectionRefusedError(f"cannot reach {url}")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", refused)
    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200\.zip.*put it.*manual"):
        data.load_split("tiny_imagenet", "train", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tiny-imagenet-200\.zip.*manual_dir"):
        data.load_split("tiny_imagenet", "train", data_dir=str(tmp_path / "d"), download=False)


def test_unknown_data_set_and_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown data set 'imagenet_typo'"):
        data.load_split("imagenet_typo", "train")
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        data.check_data_config(data.default_config(batch_size=100), 8, 1)
    cfg = data.default_config(batch_size=2000)
    with pytest.raises(ValueError, match="larger than the training split"):
        data.create_input_pipeline(cfg)


# ---------------------------------------------------------------------------------------------
# Pipeline.
# ---------------------------------------------------------------------------------------------


def synthetic_pipeline(n=40, batch=8, eval_batch=6, seed=0, size=16, shards=1):
    """Constant images whose value is the example's index: crops and flips keep the index readable."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    labels = np.arange(n, dtype=np.int32) % 10
    per = n // shards
    split = lambda v: Split(np.ascontiguousarray(images[v * per:(v + 1) * per]),
                            labels[v * per:(v + 1) * per], 10, tuple(map(str, range(10))))
    parts = [split(v) for v in range(shards)]
    return InputPipeline(
        train_shards=parts, eval_shards=parts, shard_ids=list(range(shards)), num_shards=shards,
        batch_size=batch, eval_batch_size=eval_batch, image_size=size, seed=seed,
        mean=np.zeros(3, np.float32), std=np.full(3, 1 / 255, np.float32), mesh=make_mesh(),
        num_classes=10, class_names=tuple(map(str, range(10))), steps_per_epoch=per // (batch // shards),
        eval_steps=-(-per // (eval_batch // shards)), num_eval_examples=n)


def indices(batch):
    return np.asarray(batch["image"])[:, 0, 0, 0].round().astype(int)


def test_each_example_once_per_epoch_and_epochs_differ():
    pipe = synthetic_pipeline(n=40, batch=8)
    epochs = [np.concatenate([indices(b) for b in pipe.train_epoch(e)]) for e in range(2)]
    for seen in epochs:
        assert len(seen) == 40 and sorted(seen) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])


def test_training_is_deterministic_and_resumable():
    run = lambda seed, epoch, start=0: [np.asarray(b["image"]) for b in
                                        synthetic_pipeline(seed=seed).train_epoch(epoch, start)]
    first, again = run(0, 3), run(0, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first[2:], run(0, 3, start=2)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, run(1, 3)))


def test_augmentation_is_crop_of_reflect_padding_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = data.augment(images, np.random.default_rng(1), pad=1)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifts, flips = set(), 0
    for k in range(64):
        matches = [(dy, dx, f) for dy in range(3) for dx in range(3) for f in (0, 1)
                   if np.array_equal(out[k], (lambda c: c[:, ::-1] if f else c)(
                       padded[k, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {k} is not a crop of its reflect-padded original"
        shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(shifts) == 9  # every shift in [-1, 1]^2 occurs
    assert 16 < flips < 48  # about half are flipped
    # Reflective (not zero) padding: padded border pixels repeat interior ones.
    np.testing.assert_array_equal(padded[:, 0, 1:-1], images[:, 1])


def test_eval_covers_every_example_once_with_padding():
    cfg = data.default_config("digits", image_size=8, batch_size=64)  # 359 test examples
    pipe = data.create_input_pipeline(cfg)
    test = data.load_split("digits", "test")
    batches = list(pipe.eval_batches())
    assert len(batches) == pipe.eval_steps == 6 and pipe.num_eval_examples == 359
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert masks.sum() == 359 and not masks[359:].any()
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])[masks]
    images = np.concatenate([np.asarray(b["image"]) for b in batches])[masks]
    np.testing.assert_array_equal(labels, test.labels)
    # No augmentation at eval: exactly the normalised originals.
    np.testing.assert_allclose(images, data.normalize(test.images, pipe.mean, pipe.std), atol=1e-6)
    train = data.load_split("digits", "train").images / 255.0
    np.testing.assert_allclose(pipe.mean, train.mean(), rtol=1e-5)
    np.testing.assert_allclose(pipe.std, train.std(), rtol=1e-4)


def test_data_shards_split_the_data_and_each_batch():
    pipe = synthetic_pipeline(n=40, batch=8, shards=2)  # shards hold examples 0-19 and 20-39
    for batch in pipe.train_epoch(0):
        idx = indices(batch)
        assert (idx[:4] < 20).all() and (idx[4:] >= 20).all()
    seen = np.concatenate([indices(b) for b in pipe.train_epoch(0)])
    assert sorted(seen) == list(range(40))


def test_sharded_over_eight_devices():
    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import numpy as np
        from alite_jax import data
        pipe = data.create_input_pipeline(data.default_config("digits", image_size=8, batch_size=64))
        batch = next(iter(pipe.train_epoch(0)))
        shards = batch["image"].addressable_shards
        assert len(jax.devices()) == 8 and len(shards) == 8
        assert {s.data.shape for s in shards} == {(8, 8, 8, 1)}
        assert len({s.device for s in shards}) == 8
        ev = next(iter(pipe.eval_batches()))
        assert len(ev["mask"].addressable_shards) == 8
        try:
            data.create_input_pipeline(data.default_config("digits", image_size=8, batch_size=60))
        except ValueError as e:
            assert "not divisible by the 8 devices" in str(e)
        else:
            raise AssertionError("batch size 60 on 8 devices was accepted")
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_prefetch_propagates_errors():
    def broken():
        yield 1
        raise RuntimeError("source failed")

    it = data.prefetch(broken())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="source failed"):
        next(it)

