"""job.storage with a local output folder: publish, latest.json, list, show, download, resolve."""

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from job import storage
from support import make_run_folder
from job.storage import StorageError, gate
from job.storage.stores import LocalStore


def make_run(root: Path, seed: int = 0, big: int = 3_000_000) -> Path:
    return make_run_folder(root, seed, big)


def extra(acc: float | None = 0.9) -> dict:
    return {"metrics": {} if acc is None else {"test_accuracy": acc}, "start_time": "t0", "end_time": "t1"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "artifacts" / "r1")


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_publish_layout_and_manifest(run_dir, out):
    seen = []
    result = storage.publish(run_dir, str(out), "r1", manifest_extra=extra(0.9),
                             progress=lambda key, done, total: seen.append((key, done, total)))
    dest = out / "runs" / "r1"
    assert result.run_uri == str(dest) and result.promoted and result.latest == "r1" and result.uploaded == 7
    assert sorted(k for k, _, _ in seen) == sorted(tree(run_dir)) and [d for _, d, _ in seen] == list(range(1, 8))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["key"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in tree(run_dir).items()}
    assert manifest["metrics"] == {"test_accuracy": 0.9} and manifest["end_time"] == "t1"
    assert manifest["promotion"]["promoted"] and manifest["promotion"]["reason"] == "no latest run yet"
    assert {k: v for k, v in tree(dest).items() if k != "manifest.json"} == tree(run_dir)
    latest = json.loads((out / "latest.json").read_text())
    assert latest["run"] == "r1" and latest["manifest"] == "runs/r1/manifest.json"
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]  # no staging left
    assert storage.run_state(str(out), "r1") == "complete"
    assert storage.run_state(str(out), "r2") == "absent"


def test_republish_is_idempotent(run_dir, out):
    storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    before = tree(out)
    again = storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    assert again.already_complete and again.uploaded == 0 and again.promoted and again.latest == "r1"
    assert tree(out) == before
    (run_dir / "model.keras").write_bytes(b"changed")
    with pytest.raises(StorageError, match="already published .* with other files"):
        storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    assert tree(out) == before


def test_promotion_gate_both_ways(tmp_path, out):
    first = storage.publish(make_run(tmp_path / "a"), str(out), "a", manifest_extra=extra(0.95),
                            promote_if_better="test_accuracy:0.01")
    assert first.promoted
    worse = storage.publish(make_run(tmp_path / "b"), str(out), "b", manifest_extra=extra(0.93),
                            promote_if_better="test_accuracy:0.01")
    assert not worse.promoted and worse.latest == "a"
    assert "latest.json unchanged" in worse.message and "0.93 < 0.95 - 0.01" in worse.message
    assert json.loads((out / "latest.json").read_text())["run"] == "a"
    record = storage.show_run(str(out / "runs" / "b"))["promotion"]
    assert record == {"gate": "test_accuracy:0.01", "latest_run": "a", "metric": "test_accuracy", "tolerance": 0.01,
                      "value": 0.93, "latest_value": 0.95, "promoted": False, "reason": record["reason"]}
    within = storage.publish(make_run(tmp_path / "c"), str(out), "c", manifest_extra=extra(0.941),
                             promote_if_better="test_accuracy:0.01")
    assert within.promoted and json.loads((out / "latest.json").read_text())["run"] == "c"
    assert storage.show_run(str(out / "latest"))["promotion"]["latest_value"] == 0.95
    # the rejected run is complete and listed, just not latest
    rows = {r.run: r for r in storage.list_runs(str(out))}
    assert rows["b"].complete and not rows["b"].latest and rows["c"].latest


def test_gate_needs_the_metric(run_dir, out):
    with pytest.raises(StorageError, match="needs metric 'test_accuracy'"):
        storage.publish(run_dir, str(out), "r1", manifest_extra=extra(None), promote_if_better="test_accuracy")
    assert not out.exists()


