"""A run's files, hashed, and the manifest that lists them (docs/storage.md: manifest.json).

The manifest is the run's last object and its presence means "complete": every file's key,
size and sha256, what the trainer adds (versions, data, times, metrics) and the promotion
decision. The JSON documents of the layout (manifest.json, latest.json) are written and read here.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.storage.errors import StorageError
from job.storage.layout import MANIFEST

MANIFEST_VERSION = 1  # bump when the manifest's meaning changes
RESERVED_KEYS = {"manifest_version", "run", "published_at", "files", "total_bytes", "promotion"}  # not the trainer's
FILE_WORKERS = 4  # files hashed, uploaded, verified or downloaded at once
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RunFile:
    key: str  # relative to the run folder, '/'-separated
    path: str  # local file
    size: int
    sha256: str

    def entry(self) -> dict:
        return {"key": self.key, "size": self.size, "sha256": self.sha256}


class Hasher:
    """A write-only sink that hashes what it is given (a download target)."""

    def __init__(self):
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def hash_file(path: str) -> tuple[int, str]:
    sink = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sink.write(chunk)
    return sink.size, sink.digest.hexdigest()


def scan(local_run_dir: str | os.PathLike) -> list[RunFile]:
    """Every file under the run folder (sorted), hashed. A top-level manifest.json is ours: skipped."""
    root = Path(local_run_dir)
    if not root.is_dir():
        raise StorageError(f"run folder {root} does not exist or is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    if not paths:
        raise StorageError(f"run folder {root} has no files to publish")
    with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
        hashes = list(pool.map(lambda p: hash_file(str(p)), paths))
    return [RunFile(p.relative_to(root).as_posix(), str(p), size, digest) for p, (size, digest) in zip(paths, hashes)]


def file_table(manifest: dict) -> dict[str, tuple[int, str]]:
    return {f["key"]: (f["size"], f["sha256"]) for f in manifest.get("files", [])}


def metric_value(metrics: Any, name: str) -> float | None:
    """The finite number `metrics[name]` (a manifest's "metrics"), or None."""
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def new_manifest(run_name: str, files: list[RunFile], extra: dict) -> dict:
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run": run_name,
        "published_at": utc_now(),
        "files": [f.entry() for f in files],
        "total_bytes": sum(f.size for f in files),
        **extra,
        "promotion": None,
    }
    try:
        dump_json(manifest)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest_extra is not JSON-serialisable: {exc}") from None
    return manifest


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def dump_json(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def load_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise StorageError(f"{what} is not a valid JSON object: delete or repair it")
    return doc
