"""Runs in storage: a local folder or `s3://bucket/prefix` on any S3-compatible server.

Layout under an output location (docs/storage.md explains it for users):

    <output>/runs/<run>/...             the run's files, uploaded first
    <output>/runs/<run>/manifest.json   written last: every file's key, size and sha256, plus
                                        what the trainer adds (versions, data, times, metrics)
                                        and the promotion decision. No manifest = incomplete.
    <output>/latest.json                names the newest complete run; moved by a conditional
                                        write (If-Match / If-None-Match, a lock file locally)
    <output>/checkpoints/<run>/         Ray Train checkpoints (see checkpoints_uri)

This module knows nothing of TensorFlow, Ray or the command line. Every failure a user can cause
or fix (bad URI, credentials, missing bucket, unreachable endpoint, ...) is a StorageError whose
message is one line that never contains a credential.

S3 settings come from boto3's standard chain plus these variables:
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   an S3-compatible server (MinIO, Ceph, SeaweedFS...)
    AWS_CA_BUNDLE                            a CA bundle for TLS verification (always on)
    AWS_MAX_ATTEMPTS                         attempts per request (botocore standard retries)
    ALEXNET_JOB_S3_ADDRESSING_STYLE          path | virtual | auto
    ALEXNET_JOB_S3_RETRY_SECONDS             how long a publish keeps retrying through an outage
    ALEXNET_JOB_CACHE                        where resolve_model() keeps downloaded runs
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from job.errors import UserError

# -- defaults -----------------------------------------------------------------------------------
MANIFEST = "manifest.json"  # last object of a run; its presence means "complete"
LATEST = "latest.json"  # at the output root: names the newest complete run
MANIFEST_VERSION = 1  # bump when the manifest's meaning changes
ADDRESSING_STYLES = ("auto", "path", "virtual")  # auto: path for custom endpoints, virtual for AWS
DEFAULT_MAX_ATTEMPTS = 5  # per S3 request, botocore "standard" mode (exponential backoff, jitter)
DEFAULT_RETRY_SECONDS = 120.0  # a publish rides out an outage this long before giving up
PART_SIZE = 16 * 1024 * 1024  # multipart threshold and part size
TRANSFER_THREADS = 8  # parallel parts / objects in flight
FILE_WORKERS = 4  # files uploaded, verified or downloaded at once
LATEST_RACE_ATTEMPTS = 20  # re-reads of latest.json after losing a conditional write
_HASH_CHUNK = 1024 * 1024
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_RESERVED_MANIFEST_KEYS = {"manifest_version", "run", "published_at", "files", "total_bytes", "promotion"}


class StorageError(UserError):
    """A problem the user can fix; str() is one line without credentials."""


# -- locations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    """A local directory (bucket None, path absolute) or an S3 prefix (path = key prefix, no slashes
    at either end, "" for the bucket's root)."""

    bucket: str | None
    path: str

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def uri(self) -> str:
        if not self.is_s3:
            return self.path
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.uri

    def child(self, *parts: str) -> Location:
        if not self.is_s3:
            return Location(None, os.path.join(self.path, *parts))
        return Location(self.bucket, "/".join(p for p in (self.path, *parts) if p))

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if not self.is_s3 else self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if not self.is_s3:
            return Location(None, os.path.dirname(self.path))
        return Location(self.bucket, self.path.rsplit("/", 1)[0] if "/" in self.path else "")


def parse_location(uri_or_path: str | os.PathLike) -> Location:
    """`s3://bucket[/prefix]` or a local path (made absolute); anything else is a StorageError."""
    text = os.fspath(uri_or_path).strip()
    if not text:
        raise StorageError("empty location: give a local path or s3://bucket/prefix")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)
    if scheme and scheme.group(1).lower() == "s3":
        return _parse_s3(text)
    if scheme and "://" in text:
        raise StorageError(f"unsupported location '{text}': use s3://bucket/prefix or a local path")
    if scheme and len(scheme.group(1)) > 1:  # "s3:bucket", "file:x"; one letter is a Windows drive
        raise StorageError(f"malformed location '{text}': use s3://bucket/prefix or a local path")
    return Location(None, os.path.abspath(os.path.expanduser(text)))


def _parse_s3(text: str) -> Location:
    if not text.startswith("s3://"):
        raise StorageError(f"malformed S3 URI '{text}': expected s3://bucket/prefix (lower-case s3, two slashes)")
    bucket, _, prefix = text[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise StorageError(
            f"malformed S3 URI '{text}': bucket '{bucket}' is not a valid bucket name "
            "(3-63 characters: lower-case letters, digits, '.', '-')"
        )
    prefix = prefix.rstrip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts) or any(c in prefix for c in "?#\\") or not prefix.isprintable():
        raise StorageError(
            f"malformed S3 URI '{text}': the prefix must be '/'-separated names without empty, '.' or '..' "
            "parts, '?', '#' or '\\'"
        )
    return Location(bucket, prefix)