def test_without_gate_latest_only_moves_forward(tmp_path, out):
    storage.publish(make_run(tmp_path / "a"), str(out), "a", manifest_extra=extra())
    storage.publish(make_run(tmp_path / "b"), str(out), "b", manifest_extra=extra())
    # re-publishing the older run does not move latest back
    again = storage.publish(tmp_path / "a", str(out), "a", manifest_extra=extra())
    assert again.already_complete and not again.promoted and again.latest == "b"
    assert json.loads((out / "latest.json").read_text())["run"] == "b"


def test_republish_finishes_an_interrupted_latest_move(run_dir, out, monkeypatch):
    """The manifest is written, then the process dies before latest.json moves: publishing again moves it."""
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalStore, "write_if", die)
    with pytest.raises(KeyboardInterrupt):
        storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    assert storage.run_state(str(out), "r1") == "complete" and not (out / "latest.json").exists()
    monkeypatch.undo()
    result = storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    assert result.already_complete and result.promoted
    assert json.loads((out / "latest.json").read_text())["run"] == "r1"


def test_interrupted_copy_leaves_nothing_complete(tmp_path, out):
    storage.publish(make_run(tmp_path / "a"), str(out), "a", manifest_extra=extra())
    run = make_run(tmp_path / "b")
    script = (
        "import os, sys; from job import storage\n"
        "def stop(key, done, total):\n"
        "    if done == 3: os._exit(17)\n"
        "storage.publish(sys.argv[1], sys.argv[2], 'b', manifest_extra={}, progress=stop)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(run), str(out)], cwd=Path(__file__).parents[2])
    assert proc.returncode == 17
    assert storage.run_state(str(out), "b") == "absent"  # the copy is a hidden sibling until renamed
    assert json.loads((out / "latest.json").read_text())["run"] == "a"
    assert [r.run for r in storage.list_runs(str(out))] == ["a"]
    with pytest.raises(StorageError, match="does not exist"):
        storage.show_run(str(out / "runs" / "b"))
    assert len(list((out / "runs").glob(".b.partial-*"))) == 1
    assert storage.publish(run, str(out), "b", manifest_extra=extra()).promoted
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["a", "b"]  # the interrupted copy is gone


def test_publish_in_place_and_incomplete_folders(tmp_path, out):
    """Files already in <output>/runs/<run> (written there by training) get a manifest in place."""
    dest = make_run(out / "runs" / "r1")
    (dest / "manifest.json").unlink(missing_ok=True)
    assert storage.run_state(str(out), "r1") == "incomplete"
    assert [(r.run, r.complete) for r in storage.list_runs(str(out))] == [("r1", False)]
    with pytest.raises(StorageError, match="is incomplete"):
        storage.download_run(str(dest), tmp_path / "dl")
    with pytest.raises(StorageError, match="is incomplete"):
        storage.resolve_model(str(dest))
    before = tree(dest)
    result = storage.publish(dest, str(out), "r1", manifest_extra=extra())
    assert result.uploaded == 0 and result.promoted and storage.run_state(str(out), "r1") == "complete"
    assert {k: v for k, v in tree(dest).items() if k != "manifest.json"} == before


def test_download_verifies_and_refuses(tmp_path, run_dir, out):
    storage.publish(run_dir, str(out), "r1", manifest_extra=extra())
    got = storage.download_run(str(out / "latest"), tmp_path / "dl")
    assert {k: v for k, v in tree(got).items() if k != "manifest.json"} == tree(run_dir)
    with pytest.raises(StorageError, match="not an empty directory"):
        storage.download_run(str(out / "runs" / "r1"), got)
    (out / "runs" / "r1" / "saved_model" / "1" / "saved_model.pb").write_bytes(b"tampered")
    with pytest.raises(StorageError, match="saved_model.pb does not match its manifest"):
        storage.download_run(str(out / "runs" / "r1"), tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".dl2")]
    for bad in (str(out / "runs" / "nope"), str(out)):
        with pytest.raises(StorageError):
            storage.download_run(bad, tmp_path / "dl3")


