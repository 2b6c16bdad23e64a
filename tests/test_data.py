"""Input pipelines: the tiny_imagenet builder, the grain pipeline (order, resume, augmentation in
workers, exact evaluation, sharding over shards, processes and devices)."""

import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from fake_imagenet import write_fake_imagenet

from alite_jax import data
from alite_jax.data import sources, tiny_imagenet
from alite_jax.data.sources import ArrayRecords, SplitSource


def records(source):
    """(images, labels) of every record of a source, stacked."""
    rows = [source.records[i] for i in range(len(source))]
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


# ---------------------------------------------------------------------------------------------
# The Tiny-ImageNet builder.
# ---------------------------------------------------------------------------------------------


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
    train = data.open_split("tiny_imagenet", "train", **common)
    val = data.open_split("tiny_imagenet", "validation", **common)
    assert len(train) == 9 and len(val) == 5  # the test split (no labels) is left out
    assert train.num_classes == 200 and train.class_names == all_wnids and train.image_size == (64, 64)
    train_images, train_labels = records(train)
    val_images, val_labels = records(val)
    assert train_images.shape[1:] == (64, 64, 3) and val_images.shape[1:] == (64, 64, 3)
    # Train labels come from the folder names; the colour tells which folder an image came from.
    # Image colour 40 c + 10 i marks the zip's class c; its label is that wnid's sorted position.
    expected = {0: 7, 1: 0, 2: 150}
    classes = [int(round(float(image.mean()))) // 40 for image in train_images]
    assert sorted(classes) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [expected[c] for c in classes] == list(train_labels)
    # Validation labels come from val_annotations.txt: classes (0, 1, 2, 0, 2) of the zip's list.
    by_colour = sorted(zip([float(i.mean()) for i in val_images], val_labels))
    np.testing.assert_array_equal([lab for _, lab in by_colour], [7, 7, 0, 150, 150])
    assert names[all_wnids.index("n01443537")].startswith("goldfish")


def test_tiny_imagenet_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    def refused(self, url):  # no network here: TFDS's real downloader would retry for minutes
        raise ConnectionRefusedError(f"cannot reach {url}")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", refused)
    # the builder's own message when its download fails (the host probe before it: tests/test_sources.py)
    monkeypatch.setattr(sources, "unreachable_hosts", lambda builder: [])
    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200\.zip.*put it.*manual"):
        data.open_split("tiny_imagenet", "train", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tiny-imagenet-200\.zip.*manual_dir"):
        data.open_split("tiny_imagenet", "train", data_dir=str(tmp_path / "d"), download=False)


def test_unknown_data_set_and_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown data set 'imagenet_typo'"):
        data.open_split("imagenet_typo", "train")
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        data.check_data_config(data.default_config(batch_size=100), 8, 1)
    with pytest.raises(ValueError, match="larger than the training split"):
        data.create_input_pipeline(data.default_config(batch_size=2000))
    for field, value, match in (("augment", "autoaugment", "data.augment must be one of"),
                                ("normalization", "cifar", "data.normalization must be one of")):
        cfg = data.default_config()
        cfg[field] = value
        with pytest.raises(ValueError, match=match):
            data.check_data_config(cfg, 1, 1)
    cfg = data.default_config(batch_size=64)
    cfg.normalization = "imagenet"
    with pytest.raises(ValueError, match="needs RGB images.*normalization='dataset'"):
        data.create_input_pipeline(cfg)


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------


def synthetic_source(n=40, size=16):
    """Constant images whose value is the example's index: crops and flips keep the index readable."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    return SplitSource(ArrayRecords(np.ascontiguousarray(images), np.arange(n) % 10), 10,
                       tuple(map(str, range(10))), 3, (size, size))


def synthetic_pipeline(n=40, batch=8, eval_batch=6, seed=0, size=16, shards=1, workers=0):
    cfg = data.default_config("synthetic", image_size=size, batch_size=batch)
    cfg.update(eval_batch_size=eval_batch, seed=seed, data_shards=shards, workers=workers)
    source = synthetic_source(n, size)
    return data.build_input_pipeline(cfg, source, source)


def indices(pipe, batch):
    """The example index each image of a batch shows (undoing the normalisation)."""
    pixels = (np.asarray(batch["image"])[:, 0, 0, 0] * pipe.std[0] + pipe.mean[0]) * 255
    return pixels.round().astype(int)


def test_each_example_once_per_epoch_and_epochs_differ():
    pipe = synthetic_pipeline(n=40, batch=8)
    epochs = [np.concatenate([indices(pipe, b) for b in pipe.train_epoch(e)]) for e in range(2)]
    for seen in epochs:
        assert len(seen) == 40 and sorted(seen) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])


def test_an_epoch_drops_the_remainder_of_its_permutation():
    pipe = synthetic_pipeline(n=43, batch=8)  # 5 steps of 8; 3 examples left out, others each epoch
    epochs = [np.concatenate([indices(pipe, b) for b in pipe.train_epoch(e)]) for e in range(3)]
    assert pipe.steps_per_epoch == 5 and all(len(set(e)) == 40 for e in epochs)
    assert len({tuple(sorted(set(range(43)) - set(e))) for e in epochs}) > 1


def test_training_is_deterministic_and_resumes_from_the_iterator_state():
    run = lambda seed, epoch, start=0: [np.asarray(b["image"]) for b in
                                        synthetic_pipeline(seed=seed).train_epoch(epoch, start)]
    first, again = run(0, 3), run(0, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first[2:], run(0, 3, start=2)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, run(1, 3)))
    # The stream a trainer reads: its state after 7 steps, set on a new iterator, gives the same rest.
    pipe = synthetic_pipeline()
    stream = pipe.train_iterator()
    head = [np.asarray(next(stream)["image"]) for _ in range(7)]
    state = stream.get_state()
    tail = [np.asarray(next(stream)["image"]) for _ in range(9)]
    resumed = synthetic_pipeline().train_iterator()
    resumed.set_state(state)
    assert all(np.array_equal(a, np.asarray(next(resumed)["image"])) for a in tail)
    # Epoch 1 of the stream (steps 5-9) is train_epoch(1).
    np.testing.assert_array_equal((head + tail)[5], np.asarray(next(iter(pipe.train_epoch(1)))["image"]))
    stream.close()
    resumed.close()


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    """grain's worker processes (spawned; they import the transforms) yield what this process would."""
    inline, workers = synthetic_pipeline(), synthetic_pipeline(workers=2)
    expected = [np.asarray(b["image"]) for b in inline.train_epoch(0)]
    stream = workers.train_iterator()
    got = [np.asarray(next(stream)["image"]) for _ in range(3)]
    state = stream.get_state()
    stream.close()
    resumed = synthetic_pipeline(workers=2).train_iterator()
    resumed.set_state(state)
    got += [np.asarray(next(resumed)["image"]) for _ in range(2)]
    resumed.close()
    assert all(np.array_equal(a, b) for a, b in zip(expected, got)) and len(got) == len(expected)
    evals = [np.asarray(b["image"]) for b in workers.eval_batches()]
    assert all(np.array_equal(a, np.asarray(b["image"])) for a, b in zip(evals, inline.eval_batches()))


def test_training_batches_are_cifar_augmented():
    """Every training image is a reflect-pad crop and flip of its example (the recipe's own tests pin
    the op); the labels travel with their images."""
    pipe = synthetic_pipeline(n=40, batch=8, size=16)
    for batch in pipe.train_epoch(0):
        image = np.asarray(batch["image"])
        assert image.shape == (8, 16, 16, 3) and image.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(batch["label"]), indices(pipe, batch) % 10)


def test_a_failing_transform_names_its_error():
    def broken(image, rng):
        raise RuntimeError("cannot decode this record")

    pipe = synthetic_pipeline()
    pipe.train_data = data.pipeline.grain.MapDataset.source(range(4)).map(lambda i: broken(None, None))
    with pytest.raises(RuntimeError, match="cannot decode this record"):
        next(pipe.train_iterator())


def test_eval_covers_every_example_once_with_padding():
    cfg = data.default_config("digits", image_size=8, batch_size=64)  # 359 test examples
    pipe = data.create_input_pipeline(cfg)
    test_images, test_labels = records(data.open_split("digits", "test"))
    batches = list(pipe.eval_batches())
    assert len(batches) == pipe.eval_steps == 6 and pipe.num_eval_examples == 359
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert masks.sum() == 359 and not masks[359:].any()
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])[masks]
    images = np.concatenate([np.asarray(b["image"]) for b in batches])[masks]
    np.testing.assert_array_equal(labels, test_labels)
    # No augmentation at eval: exactly the normalised originals.
    np.testing.assert_allclose(images, (test_images / 255.0 - pipe.mean) / pipe.std, atol=1e-5)
    train = records(data.open_split("digits", "train"))[0] / 255.0
    np.testing.assert_allclose(pipe.mean, train.mean(), rtol=1e-5)
    np.testing.assert_allclose(pipe.std, train.std(), rtol=1e-4)


