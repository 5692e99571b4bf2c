"""Image datasets kept as files, locally or in object storage: listing and reading.

Two layouts:
- `imagefolder`: ROOT/{train,val}/<class>/*.{jpg,jpeg,png}. Class names are the folder names
  of train/, sorted; a class's index is its position in that order.
- `tfrecord`: ROOT/dataset.json plus sharded TFRecord files (see `RECORD_LAYOUT`), written by
  `alexnet-job dataset pack`.

The driver lists a dataset (`list_imagefolder`, `list_tfrecord`), which validates it before
any worker starts; the workers read only their own files through a `Reader`, which fetches
ahead on a thread pool (object stores have latency, not bandwidth, limits) and can keep a
local copy of what it read. Listing goes through pyarrow's filesystems, reading objects through
obstore (a GET there costs a third of pyarrow's CPU), both with the same S3 settings as the rest
of the job. No TensorFlow here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import posixpath
import struct
import tempfile
from dataclasses import dataclass, field

from job.errors import DataError

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATASET_FILE = "dataset.json"
# Every record of a packed dataset is a tf.train.Example with these features.
RECORD_LAYOUT = {
    "image/encoded": "bytes: the image file's bytes as they were (JPEG or PNG), not decoded",
    "image/class/label": "int64: the class index, a position in dataset.json's class_names",
    "image/filename": "bytes: the image's path relative to the source folder, to name bad records",
}


@dataclass
class FileDataset:
    """A listed image dataset. `files[split]` holds (path relative to root, label) for
    imagefolder, or (shard path relative to root, examples in it) for tfrecord."""

    layout: str  # "imagefolder" or "tfrecord"
    root: str  # local folder or s3:// URI
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]
    counts: dict[str, int] = field(default_factory=dict)  # examples per split
    fingerprint: str = ""

    def uri(self, relative: str) -> str:
        return self.root.rstrip("/") + "/" + relative


def filesystem(uri: str):
    """(pyarrow filesystem, path) for a local folder or s3:// URI."""
    from job import storage
    if not uri.startswith("s3://"):
        uri = os.path.abspath(uri)
    return storage.arrow_filesystem(uri)


