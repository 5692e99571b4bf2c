"""tf.data input for one training worker: sharded, batched, augmented, prefetched.

Sharding: every worker draws the same global permutation of the training set for an epoch
(seeded by seed and epoch) and takes every P-th index from position p, where P is the number of
input pipelines (workers) and p this worker's. Shards of one epoch are therefore disjoint, and
the data differs between epochs. Each pipeline yields exactly steps x local replicas batches an
epoch and never ends, so no worker runs out early and hangs the collectives.
"""

from __future__ import annotations

import math

import numpy as np

from job import tfenv

tf, _ = tfenv.tensorflow()

# The tutorial's ImageDataGenerator settings (Keras semantics: rotation and shear in degrees,
# shifts and zoom as fractions of the image size).
AUGMENTATION = {"rotation": 8.0, "width_shift": 0.08, "height_shift": 0.08, "shear": 0.3, "zoom": 0.08}


def epoch_indices(num_examples: int, *, epoch: int, seed: int, pipeline: int, pipelines: int,
                  count: int) -> np.ndarray:
    """The first `count` indices of this pipeline's shard of `epoch`'s global permutation."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    shard = permutation[pipeline::pipelines]
    if len(shard) < count:
        raise ValueError(f"shard of {len(shard)} examples cannot fill {count}")
    return shard[:count]


def training(images, labels, context, *, global_batch: int, steps_per_epoch: int, seed: int, augment: bool,
             input_shape, cpus: int, first_epoch: int = 0, skip_steps: int = 0):
    """Batches of (images float32 in [0, 1], labels) for this worker, from epoch first_epoch on.

    Endless, like every training input here: training reads the steps it needs. Of an input that
    may end, MultiWorkerMirroredStrategy asks before every step of a multi-worker run whether
    each worker still has data (one more all-reduce a step); of an infinite one it does not.
    `skip_steps` drops the first steps of `first_epoch` (done before a mid-epoch checkpoint), so
    a resumed run sees exactly the batches the uninterrupted run would have seen.
    """
    per_replica = context.get_per_replica_batch_size(global_batch)
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
    per_epoch = steps_per_epoch * local_replicas * per_replica

    def shard_of(epoch):
        return epoch_indices(len(labels), epoch=int(epoch), seed=seed, pipeline=context.input_pipeline_id,
                             pipelines=context.num_input_pipelines, count=per_epoch).astype(np.int64)

    epochs = tf.data.Dataset.counter(first_epoch).map(
        lambda epoch: tf.ensure_shape(tf.numpy_function(shard_of, [epoch], tf.int64), [per_epoch]))
    dataset = epochs.unbatch().skip(skip_steps * local_replicas * per_replica)
    dataset = dataset.batch(per_replica, drop_remainder=True).enumerate()
    images, labels = tf.constant(images), tf.constant(labels)
    # The augmentation's randomness is a pure function of (seed, pipeline, batch number), so a
    # run is reproducible and a resumed run draws what the uninterrupted one would have.
    base_seed = tf.constant([seed, context.input_pipeline_id], tf.int64)
    first_batch = (first_epoch * steps_per_epoch + skip_steps) * local_replicas

    def load_batch(number, batch_indices):
        batch = to_model_input(tf.gather(images, batch_indices), input_shape)
        if augment:
            batch = random_affine(batch, seed=base_seed + [0, 1_000_003 * (number + first_batch)])
        return batch, tf.gather(labels, batch_indices)

    dataset = dataset.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return finish(dataset, cpus)


def evaluation(images, labels, context, *, global_batch: int, input_shape, cpus: int):
    """Unaugmented, repeated batches of this worker's contiguous share of a held-out split."""
    per_replica = context.get_per_replica_batch_size(global_batch)
    steps = len(labels) // global_batch
    local = steps * global_batch // context.num_input_pipelines
    start = context.input_pipeline_id * local
    dataset = tf.data.Dataset.from_tensor_slices((images[start:start + local], labels[start:start + local]))
    dataset = dataset.batch(per_replica, drop_remainder=True)
    dataset = dataset.map(lambda x, y: (to_model_input(x, input_shape), y),
                          num_parallel_calls=tf.data.AUTOTUNE).cache().repeat()
    return finish(dataset, cpus)


def endless(stream):
    """A dataset read from an endless generator, declared infinite to tf.data (see training)."""
    return stream.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))


def finish(dataset, cpus: int):
    options = tf.data.Options()
    # Sharding is done above; Keras must not shard (or rebatch) a second time.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.threading.private_threadpool_size = max(1, cpus)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def to_model_input(images, input_shape):
    """uint8 (B, H, W, C) -> float32 in [0, 1], resized and with channels as the model expects."""
    height, width, channels = input_shape
    images = tf.cast(images, tf.float32) / 255.0
    if images.shape[-1] == 1 and channels == 3:
        images = tf.image.grayscale_to_rgb(images)
    elif images.shape[-1] == 3 and channels == 1:
        images = tf.image.rgb_to_grayscale(images)
    if tuple(images.shape[1:3]) != (height, width):
        images = tf.image.resize(images, (height, width))
    return images


def random_affine(images, seed):
    """The tutorial's augmentation, one random affine transform per image of a batch.

    Composes rotation, shift, shear and zoom about the image centre as ImageDataGenerator does
    (fill mode 'nearest'), as a single projective transform: one op per batch, no scipy.
    """
    batch = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 6)

    def uniform(i, limit, center=0.0):
        return tf.random.stateless_uniform([batch], seeds[i], center - limit, center + limit)

    theta = uniform(0, AUGMENTATION["rotation"] * math.pi / 180)
    shear = uniform(1, AUGMENTATION["shear"] * math.pi / 180)
    zoom_x = uniform(2, AUGMENTATION["zoom"], 1.0)
    zoom_y = uniform(3, AUGMENTATION["zoom"], 1.0)
    shift_x = uniform(4, AUGMENTATION["width_shift"]) * width
    shift_y = uniform(5, AUGMENTATION["height_shift"]) * height
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Output -> input mapping M = rotate . shift . shear . zoom, conjugated by the centre.
    a0 = cos * zoom_x
    a1 = (-cos * tf.sin(shear) - sin * tf.cos(shear)) * zoom_y
    b0 = sin * zoom_x
    b1 = (-sin * tf.sin(shear) + cos * tf.cos(shear)) * zoom_y
    a2 = cos * shift_x - sin * shift_y
    b2 = sin * shift_x + cos * shift_y
    center_x, center_y = (width - 1) / 2, (height - 1) / 2
    a2 = a2 + center_x - a0 * center_x - a1 * center_y
    b2 = b2 + center_y - b0 * center_x - b1 * center_y
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")
