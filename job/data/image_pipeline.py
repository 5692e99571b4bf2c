"""tf.data input for image files (imagefolder or TFRecord shards) in one training worker.

Sharding is by file: in each pass every worker draws the same permutation of the split's files
(images, or whole shards) and takes every P-th one from position p, so each worker reads only
its own share, straight from the store, and never the whole dataset. A `sources.Reader` fetches
ahead on threads; decoding, AlexNet's augmentation (short side to 256, random 224 crop,
horizontal flip, optional colour jitter) and scaling to [0, 1] run in parallel tf.data maps.

Every element carries its position in the worker's stream (`seq`): it seeds the augmentation
(a resumed run draws what the uninterrupted one would have) and names bad data. An image that
cannot be read or decoded is dropped by `ignore_errors`, and `BadImages` notices the gap in the
positions after batching and names the file. Training streams are endless and cut to the steps
the run needs, so a dropped image never leaves one worker a batch short (which would hang the
collectives).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from job import tfenv
from job.data import pipeline, sources
from job.errors import DataError

tf, _ = tfenv.tensorflow()

# AlexNet's preprocessing: the short side scaled to 256 for a 224 crop (kept in proportion for
# other input sizes).
RESIZE_RATIO = 256 / 224
# Colour jitter at strength 1: brightness +-0.4, contrast and saturation x[0.6, 1.4].
JITTER = 0.4
SHARDS_AHEAD = 2  # whole TFRecord shards fetched ahead (each is usually 100-200 MB)
GENERATOR_CHUNK = 16  # stream elements handed from Python to tf.data per call


class BadImages:
    """Tracks which positions of a stream came through; the missing ones were bad data.

    `report(where, reason)` prints and records a bad image, or raises to fail the run; it is
    called once per image, however many passes meet it again.
    """

    def __init__(self, report, start: int = 0):
        self.report = report
        self.expected = start
        self.pending: dict[int, tuple[str, str]] = {}  # seq -> (where, reason if already known)
        self.reported: set[str] = set()
        self.lock = threading.Lock()

    def note(self, seq: int, where: str, reason: str = "cannot be decoded as JPEG or PNG") -> None:
        with self.lock:
            self.pending[seq] = (where, reason)

    def seen(self, seqs) -> bool:
        """Called with each batch's positions, in order: report every position skipped."""
        for seq in np.asarray(seqs).tolist():
            self._drop_until(seq)
            self.expected = seq + 1
        return True

    def finish(self) -> None:
        """For a finite stream read to its end: whatever never came through was bad."""
        self._drop_until(float("inf"))

    def _drop_until(self, seq) -> None:
        with self.lock:
            missing = sorted(s for s in self.pending if s < seq and s >= self.expected)
            done = [s for s in self.pending if s <= seq]
            bad = [self.pending[s] for s in missing]
            for s in done:
                del self.pending[s]
        for where, reason in bad:
            if where not in self.reported:
                self.reported.add(where)
                self.report(where, reason)


# ----------------------------------------------------------------------------- streams

def _imagefolder_stream(files, reader, bad, *, passes, order, start=0):
    """(seq, bytes, label) of files[i] for i in order(pass), pass after pass, from position start."""
    def items():
        position = 0
        for pass_number in passes:
            indices = order(pass_number)
            if not len(indices):
                return
            skip = min(len(indices), max(0, start - position))  # whole passes cost no reads
            for seq, i in enumerate(indices[skip:], start=position + skip):
                yield files[i][0], (seq, files[i][1])
            position += len(indices)

    for path, (seq, label), data in reader.read_ahead(items()):
        where = f"{reader.root.rstrip('/')}/{path}"
        if isinstance(data, str):  # unreadable: an empty image fails to decode and is skipped
            bad.note(seq, where, data)
            data = b""
        else:
            bad.note(seq, where)
        yield seq, data, label


def _tfrecord_stream(shards, reader, bad, *, passes, order, seed, start=0, stride=(0, 1)):
    """(seq, serialized Example, -1) of the shards order(pass) picks, pass after pass, from
    position start; whole shards before it are skipped by their recorded sizes, unread. With
    stride (k, n), only the records at positions k, k+n, k+2n, ..."""
    def items():
        position = 0
        for pass_number in passes:
            picked = order(pass_number)
            if not len(picked):
                return
            for i in picked:
                path, examples = shards[i]
                if position + examples > start:
                    yield path, (position, pass_number, i)
                position += examples

    for path, (position, pass_number, shard), data in reader.read_ahead(items()):
        where = f"{reader.root.rstrip('/')}/{path}"
        if isinstance(data, str):
            raise DataError(f"TFRecord shard {where} {data}")
        records = list(sources.tfrecord_records(data, where))
        if len(records) != shards[shard][1]:
            raise DataError(f"TFRecord shard {where} has {len(records)} records, but "
                            f"{sources.DATASET_FILE} says {shards[shard][1]}; pack the dataset again")
        # A shard's records in a fresh order every pass (packing fixed one order per shard).
        shuffled = np.random.default_rng([seed, pass_number, shard]).permutation(len(records))
        for seq, r in enumerate(shuffled[max(0, start - position):], start=max(position, start)):
            if seq % stride[1] == stride[0]:
                bad.note(seq, f"{where} record {r}")
                yield seq, records[r], -1