def list_imagefolder(root: str) -> FileDataset:
    """The class folders under root/train and root/val; a DataError if the layout is wrong."""
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise DataError(f"dataset folder not found: {root}") from None
    except OSError as error:
        raise DataError(f"cannot list {root}: {_first_line(error)}") from None
    found: dict[str, dict[str, list[tuple[str, int]]]] = {split: {} for split in SPLITS}
    sizes = []
    for info in infos:
        parts = posixpath.relpath(info.path, base).split("/")
        if len(parts) == 2 and parts[0] in SPLITS and info.type == pafs.FileType.Directory:
            found[parts[0]].setdefault(parts[1], [])  # a class folder, perhaps empty
        if info.type != pafs.FileType.File or len(parts) != 3 or parts[0] not in SPLITS:
            continue
        if not parts[2].lower().endswith(IMAGE_EXTENSIONS):
            continue
        found[parts[0]].setdefault(parts[1], []).append(("/".join(parts), info.size))
        sizes.append(("/".join(parts), info.size))
    # Object stores have no folders: an empty class can only show up on local disk.
    class_names = sorted(found["train"])
    if not class_names:
        raise DataError(f"no class folders with images in {root}/train; expected "
                        f"{root}/train/<class>/*.jpg|*.jpeg|*.png")
    for split in SPLITS:
        for name, images in sorted(found[split].items()):
            if not images:
                raise DataError(f"class '{name}' in {root}/{split} has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
    unknown = sorted(set(found["val"]) - set(class_names))
    if unknown:
        raise DataError(f"class '{unknown[0]}' is in {root}/val but not in {root}/train; "
                        "val/ may only hold classes that train/ has")
    if not found["val"]:
        raise DataError(f"no images in {root}/val; expected {root}/val/<class>/*.jpg|*.jpeg|*.png")
    files = {split: sorted((path, class_names.index(name)) for name, images in found[split].items()
                           for path, _ in images) for split in SPLITS}
    return FileDataset("imagefolder", root, class_names, files,
                       counts={split: len(files[split]) for split in SPLITS},
                       fingerprint=_fingerprint(sorted(sizes)))


def list_tfrecord(root: str) -> FileDataset:
    """A packed dataset from its dataset.json; a DataError if it is missing or inconsistent."""
    fs, base = filesystem(root)
    try:
        with fs.open_input_stream(f"{base}/{DATASET_FILE}") as handle:
            description = json.loads(handle.read())
    except FileNotFoundError:
        raise DataError(f"no {DATASET_FILE} in {root}; a tfrecord dataset is made by "
                        "'alexnet-job dataset pack SRC DST'") from None
    except ValueError:
        raise DataError(f"{root}/{DATASET_FILE} is not valid JSON") from None
    except OSError as error:
        raise DataError(f"cannot read {root}/{DATASET_FILE}: {_first_line(error)}") from None
    try:
        class_names = list(description["class_names"])
        files = {split: [(shard["path"], int(shard["examples"])) for shard in description["splits"][split]]
                 for split in SPLITS}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{root}/{DATASET_FILE} lacks {error}; rewrite it with 'alexnet-job dataset pack'") from None
    for split in SPLITS:
        if not sum(examples for _, examples in files[split]):
            raise DataError(f"the {split} split of {root} has no records")
    listed = {info.path: info.size for info in fs.get_file_info([f"{base}/{path}" for split in SPLITS
                                                                    for path, _ in files[split]])}
    missing = [path for path, size in listed.items() if size is None]
    if missing:
        raise DataError(f"shard {missing[0]} listed in {root}/{DATASET_FILE} does not exist")
    return FileDataset("tfrecord", root, class_names, files,
                       counts={split: sum(n for _, n in files[split]) for split in SPLITS},
                       fingerprint=_fingerprint(sorted(listed.items())))


def _fingerprint(entries) -> str:
    """Over names and sizes: reading every byte of a large dataset to hash it is not worth it."""
    digest = hashlib.sha256()
    for name, size in entries:
        digest.update(f"{name}\0{size}\n".encode())
    return "sha256:" + digest.hexdigest()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_cache_dir(cache_dir: str) -> None:
    """A DataError unless cache_dir is (or can be made) a folder this process can write in."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as error:
        raise DataError(f"cannot write the data cache {cache_dir}: {error.strerror or _first_line(error)}; "
                        "give --data-cache a writable local folder") from None


class Reader:
    """Reads files of one dataset in a given order, `readahead` of them in flight at a time.

    With `cache_dir`, every object read from S3 is also kept there (written whole, then renamed,
    so a crash leaves no partial copy) and read from there the next time.
    """

    def __init__(self, root: str, *, readahead: int = 32, cache_dir: str | None = None):
        from job import storage

        self.root = root
        if root.startswith("s3://"):
            self.store, self.base = storage.object_store(root)
        else:
            self.store, self.base = None, os.path.abspath(root)
        self.readahead = readahead
        self.cache_dir = cache_dir if self.store else None
        if self.cache_dir:
            check_cache_dir(self.cache_dir)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(readahead, 64),
                                                          thread_name_prefix="reader")

    def close(self) -> None:
        """Stop fetching: reads not yet started are dropped."""
        self.pool.shutdown(cancel_futures=True)

    def read(self, relative: str) -> bytes:
        cached = self._cached(relative)
        if cached and os.path.exists(cached):
            with open(cached, "rb") as handle:
                return handle.read()
        if self.store is None:
            with open(os.path.join(self.base, relative), "rb") as handle:
                return handle.read()
        import obstore

        try:
            data = obstore.get(self.store, posixpath.join(self.base, relative)).bytes().to_bytes()
        except obstore.exceptions.BaseError as error:  # not an OSError: say it the same way
            raise OSError(_first_line(error)) from None
        if cached:
            self._keep(cached, data)
        return data

    def _keep(self, cached: str, data: bytes) -> None:
        """Copy into the cache; if that fails (a full disk), stop caching, not training."""
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(cached), delete=False) as out:
                try:
                    out.write(data)
                except OSError:
                    os.unlink(out.name)
                    raise
            os.replace(out.name, cached)
        except OSError as error:
            if self.cache_dir:  # several reader threads may fail at once: say it once
                print(f"data cache {self.cache_dir} stopped, reading from the store from now on: "
                      f"{_first_line(error)}", flush=True)
            self.cache_dir = None

    def _cached(self, relative: str) -> str | None:
        if not self.cache_dir:
            return None
        return os.path.join(self.cache_dir, self.root.removeprefix("s3://").strip("/"), relative)

    def read_ahead(self, items):
        """For each (relative path, payload) of `items`: (path, payload, bytes or an error text),
        in order. A file that cannot be read is not fatal here: the caller decides."""
        pending = collections.deque()

        def fetch(path):
            try:
                return self.read(path)
            except OSError as error:
                return f"cannot be read: {_first_line(error)}"

        for path, payload in items:
            pending.append((path, payload, self.pool.submit(fetch, path)))
            if len(pending) >= self.readahead:
                path_done, payload_done, future = pending.popleft()
                yield path_done, payload_done, future.result()
        while pending:
            path_done, payload_done, future = pending.popleft()
            yield path_done, payload_done, future.result()


def tfrecord_records(data: bytes, where: str):
    """The records of a TFRecord file's bytes: each is uint64 length, uint32 CRC of the length,
    the data, uint32 CRC of the data (little-endian). The CRCs are not checked here: a damaged
    record fails to parse or decode downstream and is counted as bad data there."""
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 12:
            raise DataError(f"TFRecord shard {where} is truncated: a header at byte {offset} is cut off")
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        if start + length + 4 > end:
            raise DataError(f"TFRecord shard {where} is truncated: the record at byte {offset} "
                            f"announces {length} bytes")
        yield data[start:start + length]
        offset = start + length + 4
