"""Where storage is: a local directory or an S3 prefix, parsed from what the user typed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from job.storage.errors import StorageError

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