def _dataset(generator):
    """The stream's (seq, bytes, label) as a dataset. tf.data calls into Python for every element
    the generator yields, at about the same cost however much the element carries, so the stream
    is handed over in chunks (a fifth less CPU per image than one element per call)."""
    def chunks():
        stream = generator()
        while chunk := list(itertools.islice(stream, GENERATOR_CHUNK)):
            seqs, data, labels = zip(*chunk)
            yield np.array(seqs, np.int64), np.array(data, object), np.array(labels, np.int32)

    return tf.data.Dataset.from_generator(chunks, output_signature=(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32))).unbatch()


def _parse(layout, data, label):
    if layout == "tfrecord":
        features = tf.io.parse_single_example(data, {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64)})
        return features["image/encoded"], tf.cast(features["image/class/label"], tf.int32)
    return data, label


# ----------------------------------------------------------------------------- images

def decode(data, channels: int):
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def resize_short_side(image, size: int):
    """Scaled (float32, 0-255) so that its shorter side is `size` pixels."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.cast(tf.math.ceil(shape * (size / tf.reduce_min(shape))), tf.int32)
    return tf.image.resize(image, tf.maximum(scaled, size))


def evaluation_image(image, input_shape):
    """uint8 (H, W, C) of any size -> the model's input: short side resized, centre crop, [0, 1]."""
    height, width, channels = input_shape
    image = resize_short_side(image, round(max(height, width) * RESIZE_RATIO))
    shape = tf.shape(image)
    image = tf.image.crop_to_bounding_box(image, (shape[0] - height) // 2, (shape[1] - width) // 2, height, width)
    return tf.ensure_shape(image / 255.0, [height, width, channels])


def training_image(image, input_shape, seed, *, augment: bool, color_jitter: float):
    """uint8 (H, W, C) -> a random crop of the resized image, flipped and jittered, in [0, 1]."""
    if not augment:
        return evaluation_image(image, input_shape)
    height, width, channels = input_shape
    seeds = tf.random.experimental.stateless_split(seed, 5)
    image = resize_short_side(image, round(max(height, width) * RESIZE_RATIO)) / 255.0
    image = tf.image.stateless_random_crop(image, [height, width, channels], seeds[0])
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if color_jitter:
        strength = JITTER * color_jitter
        image = tf.image.stateless_random_brightness(image, strength, seeds[2])
        image = tf.image.stateless_random_contrast(image, 1 - strength, 1 + strength, seeds[3])
        if channels == 3:
            image = tf.image.stateless_random_saturation(image, 1 - strength, 1 + strength, seeds[4])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, channels])


def _batched(dataset, layout, prepare, channels, bad, batch_size, *, drop_remainder, cpus):
    """Decode and prepare in parallel, drop bad data, batch, and report what was dropped."""
    def load(seq, data, label):
        encoded, label = _parse(layout, data, label)
        return prepare(decode(encoded, channels), seq), label, seq

    # Each element in a dataset of its own, so `ignore_errors` drops a bad image and nothing
    # else: an error of the reader itself still fails the run. Deterministic interleaving of
    # one-element datasets keeps the stream's order.
    dataset = dataset.interleave(
        lambda seq, data, label: tf.data.Dataset.from_tensors((seq, data, label)).map(load).ignore_errors(),
        cycle_length=max(2, cpus), block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)

    def checked(images, labels, seqs):
        done = tf.py_function(bad.seen, [seqs], tf.bool)
        with tf.control_dependencies([done]):
            return tf.identity(images), tf.identity(labels)

    return pipeline.finish(dataset.map(checked), cpus)


# ----------------------------------------------------------------------------- the inputs

