"""MNIST from the four original IDX `.gz` files or a Keras-style `mnist.npz`.

The location is a local path or an s3:// URI (read through job.storage); with none, Keras's
standard download and cache (~/.keras/datasets/mnist.npz) is used.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib

import numpy as np

from job.data import fingerprint
from job.errors import DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def load(location: str | None):
    """((train_x, train_y), (test_x, test_y), location, fingerprint); images (N, 28, 28, 1)."""
    if location is None:
        return _keras_download()
    if location.endswith(".npz"):
        blob = _read(location)
        return (*_parse_npz(blob, location), location, fingerprint([blob]))
    arrays, blobs = {}, []
    for key, name in IDX_FILES.items():
        path = location.rstrip("/") + "/" + name
        blob = _read(path)
        blobs.append(blob)
        arrays[key] = _parse_idx(blob, path, images=key.endswith("images"))
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"MNIST {split} images and labels in {location} differ in count "
                            f"({len(arrays[f'{split}_images'])} vs {len(arrays[f'{split}_labels'])})")
    return ((arrays["train_images"], arrays["train_labels"]),
            (arrays["test_images"], arrays["test_labels"]), location, fingerprint(blobs))


def _read(path: str) -> bytes:
    if path.startswith("s3://"):
        from job import storage  # boto3 only when the data is in object storage
        return storage.read_bytes(path)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        expected = "the four IDX .gz files (" + ", ".join(IDX_FILES.values()) + ") or an mnist.npz"
        raise DataError(f"MNIST file not found: {path}; --data must point at {expected}") from None
    except OSError as error:
        raise DataError(f"cannot read MNIST file {path}: {error.strerror}") from None


def _parse_idx(blob: bytes, path: str, images: bool) -> np.ndarray:
    """Parse one IDX file: big-endian magic, dimensions, then uint8 values."""
    try:
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
    except (OSError, EOFError, zlib.error):
        raise DataError(f"MNIST file {path} is corrupt (not a valid gzip stream)") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    expected_magic, ndim = (IMAGES_MAGIC, 3) if images else (LABELS_MAGIC, 1)
    if magic != expected_magic:
        raise DataError(f"MNIST file {path} is not an IDX {'image' if images else 'label'} file "
                        f"(magic {magic}, expected {expected_magic})")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"MNIST file {path} is truncated or corrupt "
                        f"({len(raw) - header} bytes of data, header says {int(np.prod(dims))})")
    values = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if images:
        return values[..., np.newaxis]
    if values.max(initial=0) > 9:
        raise DataError(f"MNIST file {path} has labels outside 0-9")
    return values.astype(np.int32)


def _parse_npz(blob: bytes, path: str):
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(io.BytesIO(blob)) as npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise DataError(f"{path} lacks array '{missing[0]}'; a Keras mnist.npz has {', '.join(keys)}")
            x_train, y_train, x_test, y_test = (npz[key] for key in keys)
    except (ValueError, OSError, zlib.error):
        raise DataError(f"{path} is not a readable .npz file") from None
    if x_train.ndim != 3 or x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise DataError(f"{path} arrays have unexpected shapes {x_train.shape}, {y_train.shape}")
    return ((x_train[..., np.newaxis].astype(np.uint8), y_train.astype(np.int32)),
            (x_test[..., np.newaxis].astype(np.uint8), y_test.astype(np.int32)))


def _keras_download():
    """Keras's standard MNIST download, cached in ~/.keras/datasets (or $KERAS_HOME)."""
    from job import tfenv
    _, keras = tfenv.tensorflow()
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as error:  # urllib/HTTP errors of any kind: no network, proxy, DNS
        reason = str(error).strip().splitlines()[-1:] or [type(error).__name__]  # Keras: "URL fetch failure on ..."
        raise DataError(f"could not download MNIST through Keras: {reason[0]}; "
                        "pass --data with a folder of the IDX .gz files or an mnist.npz") from None
    cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "datasets", "mnist.npz")
    with open(cache, "rb") as handle:
        blob = handle.read()
    return ((x_train[..., np.newaxis], y_train.astype(np.int32)),
            (x_test[..., np.newaxis], y_test.astype(np.int32)), "keras:mnist.npz", fingerprint([blob]))
