"""Only failures outside the program become a user's one-line StorageError; a bug stays a bug."""

import pytest
from botocore.client import BaseClient
from botocore.exceptions import EndpointConnectionError

from job import storage

S3_ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1",
          "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "ALEXNET_JOB_S3_RETRY_SECONDS": "1"}


@pytest.fixture
def s3_env(monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)


def test_a_bug_in_an_s3_call_is_a_traceback_not_a_user_error(s3_env, monkeypatch):
    def buggy(self, operation, params):
        raise TypeError("a bug: unexpected keyword argument")
    monkeypatch.setattr(BaseClient, "_make_api_call", buggy)
    with pytest.raises(TypeError, match="a bug"):
        storage.list_runs("s3://bucket/exp")


def test_an_unreachable_server_is_a_user_error(s3_env, monkeypatch):
    def unreachable(self, operation, params):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    monkeypatch.setattr(BaseClient, "_make_api_call", unreachable)
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.list_runs("s3://bucket/exp")
