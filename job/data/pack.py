"""`alexnet-job dataset pack`: an imagefolder dataset into sharded TFRecord files.

SRC is listed and validated by `sources.list_imagefolder`; each split's files are put in a
seeded random order and cut into shards of (nearly) equal size, so every shard mixes classes
and training can hand whole shards to workers. Each record is a tf.train.Example with the
features of `sources.RECORD_LAYOUT`; the image bytes are copied as they are.

What DST holds, in the order it is written:

    DST/train-00000-of-00016.tfrecord ...   one file per shard (val-... likewise)
    DST/dataset.json                        written last: class names, shards and their record
                                            counts, source and its fingerprint

A DST without dataset.json is not a dataset: a failed pack deletes what it wrote, and
`--overwrite` deletes the old dataset (dataset.json first) before writing the new one. Shards
for S3 are written to a temporary folder and uploaded one by one while the next is written,
so local disk holds at most two shards.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from job import storage
from job.data import sources
from job.errors import DataError, UserError

FORMAT_VERSION = 1  # bump when dataset.json or the records change meaning
_SHARD_NAME = re.compile(r"(train|val)-\d{5}-of-\d{5}\.tfrecord")


@dataclass(frozen=True)
class Shard:
    split: str
    name: str  # the file's name under DST, e.g. train-00003-of-00016.tfrecord
    files: list[tuple[str, int]]  # (image path relative to SRC, label), in record order


@dataclass(frozen=True)
class PackResult:
    dst: str
    images: dict[str, int]  # per split
    shards: dict[str, int]  # per split
    bytes: int  # of all shards
    seconds: float

    @property
    def message(self) -> str:
        """One line for the command's output."""
        images, shards = sum(self.images.values()), sum(self.shards.values())
        return (f"packed {images} images ({self.images['train']} train, {self.images['val']} val) into {shards} "
                f"shards ({self.shards['train']} train, {self.shards['val']} val), {self.bytes / 1e6:.1f} MB, "
                f"in {self.seconds:.1f} s: {self.dst}")


def plan(dataset: sources.FileDataset, shards: int, val_shards: int | None, seed: int) -> list[Shard]:
    """Train shards, then val shards. Val gets `val_shards`, or as many as its share of the
    images (at least 1); each split is permuted with its own seeded generator."""
    import numpy as np

    if shards < 1:
        raise UserError(f"--shards must be at least 1, not {shards}")
    if val_shards is not None and val_shards < 1:
        raise UserError(f"--val-shards must be at least 1, not {val_shards}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, not {seed}")
    counts = {"train": shards,
              "val": val_shards or max(1, min(round(shards * dataset.counts["val"] / dataset.counts["train"]),
                                              dataset.counts["val"]))}
    planned = []
    for index, split in enumerate(sources.SPLITS):
        files, count = dataset.files[split], counts[split]
        if count > len(files):
            flag = "--shards" if split == "train" else "--val-shards"
            raise UserError(f"{flag} {count} is more than the {len(files)} {split} images in {dataset.root}: "
                            "every shard needs at least one image")
        order = np.random.default_rng([seed, index]).permutation(len(files))
        for number, part in enumerate(np.array_split(order, count)):
            planned.append(Shard(split, f"{split}-{number:05d}-of-{count:05d}.tfrecord",
                                 [files[i] for i in part]))
    return planned