def test_data_shards_split_the_data_and_each_batch():
    pipe = synthetic_pipeline(n=40, batch=8, shards=2)  # shards hold examples 0-19 and 20-39
    for batch in pipe.train_epoch(0):
        idx = indices(pipe, batch)
        assert (idx[:4] < 20).all() and (idx[4:] >= 20).all()
    seen = np.concatenate([indices(pipe, b) for b in pipe.train_epoch(0)])
    assert sorted(seen) == list(range(40))
    ev = list(pipe.eval_batches())  # 20 examples per shard in sub-batches of 3: 7 steps, last padded
    assert len(ev) == pipe.eval_steps == 7
    shown = np.concatenate([indices(pipe, b)[np.asarray(b["mask"])] for b in ev])
    assert sorted(shown) == list(range(40))


def test_fake_imagenet_through_the_deit_and_imagenet_recipes(tmp_path):
    """JPEGs of varying sizes, prepared by TFDS's imagenet2012 builder: random-resized crops (with
    RandAugment and erasing for DeiT) at training, resize + centre crop at evaluation, ImageNet's
    normalisation; every batch has the configured shape."""
    write_fake_imagenet(tmp_path / "downloads" / "manual")
    for recipe in ("imagenet", "deit"):
        cfg = data.default_config("imagenet2012", image_size=32, batch_size=4)
        cfg.update(data_dir=str(tmp_path), augment=recipe, normalization="imagenet", eval_batch_size=4)
        pipe = data.create_input_pipeline(cfg)
        assert pipe.num_classes == 1000 and pipe.steps_per_epoch == 3
        np.testing.assert_allclose(pipe.mean, [0.485, 0.456, 0.406])
        batch = next(iter(pipe.train_epoch(0)))
        assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.int32
        ev = list(pipe.eval_batches())
        assert all(b["image"].shape == (4, 32, 32, 3) for b in ev)
        assert sum(int(np.asarray(b["mask"]).sum()) for b in ev) == pipe.num_eval_examples


@pytest.mark.slow
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