def _check_run_name(run_name: str) -> None:
    if not isinstance(run_name, str) or not _RUN_NAME.fullmatch(run_name):
        raise StorageError(
            f"invalid run name {run_name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def run_uri(output: str, run_name: str) -> str:
    """Where a run lives: `<output>/runs/<run_name>`."""
    _check_run_name(run_name)
    return parse_location(output).child("runs", run_name).uri


def checkpoints_uri(output: str) -> str:
    """Ray Train's storage_path for an output: `<output>/checkpoints` (RunConfig name = run name)."""
    return parse_location(output).child("checkpoints").uri


# -- S3 settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Settings:
    """Everything needed to talk to the S3 server, except credentials (boto3's chain finds those)."""

    endpoint_url: str | None  # None = AWS
    region: str
    addressing_style: str  # "auto" | "path" | "virtual"
    ca_bundle: str | None  # None = the system's trust store
    max_attempts: int
    retry_seconds: float

    @property
    def display_endpoint(self) -> str:
        return self.endpoint_url or "AWS S3"


def s3_settings(env: dict[str, str] | None = None) -> S3Settings:
    """Resolve S3 settings from the environment and the AWS profile (as boto3 would)."""
    import botocore.session

    env = os.environ if env is None else env
    session = botocore.session.Session()
    profile = _scoped_config(session)
    s3_profile = profile.get("s3") if isinstance(profile.get("s3"), dict) else {}

    endpoint = _configured_endpoint(env, session, profile)
    if endpoint is not None:
        endpoint = _check_endpoint(endpoint)
    style = (env.get("ALEXNET_JOB_S3_ADDRESSING_STYLE") or s3_profile.get("addressing_style") or "auto").lower()
    if style not in ADDRESSING_STYLES:
        raise StorageError(f"ALEXNET_JOB_S3_ADDRESSING_STYLE={style!r} is not valid: use path, virtual or auto")
    ca_bundle = env.get("AWS_CA_BUNDLE") or profile.get("ca_bundle") or None
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise StorageError(f"AWS_CA_BUNDLE={ca_bundle} is not a file: point it at a PEM bundle of trusted CAs")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.get("region") or "us-east-1"
    return S3Settings(
        endpoint_url=endpoint,
        region=region,
        addressing_style=style,
        ca_bundle=ca_bundle,
        max_attempts=_positive(env, "AWS_MAX_ATTEMPTS", profile.get("max_attempts"), DEFAULT_MAX_ATTEMPTS, int),
        retry_seconds=_positive(env, "ALEXNET_JOB_S3_RETRY_SECONDS", None, DEFAULT_RETRY_SECONDS, float),
    )


def _scoped_config(session) -> dict:
    from botocore.exceptions import BotoCoreError
    try:
        return session.get_scoped_config()
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise StorageError(f"cannot read the AWS configuration: {exc}") from None


def _configured_endpoint(env, session, profile) -> str | None:
    """AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then the profile's `services` / `endpoint_url` (boto3's order)."""
    if (env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true":
        return None
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if env.get(name):
            return env[name]
    services = session.full_config.get("services", {}).get(profile.get("services"), {})
    return (services.get("s3") or {}).get("endpoint_url") or profile.get("endpoint_url")


def _check_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(
            "the S3 endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) must look like https://host[:port]"
        )
    if parts.username or parts.password:
        raise StorageError(
            "the S3 endpoint URL must not contain credentials: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    if parts.path.strip("/") or parts.query:
        raise StorageError(f"the S3 endpoint {parts.scheme}://{parts.netloc} must not have a path or query")
    return f"{parts.scheme}://{parts.netloc}"


def _positive(env, name, profile_value, default, kind):
    raw = env.get(name) or profile_value
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
        if value > 0 and math.isfinite(value):
            return value
    except ValueError:
        pass
    raise StorageError(f"{name}={raw!r} is not valid: give a positive number")


def _boto_client(session, settings: S3Settings):
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": settings.addressing_style},
        max_pool_connections=TRANSFER_THREADS * 2,
        connect_timeout=10,
        read_timeout=60,
    )
    try:
        return session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            verify=settings.ca_bundle or True,
            config=config,
        )
    except (ValueError, *_s3_errors()) as exc:  # ValueError: botocore's word for an endpoint URL that is none
        raise StorageError(f"cannot set up the S3 client: {type(exc).__name__}: {exc}") from None


# -- errors from S3 ----------------------------------------------------------------------------
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
    "InternalError", "ServiceUnavailable", "OperationAborted",
}


class _Corrupt(Exception):
    """An object read back does not match what was sent (retried like a network error)."""


