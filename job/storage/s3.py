"""How to talk to the S3 server: settings from boto3's standard chain plus a few variables, and
the boto3 client built from them. Credentials are left to boto3's chain and never read here.

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   an S3-compatible server (MinIO, Ceph, SeaweedFS...)
    AWS_CA_BUNDLE                            a CA bundle for TLS verification (always on)
    AWS_MAX_ATTEMPTS                         attempts per request (botocore standard retries)
    ALEXNET_JOB_S3_ADDRESSING_STYLE          path | virtual | auto
    ALEXNET_JOB_S3_RETRY_SECONDS             how long a publish keeps retrying through an outage
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from job.storage.errors import StorageError, s3_errors

ADDRESSING_STYLES = ("auto", "path", "virtual")  # auto: path for custom endpoints, virtual for AWS
DEFAULT_MAX_ATTEMPTS = 5  # per S3 request, botocore "standard" mode (exponential backoff, jitter)
DEFAULT_RETRY_SECONDS = 120.0  # a publish rides out an outage this long before giving up
PART_SIZE = 16 * 1024 * 1024  # multipart threshold and part size
TRANSFER_THREADS = 8  # parallel parts / objects in flight


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


def boto_client(session, settings: S3Settings):
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
    except (ValueError, *s3_errors()) as exc:  # ValueError: botocore's word for an endpoint URL that is none
        raise StorageError(f"cannot set up the S3 client: {type(exc).__name__}: {exc}") from None
