"""Datasets, loaded or listed and validated by the driver before Ray starts.

Small datasets (mnist, synthetic) are `Splits`: numpy arrays the driver loads and hands to the
workers, which `job.data.pipeline` shards and augments. Image datasets kept as files
(imagefolder, tfrecord) are `FileSplits`: only the listing travels; each worker reads its own
files through `job.data.image_pipeline`. Both answer the same questions for the training loop
(`training`, `validation`, `test`), and this package's driver side imports no TensorFlow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from job.config import FILE_DATASETS
from job.errors import DataError


@dataclass
class Splits:
    """Images are uint8 (N, H, W, C); labels int32 class indices."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    location: str
    fingerprint: str  # sha256 over the source files (or the generator's parameters)
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.counts = {"train": len(self.train_labels), "validation": len(self.val_labels),
                       "test": len(self.test_labels)}

    def training(self, context, settings: InputSettings, *, first_epoch: int = 0, skip_steps: int = 0):
        from job.data import pipeline
        return pipeline.training(
            self.train_images, self.train_labels, context, global_batch=settings.global_batch,
            steps_per_epoch=settings.steps_per_epoch, seed=settings.seed,
            augment=settings.augment, input_shape=settings.input_shape, cpus=settings.cpus,
            first_epoch=first_epoch, skip_steps=skip_steps)

    def validation(self, context, settings: InputSettings):
        from job.data import pipeline
        return pipeline.evaluation(self.val_images, self.val_labels, context, global_batch=settings.global_batch,
                                   input_shape=settings.input_shape, cpus=settings.cpus)

    def test(self, settings: InputSettings):
        """(the test set once, in batches, for one process; a callable to run after reading it)."""
        from job.data import pipeline
        dataset = pipeline.tf.data.Dataset.from_tensor_slices((self.test_images, self.test_labels)).batch(256)
        return dataset.map(lambda x, y: (pipeline.to_model_input(x, settings.input_shape), y)), lambda: None


@dataclass
class FileSplits:
    """An image dataset kept as files (see job.data.sources), and how the workers read it."""

    dataset: object  # sources.FileDataset
    readahead: int
    cache_dir: str | None
    color_jitter: float

    # What the training loop asks of any dataset; the val split serves validation and test.
    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def location(self) -> str:
        return self.dataset.root

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    @property
    def counts(self) -> dict:
        return {"train": self.dataset.counts["train"], "validation": self.dataset.counts["val"],
                "test": self.dataset.counts["val"]}

    def training(self, context, settings: InputSettings, *, first_epoch: int = 0, skip_steps: int = 0):
        from job.data import image_pipeline
        return image_pipeline.training(self, context, settings, first_epoch=first_epoch, skip_steps=skip_steps)

    def validation(self, context, settings: InputSettings):
        from job.data import image_pipeline
        return image_pipeline.evaluation(self, context, settings)

    def test(self, settings: InputSettings):
        from job.data import image_pipeline
        dataset, bad_images = image_pipeline.test(self, settings)
        return dataset, bad_images.finish


@dataclass
class InputSettings:
    """What a worker's input pipeline needs from the run's config."""

    global_batch: int
    steps_per_epoch: int
    seed: int
    augment: bool
    input_shape: tuple
    cpus: int
    on_bad: Callable[[str, str], None]  # (image, reason): report it, or raise to fail the run
    # Images an earlier attempt of the run skipped as bad, as on_bad named them: a resumed
    # stream passes them without counting them, as the uninterrupted one dropped them.
    skipped_before: frozenset = frozenset()


def load(config) -> Splits | FileSplits:
    """The dataset named by `config.dataset`, limited and split as the config says."""
    if config.dataset in FILE_DATASETS:
        return _list_files(config)
    if config.dataset == "mnist":
        from job.data import mnist
        (train_x, train_y), (test_x, test_y), location, fingerprint = mnist.load(config.data)
        class_names = [str(digit) for digit in range(10)]
    else:
        from job.data import synthetic
        (train_x, train_y), (test_x, test_y), location, fingerprint = synthetic.load(config)
        class_names = [f"class-{i}" for i in range(synthetic.num_classes(config))]
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    if config.test_limit:
        test_x, test_y = test_x[:config.test_limit], test_y[:config.test_limit]
    # The validation set is the tail of the (limited) training set, so it never overlaps it.
    held_out = int(round(len(train_y) * config.validation_fraction))
    split = len(train_y) - held_out
    splits = Splits(train_x[:split], train_y[:split], train_x[split:], train_y[split:],
                    test_x, test_y, class_names, location, fingerprint)
    _check_sizes(splits, config)
    return splits


def _list_files(config) -> FileSplits:
    from job.data import sources
    listed = (sources.list_tfrecord if config.dataset == "tfrecord" else sources.list_imagefolder)(config.data)
    if config.data_cache and listed.root.startswith("s3://") and not config.address:
        sources.check_cache_dir(config.data_cache)  # the workers share this machine: say it before Ray
    splits = FileSplits(listed, config.readahead, config.data_cache, config.color_jitter)
    _check_sizes(splits, config)
    shards = len(listed.files["train"])
    if listed.layout == "tfrecord" and shards < config.workers:
        raise DataError(f"{config.data} has {shards} training shards for {config.workers} workers, and each "
                        "worker reads whole shards; pack it with --shards of at least the number of workers")
    return splits


def _check_sizes(splits: Splits | FileSplits, config) -> None:
    batch = config.batch_size
    if splits.counts["train"] < batch:
        raise DataError(f"only {splits.counts['train']} training examples for a global batch of {batch}; "
                        "raise --train-limit or lower --batch-size")
    if config.steps_per_epoch and config.steps_per_epoch * batch > splits.counts["train"]:
        raise DataError(f"steps_per_epoch {config.steps_per_epoch} x batch {batch} needs "
                        f"{config.steps_per_epoch * batch} examples but there are {splits.counts['train']}")
    if 0 < splits.counts["validation"] < batch:
        raise DataError(f"only {splits.counts['validation']} validation examples for a global batch of "
                        f"{batch}; raise --validation-fraction or --train-limit, or set it to 0")
    if splits.counts["test"] == 0:
        raise DataError("the test set is empty; --test-limit must be positive")


def fingerprint(blobs: list[bytes]) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return "sha256:" + digest.hexdigest()
