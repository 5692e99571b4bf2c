"""MNIST loading, corruption handling, sharding and augmentation."""

import gzip
import shutil

import numpy as np
import pytest

from job import config as configuration
from job import data
from job.data import mnist, pipeline
from job.errors import DataError

tf = pipeline.tf


def test_keras_npz_loads_the_same_arrays(mnist_dir, tmp_path):
    (train_x, train_y), (test_x, test_y), _, _ = mnist.load(str(mnist_dir))
    np.savez(tmp_path / "mnist.npz", x_train=train_x[..., 0], y_train=train_y, x_test=test_x[..., 0], y_test=test_y)
    (x, y), (tx, ty), _, _ = mnist.load(str(tmp_path / "mnist.npz"))
    assert np.array_equal(x, train_x) and np.array_equal(ty, test_y)


def copy_mnist(mnist_dir, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "MNIST file not found: .*t10k-labels-idx1-ubyte.gz; --data must point at"),
    (lambda p: p.write_bytes(b"\x1f\x8bnot really gzip"), "is corrupt \\(not a valid gzip stream\\)"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "is truncated or corrupt"),
    (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20)), "is not an IDX label file"),
])
def test_missing_or_corrupt_files_are_named(mnist_dir, tmp_path, damage, message):
    folder = copy_mnist(mnist_dir, tmp_path)
    damage(folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=message):
        mnist.load(str(folder))


def test_npz_without_the_keras_arrays_is_rejected(tmp_path):
    np.savez(tmp_path / "mnist.npz", images=np.zeros(3))
    with pytest.raises(DataError, match="lacks array 'x_train'"):
        mnist.load(str(tmp_path / "mnist.npz"))


def test_limits_and_validation_split_do_not_overlap(mnist_dir):
    config = configuration.Config(data=str(mnist_dir), train_limit=1000, test_limit=300, validation_fraction=0.2,
                                  batch_size=64)
    splits = data.load(config)
    assert splits.counts == {"train": 800, "validation": 200, "test": 300}
    full = mnist.load(str(mnist_dir))[0][0]
    assert np.array_equal(splits.val_images, full[800:1000])


def test_too_little_data_for_a_batch_is_a_clear_error(mnist_dir):
    with pytest.raises(DataError, match="only 90 training examples for a global batch of 128"):
        data.load(configuration.Config(data=str(mnist_dir), train_limit=100, batch_size=128))


def test_synthetic_data_has_the_models_shape():
    splits = data.load(configuration.Config(model="alexnet", dataset="synthetic", synthetic_examples=64,
                                            batch_size=8, validation_fraction=0))
    assert splits.train_images.shape == (64, 224, 224, 3) and len(splits.class_names) == 1000


def collect(dataset, batches):
    return np.concatenate([labels.numpy() for _, labels in dataset.take(batches)])


def first(dataset, batches):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(batches)]


@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (2, 4), (1, 2)])
def test_shards_of_an_epoch_are_disjoint_and_fill_every_step(pipelines, replicas):
    examples, global_batch, steps, epochs = 203, 8, 25, 2
    images = np.zeros((examples, 4, 4, 1), np.uint8)
    ids = np.arange(examples, dtype=np.int32)  # the label is the example's index
    seen = {epoch: [] for epoch in range(epochs)}
    per_pipeline_epoch = steps * global_batch // pipelines
    for pipeline_id in range(pipelines):
        context = tf.distribute.InputContext(pipelines, pipeline_id, replicas)
        dataset = pipeline.training(images, ids, context, global_batch=global_batch, steps_per_epoch=steps,
                                    seed=3, augment=False, input_shape=(4, 4, 1), cpus=1)
        # Endless, so that no worker ever runs out, and declared so: MultiWorkerMirroredStrategy
        # then skips its per-step "has every worker data left?" all-reduce.
        assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
        local_replicas = replicas // pipelines
        labels = collect(dataset, epochs * steps * local_replicas)
        assert len(labels) == epochs * per_pipeline_epoch
        for epoch in range(epochs):
            seen[epoch].append(set(labels[epoch * per_pipeline_epoch:(epoch + 1) * per_pipeline_epoch]))
    for epoch in range(epochs):
        union = set().union(*seen[epoch])
        assert len(union) == sum(len(s) for s in seen[epoch]) == steps * global_batch  # no example twice
    assert seen[0] != seen[1]  # reshuffled between epochs


