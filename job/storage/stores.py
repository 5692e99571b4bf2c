"""Stores: the output root as one small interface over a local folder and an S3 prefix.

`Store` is what the rest of job.storage (and `dataset pack`) programs against; `open_store` picks
the implementation for a location. Keys are '/'-separated paths under the root. The run-shaped
operations (run_names, put_run, seal_run) follow the layout of job.storage.layout.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from job.storage.errors import Corrupt, StorageError, explain, s3_errors, transient
from job.storage.layout import MANIFEST, RUNS, manifest_key, run_key
from job.storage.locations import Location, parse_location
from job.storage.manifest import FILE_WORKERS, Hasher, RunFile, file_table, hash_file, load_json
from job.storage.s3 import PART_SIZE, TRANSFER_THREADS, S3Settings, boto_client, s3_settings


class Store(abc.ABC):
    """Files under an output root, by key. Every failure a user can cause is a StorageError."""

    loc: Location  # the root

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """The root's, or a key's, path or s3:// URI, for messages and results."""

    @abc.abstractmethod
    def check(self, create: bool) -> None:
        """Fail now if the root cannot be used (and make it, if `create` and it is a folder)."""

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if it is absent."""
        return self.read_tagged(key)[0]

    @abc.abstractmethod
    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, tag) with the tag write_if() compares; (None, None) if absent."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write the object whole: a reader sees the old one or the new one."""

    @abc.abstractmethod
    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write only if the object still has `tag` (None: only if absent); False if it changed."""

    @abc.abstractmethod
    def run_names(self) -> list[str]:
        """The names under runs/, complete or not, sorted."""

    @abc.abstractmethod
    def run_exists(self, run: str) -> bool:
        """Whether runs/<run>/ holds anything (a manifest or not)."""

    @abc.abstractmethod
    def put_run(self, files: list[RunFile], run: str, progress: Callable[[str], None]) -> int:
        """Store and verify the run's files, calling progress(key) after each; returns files sent."""

    @abc.abstractmethod
    def seal_run(self, run: str, manifest: bytes) -> None:
        """Write the run's manifest, last: from then on the run is complete."""

    @abc.abstractmethod
    def fetch(self, key: str, dest: str) -> None:
        """Copy the object into the local file `dest`."""

    @abc.abstractmethod
    def move_in(self, path: str, key: str) -> None:
        """Move the finished local file `path` to `key` (it is gone from `path` afterwards)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; an absent one is no error."""

    @abc.abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A binary file object of the object's bytes."""

    @abc.abstractmethod
    def secrets(self) -> list[str]:
        """The credentials in use, so that nothing containing one is ever written."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads."""