def _s3_errors() -> tuple:
    """What an S3 call raises for reasons outside this program: the errors of botocore, boto3 and
    s3transfer, and the OS's. Only these become a user's one-line StorageError; anything else is
    a bug and stays one (a traceback, exit 1)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import (RetriesExceededError, S3DownloadFailedError, S3UploadFailedError,
                                       TransferNotDoneError)

    return (BotoCoreError, ClientError, Boto3Error, S3UploadFailedError, S3DownloadFailedError, RetriesExceededError,
            TransferNotDoneError, OSError, _Corrupt, StorageError)


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, IncompleteReadError,
                                     SSLError)
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError, _Corrupt)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return False


def _explain(exc: BaseException, what: str, settings: S3Settings, bucket: str) -> StorageError:
    """One line saying what went wrong and what would fix it."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, NoCredentialsError,
                                     PartialCredentialsError, SSLError)

    endpoint = settings.display_endpoint
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, _Corrupt):
        return StorageError(f"{exc}: the local file changed while publishing, or the server stored other bytes")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"no usable AWS credentials to {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or a web identity role (IRSA)"
        )
    if isinstance(exc, SSLError):
        return StorageError(
            f"TLS verification of {endpoint} failed while trying to {what}: set AWS_CA_BUNDLE to the CA "
            "bundle that signed the server's certificate"
        )
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} to {what} ({_short(exc)}): check AWS_ENDPOINT_URL_S3 "
            "and that the server is up"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "InvalidClientTokenId"):
            return StorageError(
                f"{endpoint} does not know the access key used to {what}: check AWS_ACCESS_KEY_ID or AWS_PROFILE"
            )
        if code == "SignatureDoesNotMatch":
            return StorageError(
                f"{endpoint} rejected the secret key used to {what}: check AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if code in ("ExpiredToken", "TokenRefreshRequired", "InvalidToken"):
            return StorageError(f"the AWS session token used to {what} is invalid or expired: refresh the credentials")
        if code == "NoSuchBucket":
            return StorageError(f"bucket '{bucket}' does not exist at {endpoint} (trying to {what}): create it or fix the URI")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return StorageError(
                f"bucket '{bucket}' is in another region than {settings.region} (trying to {what}): set AWS_REGION"
            )
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"access denied to {what} at {endpoint}: the credentials need s3:ListBucket, s3:GetObject and "
                f"s3:PutObject on bucket '{bucket}'"
            )
        return StorageError(f"S3 error {code or status} while trying to {what}: {_short(error.get('Message', ''))}")
    return StorageError(f"failed to {what}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


# -- hashing and files --------------------------------------------------------------------------
@dataclass(frozen=True)
class _File:
    key: str  # relative to the run folder, '/'-separated
    path: str  # local file
    size: int
    sha256: str

    def entry(self) -> dict:
        return {"key": self.key, "size": self.size, "sha256": self.sha256}


class _Hasher:
    """A write-only sink that hashes what it is given (a download target)."""

    def __init__(self):
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _hash_file(path: str) -> tuple[int, str]:
    sink = _Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sink.write(chunk)
    return sink.size, sink.digest.hexdigest()


def _scan(local_run_dir: str | os.PathLike) -> list[_File]:
    """Every file under the run folder (sorted), hashed. A top-level manifest.json is ours: skipped."""
    root = Path(local_run_dir)
    if not root.is_dir():
        raise StorageError(f"run folder {root} does not exist or is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    if not paths:
        raise StorageError(f"run folder {root} has no files to publish")
    with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
        hashes = list(pool.map(lambda p: _hash_file(str(p)), paths))
    return [_File(p.relative_to(root).as_posix(), str(p), size, digest) for p, (size, digest) in zip(paths, hashes)]


def _file_table(manifest: dict) -> dict[str, tuple[int, str]]:
    return {f["key"]: (f["size"], f["sha256"]) for f in manifest.get("files", [])}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def _loads(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise StorageError(f"{what} is not a valid JSON object: delete or repair it")
    return doc


# -- stores: the same small interface over a local folder and an S3 prefix -----------------------
class _LocalStore:
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

    def read(self, key: str) -> bytes | None:
        return self.read_tagged(key)[0]

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
        runs = self.root / "runs"
        with self._oserror(f"list {runs}"):
            return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs.is_dir() else []

    def run_exists(self, run: str) -> bool:
        return (self.root / "runs" / run).is_dir()

    def put_run(self, files: list[_File], run: str, progress: Callable[[str], None]) -> int:
        """Copy the files next to the run folder, verified; seal_run() renames them into place."""
        final = self.root / "runs" / run
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

    def _copy(self, f: _File, target: Path) -> str:
        dest = target / f.key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(f.path, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if _hash_file(str(tmp)) != (f.size, f.sha256):
            tmp.unlink()
            raise StorageError(f"copy of {f.path} does not match the original (changed while publishing?)")
        os.replace(tmp, dest)
        return f.key

    def seal_run(self, run: str, manifest: bytes) -> None:
        """Write the manifest last. A staged copy gets it inside, then one rename makes it visible."""
        staged, self._staged = self._staged, None
        if staged is None:
            self.write(f"runs/{run}/{MANIFEST}", manifest)
            return
        final = self.root / "runs" / run
        with self._oserror(f"move the run into {final}"):
            (staged / MANIFEST).write_bytes(manifest)
            with open(staged / MANIFEST, "rb+") as fh:
                os.fsync(fh.fileno())
            try:
                os.rename(staged, final)
            except OSError:  # someone else published this run meanwhile: theirs must be the same run
                shutil.rmtree(staged, ignore_errors=True)
                other = self.read(f"runs/{run}/{MANIFEST}")
                if other is None or _file_table(_loads(other, MANIFEST)) != _file_table(_loads(manifest, MANIFEST)):
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


class _S3Store:
    """The output root as an S3 prefix. `patient` stores (publish) retry transient failures for
    settings.retry_seconds; others rely on botocore's per-request retries and fail fast."""

    def __init__(self, loc: Location, settings: S3Settings | None = None, patient: bool = False):
        self.loc = loc
        self.settings = settings or s3_settings()
        self.patient = patient
        import boto3

        self.session = boto3.session.Session()
        self.client = _boto_client(self.session, self.settings)
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
            except _s3_errors() as exc:
                if not (self.patient and _transient(exc)):
                    raise _explain(exc, what, self.settings, self.loc.bucket) from None
                now = time.monotonic()
                deadline = deadline or now + self.settings.retry_seconds
                if now >= deadline:
                    error = _explain(exc, what, self.settings, self.loc.bucket)
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

    def read(self, key: str) -> bytes | None:
        return self.read_tagged(key)[0]

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
        prefix = self.key("runs/")

        def names() -> list[str]:
            found = set()
            for page in self._pages(Prefix=prefix, Delimiter="/"):
                found.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
            return sorted(found)

        return self.call(f"list {self.uri('runs')}", names)

    def run_exists(self, run: str) -> bool:
        response = self.call(f"list {self.uri('runs/' + run)}", lambda: self.client.list_objects_v2(
            Bucket=self.loc.bucket, Prefix=self.key(f"runs/{run}/"), MaxKeys=1))
        return response.get("KeyCount", 0) > 0

    def put_run(self, files: list[_File], run: str, progress: Callable[[str], None]) -> int:
        """Upload and verify every file, a few at a time (parts in parallel); returns files sent."""
        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
            sent = 0
            for key, uploaded in pool.map(lambda f: self._put_file(f, f"runs/{run}/{f.key}"), files):
                sent += uploaded
                progress(key)
        return sent

    def _put_file(self, f: _File, key: str) -> tuple[str, bool]:
        state = {"uploaded": False, "trust_existing": True}

        def attempt() -> None:
            if not (state["trust_existing"] and self._has(key, f)):
                self.transfer.upload(f.path, self.loc.bucket, self.key(key),
                                     extra_args={"Metadata": {"sha256": f.sha256}}).result()
                state["uploaded"] = True
            state["trust_existing"] = False  # after a failed verification, always send it again
            self._verify(key, f)

        self.call(f"upload {self.uri(key)}", attempt)
        return f.key, state["uploaded"]

    def _has(self, key: str, f: _File) -> bool:
        """The object is there from an earlier attempt: same size and the sha256 we sent then."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.loc.bucket, Key=self.key(key))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return head["ContentLength"] == f.size and head.get("Metadata", {}).get("sha256") == f.sha256

    def _verify(self, key: str, f: _File) -> None:
        """Read the object back (ranged GETs in parallel) and compare its size and sha256."""
        sink = _Hasher()
        self.transfer.download(self.loc.bucket, self.key(key), sink).result()
        if (sink.size, sink.digest.hexdigest()) != (f.size, f.sha256):
            raise _Corrupt(f"{self.uri(key)} read back as {sink.size} bytes with another sha256")

    def seal_run(self, run: str, manifest: bytes) -> None:
        self.write(f"runs/{run}/{MANIFEST}", manifest)

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
            raise _explain(exc, f"read {self.uri(key)}", self.settings, self.loc.bucket) from None
        except _s3_errors() as exc:
            spool.close()
            raise _explain(exc, f"read {self.uri(key)}", self.settings, self.loc.bucket) from None
        spool.seek(0)
        return spool

    def secrets(self) -> list[str]:
        credentials = self.session.get_credentials()
        if credentials is None:
            return []
        frozen = credentials.get_frozen_credentials()
        return [s for s in (frozen.secret_key, frozen.token) if s]


@contextlib.contextmanager
def _store(loc: Location, *, patient: bool = False) -> Iterator[_LocalStore | _S3Store]:
    store = _S3Store(loc, patient=patient) if loc.is_s3 else _LocalStore(loc)
    try:
        yield store
    finally:
        store.close()


def open_store(uri: str, *, patient: bool = False) -> contextlib.AbstractContextManager[_LocalStore | _S3Store]:
    """Files under a local folder or S3 prefix, by '/'-separated key: check(create), read (None if
    absent), write (atomic), move_in (a finished local file), delete. `patient` rides out S3 outages
    for ALEXNET_JOB_S3_RETRY_SECONDS. For writers of other layouts than runs (`dataset pack`)."""
    return _store(parse_location(uri), patient=patient)


# -- the run's state ---------------------------------------------------------------------------
def run_state(output: str, run_name: str) -> str:
    """'complete' (manifest present), 'incomplete' (files without a manifest) or 'absent'."""
    _check_run_name(run_name)
    with _store(parse_location(output)) as store:
        if store.read(f"runs/{run_name}/{MANIFEST}") is not None:
            return "complete"
        return "incomplete" if store.run_exists(run_name) else "absent"


def check_access(uri: str) -> None:
    """Fail now, with a clear StorageError, if `uri` cannot be listed (credentials, bucket, endpoint)."""
    with _store(parse_location(uri)) as store:
        if store.loc.is_s3:
            store.check(create=False)


# -- the promotion gate ------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """`METRIC[:TOLERANCE]`: latest moves only if new METRIC >= latest's METRIC - TOLERANCE
    (higher is better)."""

    metric: str
    tolerance: float = 0.0

    def __str__(self) -> str:
        return f"{self.metric}:{self.tolerance:g}"


def parse_gate(spec: str) -> Gate:
    metric, _, tolerance = spec.strip().partition(":")
    try:
        value = float(tolerance) if tolerance else 0.0
    except ValueError:
        value = -1.0
    if not _METRIC.fullmatch(metric) or not (value >= 0 and math.isfinite(value)):
        raise StorageError(
            f"invalid promotion gate {spec!r}: expected METRIC[:TOLERANCE] with TOLERANCE >= 0, e.g. test_accuracy:0.002"
        )
    return Gate(metric, value)


def _metric(metrics: Any, name: str) -> float | None:
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class _Latest:
    """What latest.json names now, read with the tag a conditional write needs."""

    tag: str | None
    run: str | None = None
    manifest: dict | None = None  # None when latest.json is absent or its run has no manifest


def _decide(run: str, manifest: dict, gate: Gate | None, current: _Latest) -> dict:
    """The promotion record: does latest.json move to `run`? Latest only moves forward in publish
    time, and with a gate only if the metric holds up."""
    record: dict[str, Any] = {"gate": str(gate) if gate else None, "latest_run": current.run}
    if gate:
        record.update(metric=gate.metric, tolerance=gate.tolerance, value=_metric(manifest.get("metrics"), gate.metric))
    if current.run is None or current.manifest is None:
        note = "no latest run yet" if current.run is None else f"latest run '{current.run}' has no manifest"
        return {**record, "promoted": True, "reason": note}
    theirs = _metric(current.manifest.get("metrics"), gate.metric) if gate else None
    if gate:
        record["latest_value"] = theirs
    if current.run == run:
        return {**record, "promoted": True, "reason": "already the latest run"}
    if (current.manifest.get("published_at", ""), current.run) > (manifest["published_at"], run):
        return {**record, "promoted": False, "reason": f"latest run '{current.run}' is newer"}
    if not gate:
        return {**record, "promoted": True, "reason": f"newer than latest run '{current.run}'"}
    if theirs is None:
        return {**record, "promoted": True, "reason": f"latest run '{current.run}' has no {gate.metric}"}
    ok = record["value"] >= theirs - gate.tolerance - 1e-12  # inclusive, forgiving float rounding
    sign = ">=" if ok else "<"
    reason = f"{gate.metric} {record['value']:.6g} {sign} {theirs:.6g} - {gate.tolerance:g} of latest run '{current.run}'"
    return {**record, "promoted": ok, "reason": reason}


def _read_latest(store) -> _Latest:
    data, tag = store.read_tagged(LATEST)
    if data is None:
        return _Latest(tag=None)
    name = _loads(data, store.uri(LATEST)).get("run")
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise StorageError(f"{store.uri(LATEST)} does not name a run: delete or repair it")
    manifest = store.read(f"runs/{name}/{MANIFEST}")
    return _Latest(tag=tag, run=name, manifest=_loads(manifest, store.uri(f"runs/{name}/{MANIFEST}")) if manifest else None)


# -- publish -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishResult:
    run: str
    run_uri: str
    files: int
    bytes: int
    uploaded: int  # files sent by this call (0 when the run was already complete)
    already_complete: bool  # the run had a manifest before this call
    promoted: bool  # latest.json names this run after this call
    latest: str | None  # the run latest.json names after this call
    promotion: dict = field(default_factory=dict)  # the decision recorded in the manifest

    @property
    def message(self) -> str:
        """One line for the command's output."""
        what = "was already published" if self.already_complete else "published"
        size = f"{self.files} files, {self.bytes / 1e6:.1f} MB"
        pointer = f"latest.json -> {self.run}" if self.promoted else f"latest.json unchanged ({self.latest})"
        return f"run {self.run} {what} at {self.run_uri} ({size}); {pointer}: {self.promotion.get('reason', '')}"


def publish(
    local_run_dir: str | os.PathLike,
    output: str,
    run_name: str,
    *,
    manifest_extra: dict,
    promote_if_better: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PublishResult:
    """Publish a finished run: its files, then manifest.json, then (maybe) latest.json.

    manifest_extra goes into the manifest as is (JSON-serialisable; its "metrics" dict is what
    list_runs and the promotion gate read). progress(key, done, total) is called after each file
    is stored and verified. Publishing a complete run again changes nothing but a latest.json
    left behind by an interrupted publish."""
    _check_run_name(run_name)
    gate = parse_gate(promote_if_better) if promote_if_better else None
    clash = _RESERVED_MANIFEST_KEYS & set(manifest_extra)
    if clash:
        raise ValueError(f"manifest_extra must not set {sorted(clash)}")
    if gate and _metric(manifest_extra.get("metrics"), gate.metric) is None:
        available = sorted(manifest_extra.get("metrics") or {})
        raise StorageError(f"promotion gate needs metric '{gate.metric}', which the run does not have (it has: {available})")
    files = _scan(local_run_dir)
    loc = parse_location(output)

    with _store(loc, patient=True) as store:
        store.check(create=True)
        key = f"runs/{run_name}/{MANIFEST}"
        existing = store.read(key)
        if existing is not None:
            manifest = _loads(existing, store.uri(key))
            if _file_table(manifest) != {f.key: (f.size, f.sha256) for f in files}:
                raise StorageError(
                    f"run {run_name} is already published at {store.uri(f'runs/{run_name}')} with other files: "
                    "publish under a new run name"
                )
            uploaded = 0
        else:
            manifest = _new_manifest(run_name, files, manifest_extra)
            _refuse_secrets(manifest, store)
            done, lock = [0], threading.Lock()

            def report(file_key: str) -> None:
                with lock:
                    done[0] += 1
                    if progress:
                        progress(file_key, done[0], len(files))

            uploaded = store.put_run(files, run_name, report)
        return _promote(store, run_name, manifest, gate, uploaded=uploaded, already_complete=existing is not None)


def finish_publish(output: str, run_name: str, *, promote_if_better: str | None = None) -> PublishResult:
    """For a run that is already complete: move latest.json if its publish decided to and was
    stopped before it could (a driver lost in between); otherwise change nothing."""
    gate = parse_gate(promote_if_better) if promote_if_better else None
    with _store(parse_location(output), patient=True) as store:
        key = f"runs/{run_name}/{MANIFEST}"
        existing = store.read(key)
        if existing is None:
            raise StorageError(f"run {run_name} has no {MANIFEST} at {store.uri(f'runs/{run_name}')}: it is not complete")
        return _promote(store, run_name, _loads(existing, store.uri(key)), gate, uploaded=0, already_complete=True)


def _promote(store, run_name: str, manifest: dict, gate: Gate | None, *, uploaded: int,
             already_complete: bool) -> PublishResult:
    promotion, latest = _move_latest(store, run_name, manifest, gate, sealed=already_complete)
    return PublishResult(
        run=run_name, run_uri=store.uri(f"runs/{run_name}"), files=len(manifest["files"]),
        bytes=manifest["total_bytes"], uploaded=uploaded, already_complete=already_complete,
        promoted=latest == run_name, latest=latest, promotion=promotion,
    )


def _new_manifest(run_name: str, files: list[_File], extra: dict) -> dict:
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run": run_name,
        "published_at": _now(),
        "files": [f.entry() for f in files],
        "total_bytes": sum(f.size for f in files),
        **extra,
        "promotion": None,
    }
    try:
        _dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest_extra is not JSON-serialisable: {exc}") from None
    return manifest


def _refuse_secrets(manifest: dict, store) -> None:
    """A credential must never end up in an artifact: refuse a manifest that contains one."""
    text = json.dumps(manifest)
    if any(len(secret) >= 8 and secret in text for secret in store.secrets()):
        raise StorageError("manifest_extra contains an AWS secret key or session token: refusing to publish it")


def _move_latest(store, run: str, manifest: dict, gate: Gate | None, sealed: bool) -> tuple[dict, str | None]:
    """Seal the manifest (first publish) with the promotion decision, then move latest.json with a
    conditional write, deciding again whenever another publisher got there first.

    A re-publish of a complete run keeps its recorded decision, unless that decision was to
    promote and latest.json still names an older run (the first publish stopped before moving it)."""
    owns_record = not sealed  # this call made (or now remakes) the decision in the manifest
    for _ in range(LATEST_RACE_ATTEMPTS):
        current = _read_latest(store)
        decision = _decide(run, manifest, gate, current)
        recorded = manifest.get("promotion")
        if not owns_record:
            unfinished = recorded is None or (recorded.get("promoted") and decision["promoted"] and current.run != run)
            if not unfinished:
                return recorded, current.run
        if not sealed or recorded != decision:
            manifest["promotion"] = decision
            if sealed:
                store.write(f"runs/{run}/{MANIFEST}", _dumps(manifest))
            else:
                store.seal_run(run, _dumps(manifest))
                sealed = True
            owns_record = True
        if current.run == run or not decision["promoted"]:
            return decision, current.run
        pointer = {"run": run, "manifest": f"runs/{run}/{MANIFEST}",
                   "published_at": manifest["published_at"], "updated_at": _now()}
        if store.write_if(LATEST, _dumps(pointer), current.tag):
            return decision, run
        time.sleep(random.uniform(0.05, 0.3))  # lost the race: read the new latest.json and decide again
    raise StorageError(
        f"{store.uri(LATEST)} kept changing while publishing run {run}: the run is complete but latest.json was "
        "not moved; publish it again"
    )


# -- reading runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    run: str
    uri: str
    complete: bool
    latest: bool
    time: str | None  # published_at (UTC, ISO 8601)
    test_accuracy: float | None


def list_runs(output: str) -> list[RunInfo]:
    """Every run under `<output>/runs/`, oldest first (incomplete ones last)."""
    with _store(parse_location(output)) as store:
        store.check(create=False)
        latest_doc = store.read(LATEST)
        latest = _loads(latest_doc, store.uri(LATEST)).get("run") if latest_doc else None
        names = store.run_names()
        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS * 2) as pool:
            manifests = list(pool.map(lambda n: store.read(f"runs/{n}/{MANIFEST}"), names))
        rows = []
        for name, data in zip(names, manifests):
            manifest = _loads(data, store.uri(f"runs/{name}/{MANIFEST}")) if data else {}
            rows.append(RunInfo(
                run=name, uri=store.uri(f"runs/{name}"), complete=data is not None, latest=name == latest,
                time=manifest.get("published_at"), test_accuracy=_metric(manifest.get("metrics"), "test_accuracy"),
            ))
    return sorted(rows, key=lambda r: (r.time is None, r.time or "", r.run))


def _split_run_ref(ref: str) -> tuple[Location, str | None]:
    """`<output>/runs/<run>` -> (output, run); `<output>/latest` -> (output, None)."""
    loc = parse_location(ref)
    if loc.name in ("latest", LATEST):
        return loc.parent, None
    if loc.parent.name == "runs" and _RUN_NAME.fullmatch(loc.name):
        return loc.parent.parent, loc.name
    raise StorageError(f"'{ref}' is not a run: expected <output>/runs/<run-name> or <output>/latest")


def _complete_manifest(store, run: str | None) -> tuple[str, dict]:
    """The run's name and manifest (run None: the one latest.json names); incomplete runs refused."""
    if run is None:
        data = store.read(LATEST)
        if data is None:
            raise StorageError(f"{store.uri(LATEST)} does not exist: no run has been published there")
        run = _loads(data, store.uri(LATEST)).get("run")
        if not isinstance(run, str) or not _RUN_NAME.fullmatch(run):
            raise StorageError(f"{store.uri(LATEST)} does not name a run: delete or repair it")
    data = store.read(f"runs/{run}/{MANIFEST}")
    if data is None:
        state = "is incomplete (no manifest.json: interrupted or still publishing)" if store.run_exists(run) else "does not exist"
        raise StorageError(f"run {store.uri(f'runs/{run}')} {state}")
    return run, _loads(data, store.uri(f"runs/{run}/{MANIFEST}"))


def show_run(run_uri: str) -> dict:
    """The manifest of a complete run (`<output>/runs/<run>` or `<output>/latest`)."""
    output, run = _split_run_ref(run_uri)
    with _store(output) as store:
        return _complete_manifest(store, run)[1]


def download_run(run_uri: str, dest_dir: str | os.PathLike) -> Path:
    """Copy a complete run into dest_dir (which must not exist or be empty), every file checked
    against the manifest; dest_dir appears only when everything is there and verified."""
    output, run = _split_run_ref(run_uri)
    dest = Path(dest_dir).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StorageError(f"{dest} already exists and is not an empty directory: choose another destination")
    with _store(output) as store:
        run, manifest = _complete_manifest(store, run)
        _download_into(store, run, manifest, dest)
    return dest


def _download_into(store, run: str, manifest: dict, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        raise StorageError(f"cannot create {dest}: {exc.strerror}") from None
    try:
        def fetch(entry: dict) -> None:
            target = staging / entry["key"]
            if not Path(os.path.normpath(target)).is_relative_to(staging):
                raise StorageError(f"manifest of run {run} has an unsafe key {entry['key']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            store.fetch(f"runs/{run}/{entry['key']}", str(target))
            if _hash_file(str(target)) != (entry["size"], entry["sha256"]):
                raise StorageError(
                    f"{store.uri(f'runs/{run}/' + entry['key'])} does not match its manifest (size or sha256): "
                    "the run is damaged"
                )

        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
            list(pool.map(fetch, manifest.get("files", [])))
        (staging / MANIFEST).write_bytes(_dumps(manifest))
        if dest.is_dir():
            dest.rmdir()  # empty (checked by the caller); the rename below needs it gone
        os.rename(staging, dest)
    except OSError as exc:
        raise StorageError(f"cannot write the run into {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_dir() -> Path:
    """Where downloaded runs are kept: ${ALEXNET_JOB_CACHE:-~/.cache/alexnet-job}."""
    return Path(os.environ.get("ALEXNET_JOB_CACHE") or Path.home() / ".cache" / "alexnet-job").expanduser()


def resolve_model(ref: str) -> Path:
    """A local directory holding the run `ref` names: a local run folder (used in place), or an
    s3:// run / `<output>/latest` (downloaded and verified into the cache, reused while the
    manifest's files are unchanged)."""
    loc = parse_location(ref)
    if not loc.is_s3 and (Path(loc.path) / MANIFEST).is_file():
        return Path(loc.path)  # a complete local run folder, wherever it is
    output, run = _split_run_ref(ref)
    if not output.is_s3:
        with _store(output) as store:
            run, _ = _complete_manifest(store, run)
            return Path(store.uri(f"runs/{run}"))
    with _store(output) as store:
        run, manifest = _complete_manifest(store, run)
        target = cache_dir() / "s3" / output.bucket / output.path / "runs" / run
        if _cached(target, manifest):
            return target
        fresh = target.with_name(f".{run}.new-{uuid.uuid4().hex[:8]}")
        _download_into(store, run, manifest, fresh)
    old = target.with_name(f".{run}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old)
    try:
        os.rename(fresh, target)
    except OSError:  # another process put a copy there meanwhile
        shutil.rmtree(fresh, ignore_errors=True)
        if not _cached(target, manifest):
            raise StorageError(f"cannot update the model cache at {target}: set ALEXNET_JOB_CACHE elsewhere") from None
    shutil.rmtree(old, ignore_errors=True)
    return target


def _cached(target: Path, manifest: dict) -> bool:
    """A cached copy is reused if it holds the manifest's files at their sizes (hashed at download)."""
    try:
        cached = _loads((target / MANIFEST).read_bytes(), str(target / MANIFEST))
    except (OSError, StorageError):
        return False
    if _file_table(cached) != _file_table(manifest):
        return False
    return all((target / f["key"]).is_file() and (target / f["key"]).stat().st_size == f["size"]
               for f in manifest.get("files", []))


# -- inputs and Ray Train's filesystem ---------------------------------------------------------
def open_input(uri: str) -> IO[bytes]:
    """A binary file object for a local path or s3:// object (e.g. a dataset's .gz file)."""
    loc = parse_location(uri)
    if not loc.is_s3:
        return _LocalStore(loc.parent).open(loc.name)
    if not loc.path:
        raise StorageError(f"'{uri}' names a bucket, not an object: expected s3://bucket/key")
    store = _S3Store(loc.parent)
    try:
        return store.open(loc.name)
    finally:
        store.close()


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def replace_file(filesystem, path: str, data: bytes) -> None:
    """Write `path` whole on a pyarrow filesystem, through a temporary file and a rename, so a
    reader sees the old file or the new one, never half of one (object stores cannot append)."""
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(f"{path}.writing") as out:
        out.write(data)
    filesystem.move(f"{path}.writing", path)


def arrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for `uri`, with the same endpoint, region, addressing style and CA
    bundle as boto3 (credentials: the AWS SDK's own default chain, so IRSA tokens keep refreshing).
    For Ray Train: RunConfig(storage_path=path, storage_filesystem=fs)."""
    import pyarrow.fs as pafs

    loc = parse_location(uri)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), loc.path
    settings = s3_settings()
    check_access(uri)  # a clear error now rather than an opaque one inside Ray later
    options: dict[str, Any] = {
        "region": settings.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        "connect_timeout": 10,
        "request_timeout": 60,
        "force_virtual_addressing": settings.addressing_style == "virtual",
    }
    if settings.endpoint_url:
        endpoint = urlsplit(settings.endpoint_url)
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
    if settings.ca_bundle:
        options["tls_ca_file_path"] = settings.ca_bundle
    return pafs.S3FileSystem(**options), f"{loc.bucket}/{loc.path}".rstrip("/")


def object_store(uri: str):
    """(obstore S3Store, key prefix) for an s3:// URI, for reading many small objects: the same
    endpoint, region, addressing style, CA bundle and retries as boto3, and boto3's credential chain.
    A GET through obstore costs the client a third of pyarrow's CPU and a sixth of boto3's
    (docs/benchmarks.md, section 8), which decides the input rate when every image is an object."""
    import boto3.session
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import S3Store

    loc = parse_location(uri)
    settings = s3_settings()
    check_access(uri)  # the same clear errors as every other S3 path
    config: dict[str, Any] = {"region": settings.region,
                              "virtual_hosted_style_request": settings.addressing_style == "virtual"}
    client_options: dict[str, Any] = {"connect_timeout": "10s", "timeout": "60s"}
    if settings.endpoint_url:
        config["endpoint"] = settings.endpoint_url
        client_options["allow_http"] = settings.endpoint_url.startswith("http://")
    if settings.ca_bundle:
        client_options["root_certificate"] = Path(settings.ca_bundle).read_text()
    store = S3Store(loc.bucket, config=config, client_options=client_options,
                    retry_config={"max_retries": settings.max_attempts - 1},
                    credential_provider=Boto3CredentialProvider(boto3.session.Session()))
    return store, loc.path
