"""Image datasets kept as files: listing, file sharding, augmentation, bad data (real TensorFlow)."""

import hashlib

import numpy as np
import pytest
from support import write_image_folder

from job import tfenv
from job.config import Config
from job.data import InputSettings, load, sources
from job.errors import DataError

tf, _ = tfenv.tensorflow()

SHAPE = (64, 64, 3)  # small crops keep these tests fast; the 224 path is the integration test's


@pytest.fixture(scope="module")
def folder(mnist_dir, tmp_path_factory):
    return write_image_folder(mnist_dir, tmp_path_factory.mktemp("images"), per_class=6, classes=4, val_per_class=3)


def splits_of(root, **options):
    return load(Config(dataset="imagefolder", data=str(root), workers=2, batch_size=4, **options).validate())


def settings(bad=None, **overrides):
    values = dict(global_batch=4, steps_per_epoch=3, seed=0, augment=True, input_shape=SHAPE, cpus=1,
                  on_bad=lambda image, reason: bad.append((image, reason)) if bad is not None else None)
    return InputSettings(**{**values, **overrides})


def context(pipeline):
    return tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)


def batches(dataset, count):
    return [(images.numpy(), labels.numpy()) for images, labels in dataset.take(count)]


def fingerprints(images):
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in images}


def test_listing_maps_sorted_class_folders_to_indices(folder):
    listed = sources.list_imagefolder(str(folder.root))
    assert listed.class_names == folder.class_names
    assert listed.files == folder.files
    assert listed.counts == {"train": 24, "val": 12}


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "train" / "9").mkdir(), "class '9' in {root}/train has no images"),
    (lambda root: (root / "val" / "7").mkdir() or (root / "val" / "7" / "a.png").write_bytes(b"x"),
     "class '7' is in {root}/val but not in {root}/train"),
    (lambda root: __import__("shutil").rmtree(root / "val"), "no images in {root}/val"),
    (lambda root: __import__("shutil").rmtree(root), "dataset folder not found: {root}"),
])
def test_a_bad_layout_is_a_clear_error_before_training(folder, tmp_path, damage, message):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder.root, root)
    damage(root)
    with pytest.raises(DataError, match=message.format(root=root).replace("/", ".")):
        splits_of(root)


def test_each_worker_reads_its_own_disjoint_share_of_the_files_every_epoch(folder):
    splits = splits_of(folder.root, augment=False)
    per_epoch = 3 * 2  # steps x per-replica batch
    seen = {}
    for pipeline in (0, 1):
        training = splits.training(context(pipeline), settings(augment=False))
        assert training.cardinality() == tf.data.INFINITE_CARDINALITY  # endless, and declared so
        got = batches(training, 2 * 3)
        images = np.concatenate([b[0] for b in got])
        seen[pipeline] = [fingerprints(images[:per_epoch]), fingerprints(images[per_epoch:])]
        assert images.shape[1:] == SHAPE and 0 <= images.min() and images.max() <= 1
    for epoch in (0, 1):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == per_epoch
        assert not seen[0][epoch] & seen[1][epoch]
    assert seen[0][0] != seen[0][1]  # a fresh permutation each epoch


def test_a_resumed_stream_repeats_the_uninterrupted_one_exactly(folder):
    splits = splits_of(folder.root)
    whole = batches(splits.training(context(1), settings()), 5)
    resumed = batches(splits.training(context(1), settings(), first_epoch=1, skip_steps=1), 1)
    np.testing.assert_array_equal(resumed[0][0], whole[4][0])
    np.testing.assert_array_equal(resumed[0][1], whole[4][1])
    again = batches(splits.training(context(1), settings()), 5)
    np.testing.assert_array_equal(again[2][0], whole[2][0])  # augmentation is seeded, not random


def test_augmentation_crops_flips_and_jitters(folder):
    plain = batches(splits_of(folder.root).training(context(0), settings(augment=False)), 1)[0][0]
    augmented = batches(splits_of(folder.root).training(context(0), settings()), 1)[0][0]
    jittered = batches(splits_of(folder.root, color_jitter=1.0).training(context(0), settings()), 1)[0][0]
    assert not np.array_equal(plain, augmented)
    assert not np.array_equal(augmented, jittered)
    assert 0 <= jittered.min() and jittered.max() <= 1


def test_bad_images_are_skipped_named_and_counted_without_a_short_batch(folder, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder.root, root)
    a_jpeg = next(path for path, _ in folder.files["train"] if path.endswith(".jpg"))
    broken = {
        root / "train" / "0" / "garbage.jpg": b"not an image at all",
        root / "train" / "1" / "empty.png": b"",
        root / "train" / "2" / "truncated.jpg": (root / a_jpeg).read_bytes()[:200],
        root / "train" / "3" / "text.png": b"P3 but not really a PNG",
    }
    for path, data in broken.items():
        path.write_bytes(data)
    splits = splits_of(root)
    bad = []
    steps = 28 // 2 // 2  # each worker's 14 files of an epoch, in batches of 2: every file is read
    got = [batches(splits.training(context(p), settings(bad, steps_per_epoch=steps)), steps)
           for p in (0, 1)]
    assert all(len(g) == steps and all(len(labels) == 2 for _, labels in g) for g in got)
    # Each worker names a bad image once; past the epoch's end the other may meet it too.
    assert {image for image, _ in bad} == {str(path) for path in broken}
    assert all(reason == "cannot be decoded as JPEG or PNG" for _, reason in bad)