class LocalStore(Store):
    """The output root as a local directory. Keys are '/'-separated paths under it."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.root = Path(loc.path)
        self._staged: Path | None = None  # put_run()'s hidden copy, renamed into place by seal_run()

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def check(self, create: bool) -> None:
        if create:
            with self._oserror(f"create {self.root}"):
                self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist or is not a directory")

    @contextlib.contextmanager
    def _oserror(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StorageError(f"cannot {what}: {exc.strerror or exc}") from None

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        with self._oserror(f"read {self.uri(key)}"):
            try:
                data = (self.root / key).read_bytes()
            except FileNotFoundError:
                return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write(self, key: str, data: bytes) -> None:
        """Atomic: a temporary file in the same directory, fsync, os.replace."""
        target = self.root / key
        with self._oserror(f"write {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write only if the object still has `tag` (None: only if absent); a lock file serialises writers."""
        with self._oserror(f"lock {self.uri(key)}"), open(self.root / f".{key}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.read_tagged(key)[1] != tag:
                    return False
                self.write(key, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def run_names(self) -> list[str]:
        runs = self.root / RUNS
        with self._oserror(f"list {runs}"):
            return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs.is_dir() else []

    def run_exists(self, run: str) -> bool:
        return (self.root / RUNS / run).is_dir()

    def put_run(self, files: list[RunFile], run: str, progress: Callable[[str], None]) -> int:
        """Copy the files next to the run folder, verified; seal_run() renames them into place."""
        final = self.root / RUNS / run
        if final.is_dir() and all(Path(f.path).resolve().parent.is_relative_to(final.resolve()) for f in files):
            for f in files:  # publishing in place: the files are already where they belong
                progress(f.key)
            self._staged = None
            return 0
        with self._oserror(f"copy the run into {final.parent}"):
            final.parent.mkdir(parents=True, exist_ok=True)
            # A copy of this run that was interrupted (its chief lost mid-publish) left a hidden
            # sibling: this publish replaces it, so nothing half-written stays beside the runs.
            for interrupted in final.parent.glob(f".{run}.partial-*"):
                shutil.rmtree(interrupted, ignore_errors=True)
            # A run folder that exists without a manifest (an interrupted copy, or checkpoints)
            # receives the files one by one; otherwise a hidden sibling is renamed at the end.
            self._staged = None if final.exists() else Path(tempfile.mkdtemp(prefix=f".{run}.partial-", dir=final.parent))
            target = self._staged or final
            with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
                for key in pool.map(lambda f: self._copy(f, target), files):
                    progress(key)
        return len(files)

    def _copy(self, f: RunFile, target: Path) -> str:
        dest = target / f.key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(f.path, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if hash_file(str(tmp)) != (f.size, f.sha256):
            tmp.unlink()
            raise StorageError(f"copy of {f.path} does not match the original (changed while publishing?)")
        os.replace(tmp, dest)
        return f.key

    def seal_run(self, run: str, manifest: bytes) -> None:
        """Write the manifest last. A staged copy gets it inside, then one rename makes it visible."""
        staged, self._staged = self._staged, None
        if staged is None:
            self.write(manifest_key(run), manifest)
            return
        final = self.root / RUNS / run
        with self._oserror(f"move the run into {final}"):
            (staged / MANIFEST).write_bytes(manifest)
            with open(staged / MANIFEST, "rb+") as fh:
                os.fsync(fh.fileno())
            try:
                os.rename(staged, final)
            except OSError:  # someone else published this run meanwhile: theirs must be the same run
                shutil.rmtree(staged, ignore_errors=True)
                other = self.read(manifest_key(run))
                if other is None or file_table(load_json(other, MANIFEST)) != file_table(load_json(manifest, MANIFEST)):
                    raise StorageError(f"{final} appeared while publishing and is not this run: choose a new run name")

    def fetch(self, key: str, dest: str) -> None:
        with self._oserror(f"copy {self.uri(key)}"):
            shutil.copyfile(self.root / key, dest)

    def move_in(self, path: str, key: str) -> None:
        """Move a finished local file to `key` (a rename when it is on the same filesystem)."""
        target = self.root / key
        with self._oserror(f"move {path} to {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)

    def delete(self, key: str) -> None:
        with self._oserror(f"delete {self.uri(key)}"), contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def open(self, key: str) -> IO[bytes]:
        try:
            return open(self.root / key, "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.uri(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc.strerror}") from None

    def secrets(self) -> list[str]:
        return [os.environ[n] for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if os.environ.get(n)]

    def close(self) -> None:
        pass


class S3Store(Store):
    """The output root as an S3 prefix. `patient` stores (publish) retry transient failures for
    settings.retry_seconds; others rely on botocore's per-request retries and fail fast."""

    def __init__(self, loc: Location, settings: S3Settings | None = None, patient: bool = False):
        self.loc = loc
        self.settings = settings or s3_settings()
        self.patient = patient
        import boto3

        self.session = boto3.session.Session()
        self.client = boto_client(self.session, self.settings)
        self._transfer = None
        self._lock = threading.Lock()

    def uri(self, key: str = "") -> str:
        return self.loc.child(*key.split("/")).uri if key else self.loc.uri

    def key(self, key: str) -> str:
        return f"{self.loc.path}/{key}" if self.loc.path else key

    @property
    def transfer(self):
        with self._lock:
            if self._transfer is None:
                from boto3.s3.transfer import TransferConfig, create_transfer_manager

                config = TransferConfig(
                    multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                    max_concurrency=TRANSFER_THREADS, preferred_transfer_client="classic",
                )
                self._transfer = create_transfer_manager(self.client, config)
            return self._transfer

    def close(self) -> None:
        if self._transfer is not None:
            self._transfer.shutdown()
            self._transfer = None

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), retried with exponential backoff through transient failures when patient."""
        deadline, delay = None, 0.5
        while True:
            try:
                return fn()
            except s3_errors() as exc:
                if not (self.patient and transient(exc)):
                    raise explain(exc, what, self.settings, self.loc.bucket) from None
                now = time.monotonic()
                deadline = deadline or now + self.settings.retry_seconds
                if now >= deadline:
                    error = explain(exc, what, self.settings, self.loc.bucket)
                    raise StorageError(
                        f"{error} (still failing after {self.settings.retry_seconds:g} s of retries; "
                        "ALEXNET_JOB_S3_RETRY_SECONDS sets how long)"
                    ) from None
                time.sleep(min(delay * random.uniform(0.8, 1.2), max(deadline - now, 0.05)))
                delay = min(delay * 2, 8.0)

    def check(self, create: bool) -> None:
        """Credentials, bucket and endpoint in one cheap request, before anything is written."""
        self.call(f"list {self.uri()}", lambda: self.client.list_objects_v2(
            Bucket=self.loc.bucket, Prefix=self.key(""), MaxKeys=1))

    def _get(self, key: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.loc.bucket, Key=self.key(key))
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        return self.call(f"read {self.uri(key)}", lambda: self._get(key))

    def write(self, key: str, data: bytes) -> None:
        self.call(f"write {self.uri(key)}", lambda: self.client.put_object(
            Bucket=self.loc.bucket, Key=self.key(key), Body=data, ContentType="application/json"))

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """A conditional PUT: If-Match the ETag read, or If-None-Match: * when there was none."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.loc.bucket, Key=self.key(key), Body=data,
                                       ContentType="application/json", **condition)
                return True
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (409, 412):  # someone else wrote it first (409: a concurrent conditional write)
                    return False
                raise

        return self.call(f"update {self.uri(key)}", put)

    def _pages(self, **kwargs) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.loc.bucket, **kwargs)

    def run_names(self) -> list[str]:
        prefix = self.key(f"{RUNS}/")

        def names() -> list[str]:
            found = set()
            for page in self._pages(Prefix=prefix, Delimiter="/"):
                found.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
            return sorted(found)

        return self.call(f"list {self.uri(RUNS)}", names)

    def run_exists(self, run: str) -> bool:
        response = self.call(f"list {self.uri(run_key(run))}", lambda: self.client.list_objects_v2(
            Bucket=self.loc.bucket, Prefix=self.key(f"{run_key(run)}/"), MaxKeys=1))
        return response.get("KeyCount", 0) > 0

    def put_run(self, files: list[RunFile], run: str, progress: Callable[[str], None]) -> int:
        """Upload and verify every file, a few at a time (parts in parallel); returns files sent."""
        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
            sent = 0
            for key, uploaded in pool.map(lambda f: self._put_file(f, run_key(run, f.key)), files):
                sent += uploaded
                progress(key)
        return sent

    def _put_file(self, f: RunFile, key: str) -> tuple[str, bool]:
        state = {"uploaded": False, "trust_existing": True}

        def attempt() -> None:
            if not (state["trust_existing"] and self._has(key, f)):
                self.transfer.upload(f.path, self.loc.bucket, self.key(key),
                                     extra_args={"Metadata": {"sha256": f.sha256}}).result()
                state["uploaded"] = True
            state["trust_existing"] = False  # after a failed verification, always send it again
            self.verify(key, f)

        self.call(f"upload {self.uri(key)}", attempt)
        return f.key, state["uploaded"]

    def _has(self, key: str, f: RunFile) -> bool:
        """The object is there from an earlier attempt: same size and the sha256 we sent then."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.loc.bucket, Key=self.key(key))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return head["ContentLength"] == f.size and head.get("Metadata", {}).get("sha256") == f.sha256

    def verify(self, key: str, f: RunFile) -> None:
        """Read the object back (ranged GETs in parallel) and compare its size and sha256."""
        sink = Hasher()
        self.transfer.download(self.loc.bucket, self.key(key), sink).result()
        if (sink.size, sink.digest.hexdigest()) != (f.size, f.sha256):
            raise Corrupt(f"{self.uri(key)} read back as {sink.size} bytes with another sha256")

    def seal_run(self, run: str, manifest: bytes) -> None:
        self.write(manifest_key(run), manifest)

    def fetch(self, key: str, dest: str) -> None:
        self.call(f"download {self.uri(key)}",
                  lambda: self.transfer.download(self.loc.bucket, self.key(key), dest).result())

    def move_in(self, path: str, key: str) -> None:
        """Upload a finished local file to `key` (multipart, parts in parallel), then delete it."""
        self.call(f"upload {self.uri(key)}",
                  lambda: self.transfer.upload(path, self.loc.bucket, self.key(key)).result())
        os.unlink(path)

    def delete(self, key: str) -> None:
        self.call(f"delete {self.uri(key)}",
                  lambda: self.client.delete_object(Bucket=self.loc.bucket, Key=self.key(key)))

    def open(self, key: str) -> IO[bytes]:
        """The object in a spooled temporary file (memory up to 64 MiB), positioned at 0."""
        from botocore.exceptions import ClientError

        spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
        try:
            self.transfer.download(self.loc.bucket, self.key(key), spool).result()
        except ClientError as exc:
            spool.close()
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise StorageError(f"{self.uri(key)} does not exist") from None
            raise explain(exc, f"read {self.uri(key)}", self.settings, self.loc.bucket) from None
        except s3_errors() as exc:
            spool.close()
            raise explain(exc, f"read {self.uri(key)}", self.settings, self.loc.bucket) from None
        spool.seek(0)
        return spool

    def secrets(self) -> list[str]:
        credentials = self.session.get_credentials()
        if credentials is None:
            return []
        frozen = credentials.get_frozen_credentials()
        return [s for s in (frozen.secret_key, frozen.token) if s]


@contextlib.contextmanager
def open_store(where: str | os.PathLike | Location, *, patient: bool = False) -> Iterator[Store]:
    """The Store for a local folder or S3 prefix, closed on leaving the `with`. `patient` rides out
    S3 outages for ALEXNET_JOB_S3_RETRY_SECONDS (publishing, `dataset pack`)."""
    loc = where if isinstance(where, Location) else parse_location(where)
    store = S3Store(loc, patient=patient) if loc.is_s3 else LocalStore(loc)
    try:
        yield store
    finally:
        store.close()


def check_access(uri: str) -> None:
    """Fail now, with a clear StorageError, if `uri` cannot be listed (credentials, bucket, endpoint)."""
    with open_store(uri) as store:
        if store.loc.is_s3:
            store.check(create=False)