def pack(src: str, dst: str, *, shards: int, val_shards: int | None = None, seed: int,
         overwrite: bool = False, show_progress: bool = False) -> PackResult:
    """Pack the imagefolder dataset at `src` into TFRecord shards and dataset.json at `dst`.
    Bad input raises a UserError before anything is written."""
    started = time.monotonic()
    src, dst = storage.parse_location(src).uri, storage.parse_location(dst).uri  # as dataset.json records them
    with storage.open_store(dst, patient=True) as store:
        old = store.read(sources.DATASET_FILE)
        if old is not None and not overwrite:
            raise UserError(f"{dst} already holds a packed dataset ({sources.DATASET_FILE}): "
                            "pass --overwrite to replace it, or choose another DST")
        dataset = sources.list_imagefolder(src)
        planned = plan(dataset, shards, val_shards, seed)
        store.check(create=True)
        if old is not None:
            _delete_dataset(store, old)
        description = {
            "format": "tfrecord",
            "version": FORMAT_VERSION,
            "class_names": dataset.class_names,
            "splits": {split: [{"path": shard.name, "examples": len(shard.files)}
                               for shard in planned if shard.split == split] for split in sources.SPLITS},
            "source": src,
            "source_fingerprint": dataset.fingerprint,
        }
        moved: list[str] = []  # shards in the store, deleted again if anything fails
        try:
            sizes = _write_shards(dataset, planned, store, dst, show_progress, moved)
            store.write(sources.DATASET_FILE, (json.dumps(description, indent=2) + "\n").encode())
        except BaseException:
            with contextlib.suppress(Exception):  # the first failure ends the clean-up (the store is likely down)
                for name in moved:
                    store.delete(name)
            raise
    packed = sources.list_tfrecord(dst)
    if packed.counts != dataset.counts:
        raise DataError(f"{dst} reads back with {packed.counts} records, not the {dataset.counts} packed")
    return PackResult(dst, dict(dataset.counts), {split: len(packed.files[split]) for split in sources.SPLITS},
                      sum(sizes), time.monotonic() - started)


def _delete_dataset(store: storage.Store, description: bytes) -> None:
    """An old packed dataset: dataset.json first (it stops being a dataset), then its shards."""
    store.delete(sources.DATASET_FILE)
    try:
        shards = [shard["path"] for split in json.loads(description)["splits"].values() for shard in split]
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # not ours to interpret: leave its files alone
    for name in shards:
        if isinstance(name, str) and _SHARD_NAME.fullmatch(name):  # never a path elsewhere
            store.delete(name)


def _write_shards(dataset, planned: list[Shard], store: storage.Store, dst: str, show_progress: bool,
                  moved: list[str]) -> list[int]:
    """Write every shard and move it into the store (uploading one while writing the next), naming
    each in `moved` as it goes there; returns their sizes."""
    from tqdm import tqdm

    from job import tfenv

    tf, _ = tfenv.tensorflow()
    # Local DST: written beside their final place, so moving them in is a rename.
    staging = tempfile.mkdtemp(prefix=".pack-", dir=dst) if not dst.startswith("s3://") else \
        tempfile.mkdtemp(prefix="alexnet-job-pack-")
    reader = sources.Reader(dataset.root)
    uploads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="upload")
    sizes, upload = [], None
    total = sum(len(shard.files) for shard in planned)
    try:
        with tqdm(total=total, unit="img", desc="packing", file=sys.stderr, disable=not show_progress) as bar:
            stream = reader.read_ahead(item for shard in planned for item in shard.files)
            for shard in planned:
                local = os.path.join(staging, shard.name)
                with tf.io.TFRecordWriter(local) as writer:
                    for path, label, data in itertools.islice(stream, len(shard.files)):
                        if isinstance(data, str):
                            raise DataError(f"{dataset.uri(path)} {data} (nothing was packed into {dst})")
                        writer.write(_example(tf, {"image/encoded": data, "image/class/label": label,
                                                   "image/filename": path.encode()}))
                        bar.update(1)
                sizes.append(os.path.getsize(local))
                bar.set_postfix_str(f"{len(sizes)}/{len(planned)} shards, {sum(sizes) / 1e6:.1f} MB", refresh=False)
                if upload:
                    upload.result()  # at most one shard uploading while the next is written
                moved.append(shard.name)
                upload = uploads.submit(store.move_in, local, shard.name)
            upload.result()
    finally:
        uploads.shutdown(cancel_futures=True)  # after a failure: waits for the upload in flight
        reader.close()
        shutil.rmtree(staging, ignore_errors=True)
    return sizes


def _example(tf, values: dict) -> bytes:
    """A serialized tf.train.Example of `values`, typed as sources.RECORD_LAYOUT says."""
    features = {}
    for name, description in sources.RECORD_LAYOUT.items():
        if description.startswith("int64:"):
            features[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[values[name]]))
        else:
            features[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[values[name]]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()
