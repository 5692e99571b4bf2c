"""User mistakes about object storage stop `train` before Ray starts: one line, exit 2."""

import pytest

from support import error_line, run_cli

pytestmark = pytest.mark.integration


def train(mnist_dir, output, env):
    return run_cli("train", "--data", mnist_dir, "--output", output, "--run-name", "never", env=env, timeout=120)


def assert_one_line_error(result, *fragments):
    assert "ray" not in result.stdout.lower()
    return error_line(result, *fragments)


def test_wrong_credentials_are_named_and_never_printed(mnist_dir, s3_server, bucket):
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-1234"}
    line = assert_one_line_error(train(mnist_dir, f"s3://{bucket}/x", env), "rejected the secret key", "AWS_SECRET_ACCESS_KEY")
    assert "wrong-secret-value-1234" not in line and s3_server.secret_key not in line
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # nothing written


def test_a_missing_bucket_is_named(mnist_dir, s3_server, s3_env):
    assert_one_line_error(train(mnist_dir, "s3://no-such-bucket-here/x", s3_server.env), "no-such-bucket-here")


def test_an_unreachable_endpoint_is_named(mnist_dir, s3_server, bucket):
    env = {**s3_server.env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "ALEXNET_JOB_S3_RETRY_SECONDS": "2",
           "AWS_MAX_ATTEMPTS": "1"}
    assert_one_line_error(train(mnist_dir, f"s3://{bucket}/x", env), "127.0.0.1:9")
