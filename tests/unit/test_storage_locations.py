"""job.storage: locations, run names, S3 settings and the promotion gate (no server needed)."""

import os

import pytest

from job import config, storage
from job.errors import ConfigError
from job.storage import Location, StorageError
from job.storage.gate import Latest, decide
from job.storage.s3 import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_SECONDS


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """A clean AWS environment: no user config files, no endpoint, no metadata service."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("ALEXNET_JOB_S3_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


@pytest.mark.parametrize("uri, bucket, path", [
    ("s3://bucket", "bucket", ""),
    ("s3://bucket/", "bucket", ""),
    ("s3://my.bucket-1/team/exp/", "my.bucket-1", "team/exp"),
    ("s3://abc/a b/c", "abc", "a b/c"),
])
def test_s3_uris(uri, bucket, path):
    loc = storage.parse_location(uri)
    assert loc == Location(bucket, path)
    assert loc.is_s3
    assert loc.child("runs", "r1").uri == f"s3://{bucket}/{path + '/' if path else ''}runs/r1"


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parse_location("out/x") == Location(None, str(tmp_path / "out" / "x"))
    assert storage.parse_location(tmp_path / "y").path == str(tmp_path / "y")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.parse_location("~/z").path == str(tmp_path / "z")


@pytest.mark.parametrize("uri, words", [
    ("", "empty location"),
    ("s3://", "not a valid bucket name"),
    ("s3:///prefix", "not a valid bucket name"),
    ("s3:/bucket/x", "expected s3://bucket/prefix"),
    ("s3:bucket", "expected s3://bucket/prefix"),
    ("S3://bucket/x", "expected s3://bucket/prefix"),
    ("s3://Upper/x", "not a valid bucket name"),
    ("s3://under_score", "not a valid bucket name"),
    ("s3://ab", "not a valid bucket name"),
    ("s3://a..b/x", "not a valid bucket name"),
    ("s3://bucket//x", "prefix must be"),
    ("s3://bucket/a/../b", "prefix must be"),
    ("s3://bucket/a?versionId=1", "prefix must be"),
    ("gs://bucket/x", "unsupported location"),
    ("https://host/bucket", "unsupported location"),
    ("file:x", "malformed location"),
])
def test_malformed_locations(uri, words):
    with pytest.raises(StorageError) as error:
        storage.parse_location(uri)
    message = str(error.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a b", "x" * 129, "..", "-x"])
def test_bad_run_names(name, tmp_path):
    with pytest.raises(StorageError, match="invalid run name"):
        storage.run_uri(str(tmp_path), name)


@pytest.mark.parametrize("name", ["nightly", "r1", "run-1.2", "a", "x" * 63, "2026-11-24-a",
                                  "Run_1", "My-Run", "r_1", "x" * 64, "run-", "-run", ".run", "run.", "run\n"])
def test_storage_takes_the_run_names_train_takes(name, tmp_path):
    """One rule: a name `train` refuses (it names Kubernetes objects too) is no run in storage either."""
    try:
        config.Config(run_name=name).validate()
        train_takes = True
    except ConfigError:
        train_takes = False
    try:
        storage.run_state(str(tmp_path), name)
        storage_takes = True
    except StorageError as error:
        assert "invalid run name" in str(error)
        storage_takes = False
    assert storage_takes == train_takes, name
    assert train_takes == (name in ("nightly", "r1", "run-1.2", "a", "x" * 63, "2026-11-24-a")), name


def test_layout_helpers():
    assert storage.run_uri("s3://b1b/p", "r-1.2.x") == "s3://b1b/p/runs/r-1.2.x"
    assert storage.checkpoints_uri("s3://b1b/p/") == "s3://b1b/p/checkpoints"
    assert storage.checkpoints_uri("/data/out") == "/data/out/checkpoints"


def test_settings_defaults(aws_env):
    settings = storage.s3_settings()
    assert settings == storage.S3Settings(
        endpoint_url=None, region="us-east-1", addressing_style="auto", ca_bundle=None,
        max_attempts=DEFAULT_MAX_ATTEMPTS, retry_seconds=DEFAULT_RETRY_SECONDS,
    )
    assert settings.display_endpoint == "AWS S3"


def test_settings_from_environment(aws_env, monkeypatch):
    ca = aws_env / "ca.pem"
    ca.write_text("not checked here")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000/")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("ALEXNET_JOB_S3_ADDRESSING_STYLE", "Path")
    monkeypatch.setenv("ALEXNET_JOB_S3_RETRY_SECONDS", "2.5")
    assert storage.s3_settings() == storage.S3Settings(
        endpoint_url="https://minio.example:9000", region="eu-west-3", addressing_style="path",
        ca_bundle=str(ca), max_attempts=7, retry_seconds=2.5,
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_settings().endpoint_url == "http://global:1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.s3_settings().endpoint_url is None


def test_settings_from_profile(aws_env, monkeypatch):
    (aws_env / "config").write_text(
        "[profile lab]\nregion = ap-south-1\nservices = lab-s3\ns3 =\n  addressing_style = virtual\n\n"
        "[services lab-s3]\ns3 =\n  endpoint_url = http://ceph.lab:7480\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "lab")
    settings = storage.s3_settings()
    assert (settings.endpoint_url, settings.region, settings.addressing_style) == (
        "http://ceph.lab:7480", "ap-south-1", "virtual")
    monkeypatch.setenv("AWS_PROFILE", "missing")
    with pytest.raises(StorageError, match="cannot read the AWS configuration"):
        storage.s3_settings()


@pytest.mark.parametrize("name, value, words", [
    ("AWS_ENDPOINT_URL_S3", "127.0.0.1:8333", "must look like https://host"),
    ("AWS_ENDPOINT_URL_S3", "http://key:secret@host:1", "must not contain credentials"),
    ("AWS_ENDPOINT_URL_S3", "http://host:1/sub", "must not have a path"),
    ("ALEXNET_JOB_S3_ADDRESSING_STYLE", "dns", "use path, virtual or auto"),
    ("AWS_MAX_ATTEMPTS", "0", "positive number"),
    ("ALEXNET_JOB_S3_RETRY_SECONDS", "soon", "positive number"),
    ("AWS_CA_BUNDLE", "/nonexistent/ca.pem", "is not a file"),
])
def test_bad_settings(aws_env, monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(StorageError) as error:
        storage.s3_settings()
    assert words in str(error.value)
    assert "secret" not in str(error.value).replace("secret key", "")


@pytest.mark.parametrize("spec, gate", [
    ("test_accuracy", storage.Gate("test_accuracy", 0.0)),
    ("test_accuracy:0.002", storage.Gate("test_accuracy", 0.002)),
    (" val.acc:0 ", storage.Gate("val.acc", 0.0)),
])
def test_gates(spec, gate):
    assert storage.parse_gate(spec) == gate


@pytest.mark.parametrize("spec", ["", ":0.1", "acc:-0.1", "acc:x", "acc:nan", "acc:inf", "1acc", "acc:0.1:2"])
def test_bad_gates(spec):
    with pytest.raises(StorageError, match=r"expected METRIC\[:TOLERANCE\]"):
        storage.parse_gate(spec)


def _manifest(run, when, acc=None):
    return {"run": run, "published_at": when, "metrics": {} if acc is None else {"test_accuracy": acc}}


@pytest.mark.parametrize("new, current, gate, promoted, reason", [
    (_manifest("b", "2"), None, None, True, "no latest run yet"),
    (_manifest("b", "2"), _manifest("a", "1"), None, True, "newer than latest run 'a'"),
    (_manifest("b", "1"), _manifest("a", "2"), None, False, "latest run 'a' is newer"),
    (_manifest("b", "2", 0.90), _manifest("a", "1", 0.95), "test_accuracy:0.05", True, "0.9 >= 0.95 - 0.05"),
    (_manifest("b", "2", 0.90), _manifest("a", "1", 0.95), "test_accuracy:0.049", False, "0.9 < 0.95 - 0.049"),
    (_manifest("b", "2", 0.99), _manifest("a", "1", 0.95), "test_accuracy", True, "0.99 >= 0.95 - 0"),
    (_manifest("b", "2", 0.99), _manifest("a", "1"), "test_accuracy", True, "latest run 'a' has no test_accuracy"),
    (_manifest("b", "1", 0.99), _manifest("a", "2", 0.5), "test_accuracy", False, "latest run 'a' is newer"),
])
def test_decisions(new, current, gate, promoted, reason):
    latest = Latest(tag=None) if current is None else Latest("t", current["run"], current)
    decision = decide(new["run"], new, storage.parse_gate(gate) if gate else None, latest)
    assert decision["promoted"] is promoted
    assert reason in decision["reason"]
    assert decision["latest_run"] == (current or {}).get("run")
    if gate and current and current["metrics"]:
        assert (decision["value"], decision["latest_value"]) == (new["metrics"]["test_accuracy"], current["metrics"]["test_accuracy"])
