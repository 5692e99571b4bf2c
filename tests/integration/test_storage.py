"""job.storage against a real S3 server (SeaweedFS on 127.0.0.1, see conftest.py)."""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from job import storage
from support import make_run_folder
from job.storage import StorageError, gate, publishing
from job.storage.stores import S3Store
from s3server import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
BIG = 20 * 1024 * 1024 + 123  # above the multipart threshold: two parts


def make_run(root: Path, seed: int = 0, big: int = 300_000) -> Path:
    return make_run_folder(root, seed, big)


def extra(acc: float | None = 0.9) -> dict:
    return {"metrics": {} if acc is None else {"test_accuracy": acc}, "versions": {"tensorflow": "2.21.0"}}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def objects(server: S3Server, bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object under prefix, as the server reports it (key -> {size, etag, body})."""
    client = server.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"]] = {"size": item["Size"], "etag": item["ETag"], "body": body}
    return found


def latest_of(server, bucket, prefix="exp"):
    response = server.client().get_object(Bucket=bucket, Key=f"{prefix}/latest.json")
    return json.loads(response["Body"].read()), response["ETag"]


# -- the happy path -----------------------------------------------------------------------------
def test_publish_list_show_download_roundtrip(s3_server, bucket, tmp_path):
    run = make_run(tmp_path / "run", big=BIG)
    output = f"s3://{bucket}/exp"
    result = storage.publish(run, output, "r1", manifest_extra=extra(0.91))
    assert (result.run_uri, result.files, result.uploaded, result.promoted, result.latest) == (
        f"{output}/runs/r1", 7, 7, True, "r1")
    assert result.bytes == sum(len(v) for v in local_files(run).values())

    # what is on the server: every file byte for byte, then the manifest, then latest.json
    stored = objects(s3_server, bucket)
    expected = {f"exp/runs/r1/{k}": v for k, v in local_files(run).items()}
    assert set(stored) == {*expected, "exp/runs/r1/manifest.json", "exp/latest.json"}
    assert all(stored[k]["body"] == v for k, v in expected.items())
    assert stored["exp/runs/r1/model.keras"]["etag"].strip('"').endswith("-2")  # sent as a multipart upload
    manifest = json.loads(stored["exp/runs/r1/manifest.json"]["body"])
    assert manifest["files"] == [
        {"key": k, "size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in local_files(run).items()]
    assert manifest["run"] == "r1" and manifest["metrics"] == {"test_accuracy": 0.91}
    assert manifest["versions"] == {"tensorflow": "2.21.0"} and manifest["manifest_version"] == 1
    assert json.loads(stored["exp/latest.json"]["body"])["run"] == "r1"
    for item in stored.values():  # no credential in any artifact
        assert s3_server.secret_key.encode() not in item["body"]

    rows = storage.list_runs(output)
    assert [(r.run, r.complete, r.latest, r.test_accuracy, r.time) for r in rows] == [
        ("r1", True, True, 0.91, manifest["published_at"])]
    assert storage.show_run(f"{output}/runs/r1") == manifest
    assert storage.show_run(f"{output}/latest") == manifest
    assert storage.run_state(output, "r1") == "complete"

    got = storage.download_run(f"{output}/runs/r1", tmp_path / "download")
    assert local_files(got) == {**local_files(run), "manifest.json": local_files(got)["manifest.json"]}
    assert json.loads((got / "manifest.json").read_text()) == manifest


def test_republish_is_idempotent(s3_server, bucket, tmp_path):
    run = make_run(tmp_path / "run")
    output = f"s3://{bucket}/exp"
    storage.publish(run, output, "r1", manifest_extra=extra())
    before = {k: (v["etag"], v["body"]) for k, v in objects(s3_server, bucket).items()}
    again = storage.publish(run, output, "r1", manifest_extra=extra())
    assert again.already_complete and again.uploaded == 0 and again.promoted and again.latest == "r1"
    assert {k: (v["etag"], v["body"]) for k, v in objects(s3_server, bucket).items()} == before
    (run / "config.yaml").write_text("different")
    with pytest.raises(StorageError, match="with other files: publish under a new run name"):
        storage.publish(run, output, "r1", manifest_extra=extra())
    assert {k: (v["etag"], v["body"]) for k, v in objects(s3_server, bucket).items()} == before


def test_promotion_gate_both_ways(s3_server, bucket, tmp_path):
    output = f"s3://{bucket}/exp"
    gate = "test_accuracy:0.002"
    assert storage.publish(make_run(tmp_path / "a"), output, "a", manifest_extra=extra(0.990), promote_if_better=gate).promoted
    _, tag = latest_of(s3_server, bucket)

    worse = storage.publish(make_run(tmp_path / "b"), output, "b", manifest_extra=extra(0.987), promote_if_better=gate)
    assert not worse.promoted and worse.latest == "a"
    assert "0.987 < 0.99 - 0.002" in worse.message
    assert latest_of(s3_server, bucket)[1] == tag  # latest.json not even rewritten
    record = storage.show_run(f"{output}/runs/b")["promotion"]
    assert (record["promoted"], record["value"], record["latest_value"], record["latest_run"]) == (False, 0.987, 0.99, "a")

    within = storage.publish(make_run(tmp_path / "c"), output, "c", manifest_extra=extra(0.988), promote_if_better=gate)
    assert within.promoted and latest_of(s3_server, bucket)[0]["run"] == "c"
    record = storage.show_run(f"{output}/latest")["promotion"]
    assert (record["promoted"], record["value"], record["latest_value"], record["gate"]) == (True, 0.988, 0.99, gate)
    assert [r.latest for r in storage.list_runs(output)] == [False, False, True]


# -- interruptions ------------------------------------------------------------------------------
PUBLISH_AND_DIE = """
import os, sys
from job import storage
def progress(key, done, total):
    if done == int(sys.argv[4]):
        os._exit(17)
storage.publish(sys.argv[1], sys.argv[2], sys.argv[3], manifest_extra={"metrics": {}}, progress=progress)
"""


def test_killed_publish_leaves_nothing_complete(s3_server, bucket, tmp_path):
    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "a"), output, "a", manifest_extra=extra())
    latest_before = latest_of(s3_server, bucket)
    run = make_run(tmp_path / "b", big=BIG)
    proc = subprocess.run([sys.executable, "-c", PUBLISH_AND_DIE, str(run), output, "b", "1"],
                          env={**os.environ, **s3_server.env}, cwd=REPO, timeout=120)
    assert proc.returncode == 17
    assert latest_of(s3_server, bucket) == latest_before
    assert storage.run_state(output, "b") == "incomplete"
    assert [(r.run, r.complete, r.latest) for r in storage.list_runs(output)] == [("a", True, True), ("b", False, False)]
    assert "exp/runs/b/manifest.json" not in objects(s3_server, bucket, "exp/runs/b/")
    for use in (lambda: storage.show_run(f"{output}/runs/b"),
                lambda: storage.download_run(f"{output}/runs/b", tmp_path / "dl"),
                lambda: storage.resolve_model(f"{output}/runs/b")):
        with pytest.raises(StorageError, match="is incomplete"):
            use()
    assert not (tmp_path / "dl").exists()

    present = len(objects(s3_server, bucket, "exp/runs/b/"))
    result = storage.publish(run, output, "b", manifest_extra=extra())  # resumes: what is there is kept
    assert present >= 1 and result.uploaded == 7 - present and result.promoted
    assert storage.run_state(output, "b") == "complete"
    assert local_files(storage.download_run(f"{output}/runs/b", tmp_path / "dl")).keys() == {*local_files(run), "manifest.json"}


SEAL_AND_DIE = """
import os, sys
from job import storage
from job.storage import publishing
move_latest = publishing.move_latest
def die_at_the_latest_write(store, *args, **kwargs):
    store.write_if = lambda *_, **__: os._exit(17)  # the manifest is sealed; latest.json is next
    return move_latest(store, *args, **kwargs)
publishing.move_latest = die_at_the_latest_write  # where publish reads it
storage.publish(sys.argv[1], sys.argv[2], sys.argv[3], manifest_extra={"metrics": {"test_accuracy": 0.9}})
"""


def test_the_same_command_moves_latest_json_that_a_lost_driver_left_behind(s3_server, bucket, tmp_path):
    from support import run_cli

    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "a"), output, "a", manifest_extra=extra())
    proc = subprocess.run([sys.executable, "-c", SEAL_AND_DIE, str(make_run(tmp_path / "b")), output, "b"],
                          env={**os.environ, **s3_server.env}, cwd=REPO, timeout=120)
    assert proc.returncode == 17
    assert storage.run_state(output, "b") == "complete" and latest_of(s3_server, bucket)[0]["run"] == "a"

    again = run_cli("train", "--output", output, "--run-name", "b", env=s3_server.env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "latest.json -> b" in again.stdout and "not training it again" in again.stdout
    pointer, tag = latest_of(s3_server, bucket)
    assert pointer["run"] == "b"
    assert run_cli("train", "--output", output, "--run-name", "b", env=s3_server.env, timeout=120).returncode == 0
    assert latest_of(s3_server, bucket)[1] == tag  # nothing left to finish: not rewritten
    assert run_cli("train", "--output", output, "--run-name", "a", env=s3_server.env, timeout=120).returncode == 0
    assert latest_of(s3_server, bucket)[0]["run"] == "b"  # an older complete run does not take it back


def _stop_at_first_file(server, restart_after: float | None):
    """A progress callback that stops the server once the first file is stored (and maybe restarts it)."""
    state = {"stopped_at": None, "restart": None}

    def progress(key, done, total):
        if done == 1:
            state["stopped_at"] = time.monotonic()  # requests start failing as soon as it shuts down
            server.stop()
            if restart_after is not None:
                state["restart"] = threading.Timer(restart_after, server.start)
                state["restart"].start()

    return progress, state


def test_server_back_within_the_retry_budget(s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_JOB_S3_RETRY_SECONDS", "90")
    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "a"), output, "a", manifest_extra=extra())
    run = make_run(tmp_path / "b", big=BIG)
    progress, state = _stop_at_first_file(s3_server, restart_after=4.0)
    try:
        result = storage.publish(run, output, "b", manifest_extra=extra(), progress=progress)
        finished = time.monotonic()
    finally:
        if state["restart"]:
            state["restart"].join()  # never leave a timer that restarts the server after the session
        s3_server.start()
    assert state["stopped_at"] is not None and finished - state["stopped_at"] >= 4.0
    assert result.promoted and result.uploaded == 7
    assert latest_of(s3_server, bucket)[0]["run"] == "b"
    stored = objects(s3_server, bucket, "exp/runs/b/")
    assert {k[len("exp/runs/b/"):]: v["body"] for k, v in stored.items() if not k.endswith("manifest.json")} == local_files(run)


def test_server_gone_for_longer_fails_cleanly(s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_JOB_S3_RETRY_SECONDS", "3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "a"), output, "a", manifest_extra=extra())
    latest_before = latest_of(s3_server, bucket)
    progress, state = _stop_at_first_file(s3_server, restart_after=None)
    try:
        with pytest.raises(StorageError) as error:
            storage.publish(make_run(tmp_path / "b", big=BIG), output, "b", manifest_extra=extra(), progress=progress)
        waited = time.monotonic() - state["stopped_at"]
    finally:
        s3_server.start()
    message = str(error.value)
    assert f"cannot reach the S3 endpoint {s3_server.endpoint}" in message and "still failing after 3 s" in message
    assert "\n" not in message and s3_server.secret_key not in message
    assert 3 <= waited < 60
    assert latest_of(s3_server, bucket) == latest_before
    assert storage.run_state(output, "b") == "incomplete"
    assert "exp/runs/b/manifest.json" not in objects(s3_server, bucket, "exp/runs/b/")


def test_objects_are_verified_after_upload(s3_server, bucket, tmp_path, monkeypatch):
    """A file that changes after it was hashed is uploaded as is; reading it back must catch that."""
    monkeypatch.setenv("ALEXNET_JOB_S3_RETRY_SECONDS", "2")
    output = f"s3://{bucket}/exp"
    run = make_run(tmp_path / "run")
    real_scan = publishing.scan

    def scan_then_change(path):
        files = real_scan(path)
        (run / "model.keras").write_bytes(os.urandom((run / "model.keras").stat().st_size))  # same size
        return files

    monkeypatch.setattr(publishing, "scan", scan_then_change)  # where publish reads it
    with pytest.raises(StorageError, match="model.keras read back as .* with another sha256: the local file changed"):
        storage.publish(run, output, "r1", manifest_extra=extra())
    assert storage.run_state(output, "r1") == "incomplete"
    assert "exp/latest.json" not in objects(s3_server, bucket)


# -- two publishers, one latest.json ----------------------------------------------------------
def test_racing_publishers_forced_interleaving(s3_server, bucket, tmp_path, monkeypatch):
    """Both read latest.json, then the older run writes last: If-Match must turn that into a
    412, a re-read and a refusal instead of moving latest back to the older run."""
    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "base"), output, "base", manifest_extra=extra())
    barrier = threading.Barrier(2, timeout=60)
    reads = {"older": 0, "newer": 0}
    real_read, real_write_if, real_manifest = gate.read_latest, S3Store.write_if, publishing.new_manifest
    # The order is forced by events, not by sleeps, which a loaded machine can outrun: "older" is
    # stamped published_at first, and writes latest.json only after "newer" has.
    older_stamped, newer_wrote = threading.Event(), threading.Event()

    def new_manifest(*args, **kwargs):
        if threading.current_thread().name == "newer":
            older_stamped.wait(60)
        manifest = real_manifest(*args, **kwargs)
        if threading.current_thread().name == "older":
            older_stamped.set()
        return manifest

    def read_latest(store):
        current = real_read(store)
        name = threading.current_thread().name
        reads[name] += 1
        if reads[name] == 1:
            barrier.wait()
        return current

    def write_if(self, key, data, tag):
        if threading.current_thread().name == "older":
            newer_wrote.wait(60)
            return real_write_if(self, key, data, tag)
        written = real_write_if(self, key, data, tag)
        newer_wrote.set()
        return written

    monkeypatch.setattr(publishing, "new_manifest", new_manifest)  # where publish reads it
    monkeypatch.setattr(gate, "read_latest", read_latest)  # where move_latest reads it
    monkeypatch.setattr(S3Store, "write_if", write_if)
    results, errors = {}, []

    def go(name):
        try:
            results[name] = storage.publish(make_run(tmp_path / name), output, name, manifest_extra=extra())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(name,), name=name) for name in ("older", "newer")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert latest_of(s3_server, bucket)[0]["run"] == "newer"
    assert results["newer"].promoted and not results["older"].promoted and results["older"].latest == "newer"
    assert reads["older"] == 2
    assert storage.show_run(f"{output}/runs/older")["promotion"]["reason"] == "latest run 'newer' is newer"
    assert all(r.complete for r in storage.list_runs(output))


RACE = """
import os, sys, time
from pathlib import Path
from job import storage
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
r = storage.publish(sys.argv[1], sys.argv[2], sys.argv[3], manifest_extra={"metrics": {"test_accuracy": 0.5}})
print(r.latest)
"""


def test_racing_publisher_processes(s3_server, bucket, tmp_path):
    output = f"s3://{bucket}/exp"
    go = tmp_path / "go"
    names = ["p1", "p2", "p3"]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(make_run(tmp_path / n, big=2_000_000)), output, n, str(go)],
                              env={**os.environ, **s3_server.env}, cwd=REPO, stdout=subprocess.PIPE, text=True)
             for n in names]
    time.sleep(3)  # let them import boto3 and wait at the line
    go.touch()
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    manifests = {n: storage.show_run(f"{output}/runs/{n}") for n in names}
    newest = max(names, key=lambda n: (manifests[n]["published_at"], n))
    assert latest_of(s3_server, bucket)[0]["run"] == newest
    assert sum(m["promotion"]["promoted"] is False for m in manifests.values()) == sum(
        o.strip() != n for n, o in zip(names, outputs))
    assert [r.run for r in storage.list_runs(output) if r.latest] == [newest]


# -- what users get wrong -----------------------------------------------------------------------
def test_wrong_credentials(s3_server, bucket, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    output = f"s3://{bucket}/exp"
    for variable, value, words in (
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all", "rejected the secret key"),
        ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN", "does not know the access key"),
    ):
        monkeypatch.setenv(variable, value)
        for call in (lambda: storage.publish(run, output, "r1", manifest_extra=extra()),
                     lambda: storage.list_runs(output), lambda: storage.arrow_filesystem(output)):
            with pytest.raises(StorageError) as error:
                call()
            message = str(error.value)
            assert words in message and "\n" not in message
            assert value not in message and s3_server.secret_key not in message
        monkeypatch.setenv(variable, s3_server.env[variable])
    assert objects(s3_server, bucket) == {}


def test_no_credentials(s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials .* AWS_ACCESS_KEY_ID"):
        storage.publish(make_run(tmp_path / "run"), f"s3://{bucket}/exp", "r1", manifest_extra=extra())
    assert objects(s3_server, bucket) == {}


def test_missing_bucket(s3_server, s3_env, tmp_path):
    name = f"missing-{os.getpid()}-bucket"
    with pytest.raises(StorageError, match=f"bucket '{name}' does not exist at {s3_server.endpoint}"):
        storage.publish(make_run(tmp_path / "run"), f"s3://{name}/exp", "r1", manifest_extra=extra())
    assert name not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize("uri", ["s3:/{b}/exp", "s3:{b}/exp", "s3://{B}/exp", "s3://{b}//exp", "S3://{b}/exp"])
def test_malformed_uri_writes_nothing(s3_server, bucket, tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "run")
    with pytest.raises(StorageError, match="malformed"):
        storage.publish(run, uri.format(b=bucket, B=bucket.upper()), "r1", manifest_extra=extra())
    assert objects(s3_server, bucket) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no local folder named like the URI


def test_unreachable_endpoint(s3_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        storage.list_runs("s3://some-bucket/exp")
    assert time.monotonic() - started < 30


def test_download_refuses_damaged_objects(s3_server, bucket, tmp_path):
    output = f"s3://{bucket}/exp"
    storage.publish(make_run(tmp_path / "run"), output, "r1", manifest_extra=extra())
    s3_server.client().put_object(Bucket=bucket, Key="exp/runs/r1/training_curves.png", Body=b"not the plot")
    with pytest.raises(StorageError, match="training_curves.png does not match its manifest"):
        storage.download_run(f"{output}/latest", tmp_path / "dl")
    assert not (tmp_path / "dl").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


# -- models, inputs and Ray's filesystem --------------------------------------------------------
def test_resolve_model_downloads_once_and_follows_latest(s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_JOB_CACHE", str(tmp_path / "cache"))
    output = f"s3://{bucket}/exp"
    run_a = make_run(tmp_path / "a")
    storage.publish(run_a, output, "a", manifest_extra=extra())
    fetched = []
    real_fetch = S3Store.fetch
    monkeypatch.setattr(S3Store, "fetch", lambda self, key, dest: fetched.append(key) or real_fetch(self, key, dest))

    path = storage.resolve_model(f"{output}/latest")
    assert path == tmp_path / "cache" / "s3" / bucket / "exp" / "runs" / "a"
    assert {k: v for k, v in local_files(path).items() if k != "manifest.json"} == local_files(run_a)
    assert len(fetched) == 7
    assert storage.resolve_model(f"{output}/runs/a") == path and len(fetched) == 7  # cached

    run_b = make_run(tmp_path / "b", seed=1)
    storage.publish(run_b, output, "b", manifest_extra=extra())
    path_b = storage.resolve_model(f"{output}/latest")
    assert path_b.name == "b" and len(fetched) == 14
    assert {k: v for k, v in local_files(path_b).items() if k != "manifest.json"} == local_files(run_b)
    (path_b / "model.keras").write_bytes(b"truncated")  # a damaged cache is fetched again
    assert storage.resolve_model(f"{output}/runs/b") == path_b and len(fetched) == 21
    assert (path_b / "model.keras").read_bytes() == (run_b / "model.keras").read_bytes()


def test_open_input_reads_dataset_files(s3_server, bucket):
    data = gzip.compress(os.urandom(100_000))
    s3_server.client().put_object(Bucket=bucket, Key="datasets/mnist/t10k-labels-idx1-ubyte.gz", Body=data)
    uri = f"s3://{bucket}/datasets/mnist/t10k-labels-idx1-ubyte.gz"
    with storage.open_input(uri) as f, gzip.open(f) as g:
        assert g.read() == gzip.decompress(data)
    assert storage.read_bytes(uri) == data
    with pytest.raises(StorageError, match="does not exist"):
        storage.open_input(f"s3://{bucket}/datasets/mnist/missing.gz")
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(f"s3://{bucket}-none/x.gz")


def test_arrow_filesystem_writes_where_boto3_reads(s3_server, bucket):
    fs, path = storage.arrow_filesystem(storage.checkpoints_uri(f"s3://{bucket}/exp"))
    assert path == f"{bucket}/exp/checkpoints"
    payload = os.urandom(3 * 1024 * 1024)
    with fs.open_output_stream(f"{path}/r1/checkpoint_000001/model.weights.h5") as f:
        f.write(payload)
    body = s3_server.client().get_object(Bucket=bucket, Key="exp/checkpoints/r1/checkpoint_000001/model.weights.h5")
    assert body["Body"].read() == payload
    with fs.open_input_stream(f"{path}/r1/checkpoint_000001/model.weights.h5") as f:
        assert f.read() == payload
    import pyarrow.fs as pafs

    listed = fs.get_file_info(pafs.FileSelector(f"{path}/r1", recursive=True))
    assert [i.path for i in listed if i.type == pafs.FileType.File] == [f"{path}/r1/checkpoint_000001/model.weights.h5"]
    with pytest.raises(StorageError, match="does not exist"):
        storage.arrow_filesystem(f"s3://{bucket}-none/x")


def test_object_store_reads_what_boto3_wrote(s3_server, bucket):
    import obstore

    payload = os.urandom(300_000)
    s3_server.client().put_object(Bucket=bucket, Key="data/train/a/1.jpg", Body=payload)
    store, prefix = storage.object_store(f"s3://{bucket}/data")
    assert prefix == "data"
    assert obstore.get(store, "data/train/a/1.jpg").bytes().to_bytes() == payload
    with pytest.raises(FileNotFoundError, match="data/train/a/2.jpg"):
        obstore.get(store, "data/train/a/2.jpg")
    with pytest.raises(StorageError, match="does not exist"):
        storage.object_store(f"s3://{bucket}-none/x")


def test_everything_stays_on_loopback(s3_server, bucket, tmp_path):
    """The server's listeners and every connection of this process tree (server included) are on
    127.0.0.1 through a publish, a restart, a download, pyarrow and obstore traffic."""
    import obstore
    from netwatch import LoopbackWatch

    output = f"s3://{bucket}/exp"
    with LoopbackWatch(os.getpid(), interval=0.2) as watch:
        storage.publish(make_run(tmp_path / "run", big=BIG), output, "r1", manifest_extra=extra())
        s3_server.restart()
        storage.download_run(f"{output}/latest", tmp_path / "dl")
        fs, path = storage.arrow_filesystem(output)
        with fs.open_input_stream(f"{path}/latest.json") as f:
            f.read()
        store, prefix = storage.object_store(output)
        obstore.get(store, f"{prefix}/latest.json").bytes()
        watch.sample()
    assert watch.sockets_seen > 0 and not watch.violations, sorted(watch.violations)


# -- TLS ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server():
    with S3Server(tls=True) as server:
        yield server


def test_tls_verification_and_ca_bundle(tls_server, s3_env, monkeypatch, tmp_path):
    for name, value in tls_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = tls_server.create_bucket()
    output = f"s3://{bucket}/exp"
    result = storage.publish(make_run(tmp_path / "run"), output, "r1", manifest_extra=extra())
    assert result.promoted and result.run_uri.startswith("s3://")
    fs, path = storage.arrow_filesystem(output)
    with fs.open_input_stream(f"{path}/latest.json") as f:
        assert json.loads(f.read())["run"] == "r1"

    import pyarrow.fs as pafs  # pyarrow does verify: without the CA file the same read fails

    host = tls_server.endpoint.split("://")[1]
    bare = pafs.S3FileSystem(endpoint_override=host, scheme="https", region=tls_server.region, connect_timeout=5,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with pytest.raises(OSError):
        bare.open_input_stream(f"{path}/latest.json").read()

    import obstore  # obstore trusts the same CA bundle, and only with it
    from obstore.store import S3Store

    store, prefix = storage.object_store(output)
    assert json.loads(obstore.get(store, f"{prefix}/latest.json").bytes().to_bytes())["run"] == "r1"
    bare_store = S3Store(bucket, endpoint=tls_server.endpoint, region=tls_server.region,
                         access_key_id=tls_server.access_key, secret_access_key=tls_server.secret_key,
                         retry_config={"max_retries": 0})
    with pytest.raises(Exception, match="InvalidCertificate"):
        obstore.get(bare_store, f"{prefix}/latest.json")

    monkeypatch.delenv("AWS_CA_BUNDLE")  # verification stays on: the server's CA is unknown now
    with pytest.raises(StorageError, match=f"TLS verification of {tls_server.endpoint} failed.*AWS_CA_BUNDLE"):
        storage.list_runs(output)
    with pytest.raises(StorageError, match="TLS verification"):
        storage.arrow_filesystem(output)


def test_the_server_has_room_for_a_bucket_per_test_whatever_the_disk_has_free(s3_server, bucket):
    """Each bucket takes a volume of its own; left to itself `weed mini` allows free-disk/1 GiB of
    them, which stopped writes at the 13th bucket on a CI machine with little disk free."""
    import urllib.request

    status = json.load(urllib.request.urlopen(f"http://{s3_server.host}:{s3_server.ports['master']}/dir/status"))
    assert status["Topology"]["Max"] >= 1000  # 76 on a disk with 76 GiB free before the fix