def test_resolve_model_locally(tmp_path, out):
    storage.publish(make_run(tmp_path / "a"), str(out), "a", manifest_extra=extra())
    assert storage.resolve_model(str(out / "latest")) == out / "runs" / "a"
    assert storage.resolve_model(str(out / "runs" / "a")) == out / "runs" / "a"
    copy = storage.download_run(str(out / "runs" / "a"), tmp_path / "copy")
    assert storage.resolve_model(str(copy)) == copy  # any folder with a manifest
    with pytest.raises(StorageError, match="latest.json does not exist"):
        storage.resolve_model(str(tmp_path / "empty" / "latest"))
    with pytest.raises(StorageError, match="is not a run"):
        storage.resolve_model(str(tmp_path / "a"))


def test_list_runs_and_errors(tmp_path, out):
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_runs(str(out))
    storage.publish(make_run(tmp_path / "a"), str(out), "a", manifest_extra=extra(0.5))
    storage.publish(make_run(tmp_path / "b"), str(out), "b", manifest_extra=extra(0.7))
    rows = storage.list_runs(str(out))
    assert [(r.run, r.complete, r.latest, r.test_accuracy) for r in rows] == [("a", True, False, 0.5), ("b", True, True, 0.7)]
    assert rows[0].time < rows[1].time


def test_unwritable_output_is_a_storage_error(run_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot create"):
        storage.publish(run_dir, str(blocker / "out"), "r1", manifest_extra=extra())
    with pytest.raises(StorageError, match="does not exist or is not a directory"):
        storage.publish(tmp_path / "missing", str(tmp_path / "o"), "r1", manifest_extra=extra())


def test_no_credentials_in_manifests(run_dir, out, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    with pytest.raises(StorageError, match="contains an AWS secret key") as error:
        storage.publish(run_dir, str(out), "r1", manifest_extra={"env": {"k": "s3cr3t-value-123"}})
    assert "s3cr3t" not in str(error.value)
    assert storage.run_state(str(out), "r1") == "absent"


def test_racing_publishes_do_not_clobber_latest(tmp_path, out, monkeypatch):
    """Both read latest.json before either writes; the older run then writes last. The lock +
    tag check must turn that into a re-read and a refusal, not an overwrite."""
    older, newer = make_run(tmp_path / "older", 1), make_run(tmp_path / "newer", 2)
    storage.publish(make_run(tmp_path / "base", 0), str(out), "base", manifest_extra=extra())
    barrier = threading.Barrier(2, timeout=30)
    reads = {"older": 0, "newer": 0}
    real_read, real_write_if = gate.read_latest, LocalStore.write_if

    def read_latest(store):
        current = real_read(store)
        name = threading.current_thread().name
        reads[name] += 1
        if reads[name] == 1:
            barrier.wait()  # both have read the same latest.json
        return current

    def write_if(self, key, data, tag):
        if threading.current_thread().name == "older":
            time.sleep(0.5)  # the newer run writes first
        return real_write_if(self, key, data, tag)

    monkeypatch.setattr(gate, "read_latest", read_latest)  # where move_latest reads it
    monkeypatch.setattr(LocalStore, "write_if", write_if)
    results = {}

    def go(name, path):
        if name == "newer":
            time.sleep(0.05)  # publish time orders the runs: "older" takes its publish time first
        results[name] = storage.publish(path, str(out), name, manifest_extra=extra())

    threads = [threading.Thread(target=go, args=(n, p), name=n) for n, p in (("older", older), ("newer", newer))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert json.loads((out / "latest.json").read_text())["run"] == "newer"
    assert results["newer"].promoted and not results["older"].promoted and results["older"].latest == "newer"
    assert reads["older"] == 2  # it lost the conditional write and read again
    assert storage.show_run(str(out / "runs" / "older"))["promotion"]["reason"] == "latest run 'newer' is newer"
    assert all(storage.run_state(str(out), n) == "complete" for n in ("older", "newer", "base"))