def test_resuming_at_an_epoch_yields_what_the_full_run_would():
    images = np.arange(64 * 16, dtype=np.uint8).reshape(64, 4, 4, 1)
    labels = np.arange(64, dtype=np.int32)
    context = tf.distribute.InputContext(1, 0, 1)
    common = dict(global_batch=4, steps_per_epoch=8, seed=1, augment=True, input_shape=(4, 4, 1), cpus=1)
    full = first(pipeline.training(images, labels, context, **common), 24)
    resumed = first(pipeline.training(images, labels, context, first_epoch=2, **common), 8)
    for (x1, y1), (x2, y2) in zip(full[16:], resumed, strict=True):
        assert np.array_equal(y1, y2) and np.allclose(x1, x2)


def test_evaluation_shards_are_disjoint():
    labels = np.arange(100, dtype=np.int32)
    images = np.zeros((100, 2, 2, 1), np.uint8)
    parts = [collect(pipeline.evaluation(images, labels, tf.distribute.InputContext(2, i, 2), global_batch=10,
                                         input_shape=(2, 2, 1), cpus=1), 10 // 2 * 1)
             for i in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(set(parts[0]) | set(parts[1])) == 50


def test_augmentation_is_the_identity_when_every_range_is_zero(monkeypatch):
    monkeypatch.setattr(pipeline, "AUGMENTATION", dict.fromkeys(pipeline.AUGMENTATION, 0.0))
    images = tf.random.stateless_uniform((4, 28, 28, 1), seed=[1, 2])
    out = pipeline.random_affine(images, tf.constant([5, 6], tf.int64))
    assert np.allclose(out.numpy(), images.numpy(), atol=1e-5)


def test_augmentation_moves_digits_only_slightly_and_reproducibly(mnist_dir):
    (train_x, _), _, _, _ = mnist.load(str(mnist_dir))
    images = pipeline.to_model_input(train_x[:64], (28, 28, 1))
    seed = tf.constant([0, 7], tf.int64)
    first, again = pipeline.random_affine(images, seed), pipeline.random_affine(images, seed)
    assert np.array_equal(first.numpy(), again.numpy())
    assert not np.array_equal(first.numpy(), pipeline.random_affine(images, seed + 1).numpy())
    # Within the tutorial's ranges a digit stays mostly where it was: the centre of mass moves
    # by a couple of pixels (8% of 28 = 2.2 px shift plus rotation/zoom), never across the image.
    def centre(batch):
        grid = np.arange(28)
        mass = batch[..., 0].sum(axis=(1, 2))
        return np.stack([(batch[..., 0].sum(axis=2) * grid).sum(1) / mass,
                         (batch[..., 0].sum(axis=1) * grid).sum(1) / mass], 1)
    moved = np.abs(centre(first.numpy()) - centre(images.numpy()))
    assert moved.max() < 4.0 and moved.mean() > 0.3


def test_model_input_conversion_resizes_and_converts_channels():
    gray = np.full((2, 28, 28, 1), 255, np.uint8)
    rgb = pipeline.to_model_input(gray, (56, 56, 3))
    assert rgb.shape == (2, 56, 56, 3) and np.allclose(rgb.numpy(), 1.0)
    back = pipeline.to_model_input(np.zeros((1, 10, 10, 3), np.uint8), (28, 28, 1))
    assert back.shape == (1, 28, 28, 1)


def test_resuming_mid_epoch_yields_the_rest_of_that_epoch_exactly():
    images = np.arange(64 * 16, dtype=np.uint8).reshape(64, 4, 4, 1)
    labels = np.arange(64, dtype=np.int32)
    context = tf.distribute.InputContext(2, 1, 4)  # 2 workers x 2 local replicas
    common = dict(global_batch=8, steps_per_epoch=6, seed=4, augment=True, input_shape=(4, 4, 1), cpus=1)
    full = first(pipeline.training(images, labels, context, **common), 24)
    rest = first(pipeline.training(images, labels, context, first_epoch=1, skip_steps=2, **common), 8)
    # one step = 2 local replicas' batches; epoch 1 starts at batch 12, its step 2 at batch 16
    for (x1, y1), (x2, y2) in zip(full[16:], rest, strict=True):
        assert np.array_equal(y1, y2) and np.allclose(x1, x2)


def test_a_failed_download_says_what_went_wrong(monkeypatch):
    from job import tfenv
    _, keras = tfenv.tensorflow()

    def unreachable():
        raise Exception("URL fetch failure on https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz: "
                        "None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", unreachable)
    with pytest.raises(DataError, match=r"^could not download MNIST through Keras: URL fetch failure on https://\S+: "
                                        r"None -- \[Errno -3\] Temporary failure in name resolution; pass --data"):
        mnist.load(None)