def training(data, context, settings, *, first_epoch: int = 0, skip_steps: int = 0):
    """This worker's batches for epochs first_epoch.., skip_steps into the first, endless."""
    files = data.dataset.files["train"]
    per_replica = context.get_per_replica_batch_size(settings.global_batch)
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
    per_epoch = settings.steps_per_epoch * local_replicas * per_replica
    trained = (first_epoch * settings.steps_per_epoch + skip_steps) * local_replicas * per_replica
    pipeline_id, pipelines = context.input_pipeline_id, context.num_input_pipelines

    def shuffled(pass_number):
        return np.random.default_rng([settings.seed, pass_number]).permutation(len(files))[pipeline_id::pipelines]

    # An imagefolder pass is one epoch of exactly per_epoch images.
    order = shuffled if data.dataset.layout == "tfrecord" else lambda p: shuffled(p)[:per_epoch]
    reader = _reader(data)
    start = _position_after(trained, files, order, data.dataset.layout, reader.root, settings)
    bad = BadImages(settings.on_bad, start)
    if data.dataset.layout == "tfrecord":
        def stream():
            return _tfrecord_stream(files, reader, bad, passes=itertools.count(), order=order,
                                    seed=settings.seed, start=start)
    else:
        def stream():
            return _imagefolder_stream(files, reader, bad, passes=itertools.count(), order=order, start=start)

    base_seed = tf.constant(settings.seed * 1_000_003 + pipeline_id, tf.int64)

    def prepare(image, seq):
        return training_image(image, settings.input_shape, tf.stack([base_seed, seq]),
                              augment=settings.augment, color_jitter=data.color_jitter)

    return pipeline.endless(_batched(_dataset(stream), data.dataset.layout, prepare, settings.input_shape[2], bad,
                                     per_replica, drop_remainder=True, cpus=settings.cpus))


def _position_after(trained, files, order, layout, root, settings) -> int:
    """The stream position that follows `trained` training images: where the uninterrupted run
    went on, past the bad images it dropped on the way (named in settings.skipped_before, in the
    words BadImages reported them). Counted from the listing and the orders, reading nothing."""
    if not settings.skipped_before:
        return trained
    root = root.rstrip("/")
    skipped_files = [i for i, (path, _) in enumerate(files) if f"{root}/{path}" in settings.skipped_before]

    def skipped_records(i):  # a TFRecord is named "<shard> record <n>"
        prefix = f"{root}/{files[i][0]} record "
        return [int(image[len(prefix):]) for image in settings.skipped_before if image.startswith(prefix)]

    position, left = 0, trained
    for pass_number in itertools.count():
        picked = order(pass_number)
        if not len(picked):
            return position
        if layout == "tfrecord":  # each shard's records in the order this pass reads them
            marks = [np.isin(np.random.default_rng([settings.seed, pass_number, i]).permutation(files[i][1]),
                             skipped_records(i)) for i in picked]
        else:
            marks = [np.isin(picked, skipped_files)]
        for bad in marks:
            good = len(bad) - int(bad.sum())
            if left <= good:  # the last image trained is in here
                return position + (int(np.searchsorted(np.cumsum(~bad), left)) + 1 if left else 0)
            position, left = position + len(bad), left - good


def evaluation(data, context, settings):
    """This worker's share of the val split, centre-cropped, endlessly repeated: every P-th
    file, or with fewer val shards than workers, every P-th record of all of them."""
    files = data.dataset.files["val"]
    pipeline_id, pipelines = context.input_pipeline_id, context.num_input_pipelines
    stride = (0, 1)
    if data.dataset.layout == "tfrecord" and len(files) < pipelines:
        mine, stride = list(range(len(files))), (pipeline_id, pipelines)
    else:
        mine = list(range(pipeline_id, len(files), pipelines))
    dataset, _ = _evaluation_input(data, mine, settings, context.get_per_replica_batch_size(settings.global_batch),
                                   endless=True, stride=stride)
    return dataset


def test(data, settings, batch_size: int = 64):
    """The whole val split once, centre-cropped, for the chief's final evaluation; and its
    BadImages, to `finish()` once the dataset has been read."""
    return _evaluation_input(data, list(range(len(data.dataset.files["val"]))), settings, batch_size,
                             endless=False)


def _evaluation_input(data, mine, settings, batch_size, *, endless, stride=(0, 1)):
    files = data.dataset.files["val"]
    passes = itertools.count if endless else lambda: range(1)
    bad = BadImages(settings.on_bad)
    reader = _reader(data)
    if data.dataset.layout == "tfrecord":
        def stream():
            return _tfrecord_stream(files, reader, bad, passes=passes(), order=lambda _: mine, seed=0, stride=stride)
    else:
        def stream():
            return _imagefolder_stream(files, reader, bad, passes=passes(), order=lambda _: mine)

    dataset = _batched(_dataset(stream), data.dataset.layout,
                       lambda image, seq: evaluation_image(image, settings.input_shape), settings.input_shape[2],
                       bad, batch_size, drop_remainder=endless, cpus=settings.cpus)
    return dataset, bad


def _reader(data):
    readahead = SHARDS_AHEAD if data.dataset.layout == "tfrecord" else data.readahead
    return sources.Reader(data.dataset.root, readahead=readahead, cache_dir=data.cache_dir)
