"""StorageError, and S3's failures turned into one: which are ours to explain, which are worth
retrying, and the one line that says what went wrong and what would fix it (never a credential)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from job.errors import UserError

if TYPE_CHECKING:
    from job.storage.s3 import S3Settings

_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
    "InternalError", "ServiceUnavailable", "OperationAborted",
}


class StorageError(UserError):
    """A problem the user can fix; str() is one line without credentials."""


class Corrupt(Exception):
    """An object read back does not match what was sent (retried like a network error)."""


def s3_errors() -> tuple:
    """What an S3 call raises for reasons outside this program: the errors of botocore, boto3 and
    s3transfer, and the OS's. Only these become a user's one-line StorageError; anything else is
    a bug and stays one (a traceback, exit 1)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import (RetriesExceededError, S3DownloadFailedError, S3UploadFailedError,
                                       TransferNotDoneError)

    return (BotoCoreError, ClientError, Boto3Error, S3UploadFailedError, S3DownloadFailedError, RetriesExceededError,
            TransferNotDoneError, OSError, Corrupt, StorageError)


def transient(exc: BaseException) -> bool:
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, IncompleteReadError,
                                     SSLError)
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError, Corrupt)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return False


def explain(exc: BaseException, what: str, settings: S3Settings, bucket: str) -> StorageError:
    """One line saying what went wrong and what would fix it."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, NoCredentialsError,
                                     PartialCredentialsError, SSLError)

    endpoint = settings.display_endpoint
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, Corrupt):
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