def test_bad_images_fail_the_run_when_asked_and_name_the_file(folder, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder.root, root)
    (root / "train" / "3" / "garbage.png").write_bytes(b"junk")
    splits = splits_of(root, bad_images="fail")

    def fail(image, reason):
        raise DataError(f"bad image {image}: {reason}")

    with pytest.raises(Exception, match=f"bad image {root}/train/3/garbage.png"):
        for p in (0, 1):
            batches(splits.training(context(p), settings(on_bad=fail, steps_per_epoch=6)), 12)


def test_evaluation_is_a_centre_crop_of_every_val_image_once(folder):
    splits = splits_of(folder.root)
    test, finish = splits.test(settings())
    got = list(test)
    finish()
    labels = np.concatenate([y.numpy() for _, y in got])
    assert sorted(labels.tolist()) == sorted(label for _, label in folder.files["val"])
    again = np.concatenate([x.numpy() for x, _ in splits.test(settings())[0]])
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in got]), again)  # no randomness
    halves = [np.concatenate([x for x, _ in batches(splits.validation(context(p), settings()), 3)]) for p in (0, 1)]
    assert not fingerprints(halves[0]) & fingerprints(halves[1])


def test_predict_feeds_the_model_what_evaluation_fed_it(folder):
    """`predict` on a run trained on image files prepares each image as the test split did."""
    from job.predict import _read_image

    splits = splits_of(folder.root)
    evaluated = np.concatenate([x.numpy() for x, _ in splits.test(settings())[0]])
    predicted = np.stack([_read_image(str(folder.root / path), SHAPE, crop=True).numpy()
                          for path, _ in folder.files["val"]])
    assert predicted.shape == evaluated.shape
    distances = np.abs(predicted[:, None] - evaluated[None]).max(axis=(2, 3, 4))  # predicted x evaluated
    assert (distances.min(axis=1) < 1e-6).all() and len(set(distances.argmin(axis=1))) == len(predicted)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    from job.data import pack
    destination = tmp_path_factory.mktemp("packed")
    pack.pack(str(folder.root), str(destination), shards=4, val_shards=1, seed=0)
    return destination


def test_tfrecord_workers_read_disjoint_shards_and_resume_exactly(packed):
    splits = load(Config(dataset="tfrecord", data=str(packed), workers=2, batch_size=4, augment=False).validate())
    shares = []
    for pipeline in (0, 1):  # 2 shards of 6 records each: 6 steps of 2 is one pass over them
        training = splits.training(context(pipeline), settings(augment=False, steps_per_epoch=6))
        assert training.cardinality() == tf.data.INFINITE_CARDINALITY
        got = batches(training, 6)
        shares.append(fingerprints(np.concatenate([images for images, _ in got])))
    assert len(shares[0]) == len(shares[1]) == 12 and not shares[0] & shares[1]
    whole = batches(splits.training(context(0), settings(steps_per_epoch=6)), 9)
    resumed = batches(splits.training(context(0), settings(steps_per_epoch=6), first_epoch=1, skip_steps=2), 1)
    np.testing.assert_array_equal(resumed[0][0], whole[8][0])


def test_fewer_val_shards_than_workers_still_feed_every_worker(packed):
    splits = load(Config(dataset="tfrecord", data=str(packed), workers=2, batch_size=4).validate())
    assert len(splits.dataset.files["val"]) == 1
    halves = [np.concatenate([x for x, _ in batches(splits.validation(context(p), settings()), 3)]) for p in (0, 1)]
    assert len(fingerprints(halves[0])) == len(fingerprints(halves[1])) == 6
    assert not fingerprints(halves[0]) & fingerprints(halves[1])


@pytest.mark.parametrize("layout", ["imagefolder", "tfrecord"])
def test_a_resumed_stream_passes_the_bad_images_skipped_before_without_counting_them(folder, tmp_path, layout):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder.root, root)
    for path, _ in folder.files["train"][::6]:  # 4 of the 24 training images cannot be decoded
        (root / path).write_bytes(b"not an image")
    if layout == "tfrecord":
        from job.data import pack
        pack.pack(str(root), str(tmp_path / "packed"), shards=4, val_shards=1, seed=0)
        root = tmp_path / "packed"
    splits = load(Config(dataset=layout, data=str(root), workers=2, batch_size=4).validate())
    bad = []
    whole = batches(splits.training(context(0), settings(bad)), 5)
    # What the worker gets from the run's records when it resumes: the images skipped so far.
    skipped = frozenset(image for image, _ in bad)
    resumed = batches(splits.training(context(0), settings(skipped_before=skipped), first_epoch=1, skip_steps=1), 1)
    np.testing.assert_array_equal(resumed[0][0], whole[4][0])
    np.testing.assert_array_equal(resumed[0][1], whole[4][1])
    # Counting the skipped images as trained would start early, by as many as were skipped.
    early = batches(splits.training(context(0), settings(), first_epoch=1, skip_steps=1), 1)
    assert not np.array_equal(early[0][0], whole[4][0])
