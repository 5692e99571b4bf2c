"""Objects outside the run layout: reading inputs (a dataset's files), writing a file whole on
pyarrow's filesystem (progress, logs, records), and the filesystems Ray Train and the image
reader use, configured exactly as boto3 is (job.storage.s3)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from job.storage.errors import StorageError
from job.storage.locations import parse_location
from job.storage.s3 import s3_settings
from job.storage.stores import check_access, open_store


def open_input(uri: str) -> IO[bytes]:
    """A binary file object for a local path or s3:// object (e.g. a dataset's .gz file)."""
    loc = parse_location(uri)
    if loc.is_s3 and not loc.path:
        raise StorageError(f"'{uri}' names a bucket, not an object: expected s3://bucket/key")
    with open_store(loc.parent) as store:
        return store.open(loc.name)


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
