"""Runs that lose a worker or their driver finish from their checkpoints, published once.

Real processes, killed for real: SIGKILL to one Ray Train worker mid-epoch, and SIGKILL to
the driver's whole process tree (a node gone) followed by the same command again, which is
what a RayJob retry does. Checkpoints of the second live on the SeaweedFS server. A worker
stuck for real (its compute threads stopped) meets the step watchdog; a deadline stops a run
that the same command then resumes.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from freeze import frozen_threads
from support import FLOAT32, ROOT, TUTORIAL_RECIPE, run_cli, write_digit_pngs

pytestmark = pytest.mark.integration


def train_args(mnist_dir, output, run_name):
    return ["train", "--data", str(mnist_dir), "--workers", "2", "--epochs", "3", "--train-limit", "6000",
            "--test-limit", "2000", *TUTORIAL_RECIPE, *FLOAT32, "--output", str(output), "--run-name", run_name]


def start(args, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "job.cli", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def latest_checkpoint(snapshot_text):
    """Metrics of the newest checkpoint Ray Train has registered (persisted and recorded), or None."""
    if not snapshot_text:
        return None
    latest = json.loads(snapshot_text).get("latest_checkpoint_result")
    return latest and latest["metrics"]


def local_snapshot(run_folder):
    path = run_folder / "checkpoint_manager_snapshot.json"
    return path.read_text() if path.is_file() else None


def training_workers(process):
    return [p for p in psutil.Process(process.pid).children(recursive=True) if p.name().startswith("ray::RayTrainWorker")]


def finish(process, log_path, timeout=900, expect=0):
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert code == expect, open(log_path).read()[-4000:]


def ended(process):
    """True once a psutil.Process has exited (a zombie has: only its exit status is left)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    """The same run, never interrupted: what the interrupted ones should end close to."""
    output = tmp_path_factory.mktemp("reference")
    result = run_cli(*train_args(mnist_dir, output, "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "runs" / "reference" / "metrics.json").read_text())


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(mnist_dir, tmp_path, reference):
    log = tmp_path / "train.log"
    process = start(train_args(mnist_dir, tmp_path, "worker-killed"), log)
    checkpoints = tmp_path / "checkpoints" / "worker-killed"
    wait_for(lambda: latest_checkpoint(local_snapshot(checkpoints)), 600, "the first epoch's checkpoint")
    time.sleep(2)  # into epoch 2
    victims = training_workers(process)
    assert len(victims) == 2
    victims[1].send_signal(signal.SIGKILL)
    finish(process, log)

    metrics = json.loads((tmp_path / "runs" / "worker-killed" / "metrics.json").read_text())
    attempts = metrics["attempts"]
    assert len(attempts) == 2, attempts
    assert "died" in attempts[0]["error"] and attempts[0]["failed_at"] > attempts[0]["started_at"]
    assert attempts[1]["resumed_from"] == {"epoch": 1, "step": 0}  # from the checkpoint, not from scratch
    assert "error" not in attempts[1]
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]  # no epoch trained twice in the record
    assert abs(metrics["test_accuracy"] - reference["test_accuracy"]) < 0.015, (metrics["test_accuracy"],
                                                                                 reference["test_accuracy"])


def test_mid_epoch_checkpoints_bound_the_work_lost(mnist_dir, tmp_path):
    log = tmp_path / "train.log"
    args = train_args(mnist_dir, tmp_path, "steps") + ["--checkpoint-every-steps", "20", "--epochs", "2"]
    process = start(args, log)
    state = tmp_path / "checkpoints" / "steps"
    wait_for(lambda: (latest_checkpoint(local_snapshot(state)) or {}).get("step"), 600, "a mid-epoch checkpoint")
    training_workers(process)[0].send_signal(signal.SIGKILL)
    finish(process, log)
    metrics = json.loads((tmp_path / "runs" / "steps" / "metrics.json").read_text())
    resumed = metrics["attempts"][1]["resumed_from"]
    assert resumed["epoch"] == 0 and resumed["step"] in (20, 40, 60, 80), resumed  # inside epoch 1
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert metrics["test_accuracy"] > 0.85


def test_a_worker_stuck_alive_is_ended_by_the_step_watchdog_and_the_group_restarts(mnist_dir, tmp_path):
    """A hung GPU, for real: one worker's compute threads stop while its heartbeats and Ray's
    health checks still answer, so without the watchdog every all-reduce waits forever."""
    log = tmp_path / "train.log"
    args = train_args(mnist_dir, tmp_path, "stuck") + ["--epochs", "1", "--checkpoint-every-steps", "10",
                                                       "--step-timeout", "20"]
    process = start(args, log)
    state = tmp_path / "checkpoints" / "stuck"
    wait_for(lambda: (latest_checkpoint(local_snapshot(state)) or {}).get("step"), 600, "a mid-epoch checkpoint")
    stuck = training_workers(process)[1]
    with frozen_threads(stuck.pid, "tf_Compute"):
        finish(process, log, timeout=420)
        assert ended(stuck), "the stuck worker outlived the run"

    metrics = json.loads((tmp_path / "runs" / "stuck" / "metrics.json").read_text())
    attempts = metrics["attempts"]
    assert len(attempts) == 2, attempts
    assert "no training step finished for 20 s: a peer is silent or stuck" in attempts[0]["error"], attempts[0]
    assert attempts[1]["resumed_from"]["epoch"] == 0 and attempts[1]["resumed_from"]["step"] >= 10, attempts[1]
    assert "error" not in attempts[1]
    assert ("no training step finished for 20 s: a peer is silent or stuck; failing this worker so Ray "
            "restarts the group from the last checkpoint") in log.read_text()


def test_a_deadline_stops_the_run_keeps_its_checkpoint_and_the_same_command_resumes(mnist_dir, tmp_path):
    log = tmp_path / "train.log"
    # 12 epochs of about 9 s (more on a busy machine) after 30-90 s of start-up (measured): the
    # deadline falls after the first checkpoint and well before the end either way.
    args = train_args(mnist_dir, tmp_path, "deadline") + ["--epochs", "12", "--checkpoint-every-steps", "20"]
    process = start(args + ["--deadline-seconds", "100"], log)
    wait_for(lambda: latest_checkpoint(local_snapshot(tmp_path / "checkpoints" / "deadline")), 100,
             "a checkpoint before the deadline")
    workers = training_workers(process)
    session = process.pid
    finish(process, log, timeout=300, expect=1)

    output = log.read_text()
    stopped = re.findall(r"^alexnet-job: deadline of 100 s reached at epoch (\d+); the last checkpoint is kept; "
                         r"run the same command again to resume$", output, re.M)
    assert len(stopped) == 1, output[-3000:]
    assert not re.search(r"^Traceback", output, re.M), output[-3000:]  # Ray's actors may log theirs, prefixed
    assert not (tmp_path / "runs" / "deadline" / "manifest.json").exists() and not (tmp_path / "latest.json").exists()
    wait_for(lambda: all(ended(worker) for worker in workers), 30, "the training workers to end")
    wait_for(lambda: not [p for p in psutil.process_iter() if _session(p) == session], 30,
             "every process the command started to end")

    finish(start(args, tmp_path / "again.log"), tmp_path / "again.log")
    metrics = json.loads((tmp_path / "runs" / "deadline" / "metrics.json").read_text())
    attempts = metrics["attempts"]
    assert len(attempts) == 2 and attempts[0]["error"].startswith("deadline of 100 s reached"), attempts
    resumed = attempts[1]["resumed_from"]
    assert resumed is not None and resumed["epoch"] + 1 == int(stopped[0]), (resumed, stopped)
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, 13))
    assert json.loads((tmp_path / "latest.json").read_text())["run"] == "deadline"


def _session(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def test_a_killed_driver_resumes_from_s3_when_run_again_and_publishes_once(
        mnist_dir, tmp_path, s3_server, s3_env, bucket):
    output = f"s3://{bucket}/team"
    args = train_args(mnist_dir, output, "driver-killed")
    client = s3_server.client()

    def checkpoint_in_s3():
        try:
            snapshot = client.get_object(Bucket=bucket, Key="team/checkpoints/driver-killed/checkpoint_manager_snapshot.json")
        except client.exceptions.NoSuchKey:
            return None
        return latest_checkpoint(snapshot["Body"].read().decode())

    process = start(args, tmp_path / "first.log")
    wait_for(checkpoint_in_s3, 600, "a checkpoint on the S3 server")
    time.sleep(2)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:  # the whole machine's share of the job goes at once, as when a node dies
        with contextlib.suppress(psutil.NoSuchProcess):  # one that ended since the listing is gone already
            member.kill()
    psutil.wait_procs(tree, timeout=30)
    state = run_cli("runs", "list", output)
    assert state.returncode == 0, state.stderr
    # Not published: listed from its progress record, as training until the record is 2 minutes
    # old (nothing can tell a dead run from a slow one sooner), with no test accuracy.
    (row,) = [line for line in state.stdout.splitlines() if line.startswith("driver-killed ")]
    assert re.fullmatch(r"driver-killed +- +- +(training|stopped) epoch [1-3]/3 step \d+/84.*", row), row

    again = start(args, tmp_path / "second.log")
    finish(again, tmp_path / "second.log")
    metrics = json.loads(run_cli("runs", "show", f"{output}/latest").stdout)
    assert metrics["run"] == "driver-killed" and metrics["metrics"]["test_accuracy"] > 0.9
    published = json.loads(client.get_object(Bucket=bucket, Key="team/runs/driver-killed/metrics.json")["Body"].read())
    attempts = published["attempts"]
    assert len(attempts) == 2 and attempts[0]["error"].startswith("stopped without a recorded failure")
    assert attempts[1]["resumed_from"]["epoch"] >= 1
    assert [r["epoch"] for r in published["history"]] == [1, 2, 3]

    # The published run is what users get: list, download (verified), predict from "latest".
    listing = run_cli("runs", "list", output)
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith("driver-killed"))
    assert "complete" in row and "latest" in row and f"{published['test_accuracy']:.4f}" in row
    download = run_cli("runs", "download", f"{output}/runs/driver-killed", tmp_path / "copy")
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "copy" / "model.keras").is_file() and (tmp_path / "copy" / "manifest.json").is_file()
    paths, labels = write_digit_pngs(mnist_dir, tmp_path, 10)
    predicted = run_cli("predict", f"{output}/latest", *paths, "--output", "json",
                        env={"ALEXNET_JOB_CACHE": str(tmp_path / "cache")})
    assert predicted.returncode == 0, predicted.stderr
    top = [p["top"][0]["index"] for p in json.loads(predicted.stdout)]
    assert sum(t == y for t, y in zip(top, labels)) >= 9

    # Running it once more neither trains nor publishes again.
    before = client.head_object(Bucket=bucket, Key="team/runs/driver-killed/manifest.json")["ETag"]
    rerun = run_cli(*args)
    assert rerun.returncode == 0 and "not training it again" in rerun.stdout
    assert client.head_object(Bucket=bucket, Key="team/runs/driver-killed/manifest.json")["ETag"] == before


@pytest.fixture
def ray_cluster(tmp_path):
    """A head and three 1-CPU worker nodes on loopback (one spare for the node that goes), whose
    training workers mark a preemption checkpoint in info["marker"] as the chart's pods do."""
    marker = tmp_path / "preemption-checkpoint"
    helper = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "raycluster.py"), "3"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "ALEXNET_JOB_PREEMPTION_MARKER": str(marker)})
    info = json.loads(helper.stdout.readline())
    info["marker"] = marker
    info["command"] = lambda line: (helper.stdin.write(line + "\n"), helper.stdin.flush(), helper.stdout.readline())
    yield info
    helper.stdin.write("shutdown\n")
    helper.stdin.flush()
    helper.wait(120)


def test_a_drained_node_gets_a_checkpoint_before_it_goes(mnist_dir, tmp_path, ray_cluster):
    """What a Kubernetes eviction does through the worker pod's preStop hook: drain, then kill."""
    log = tmp_path / "train.log"
    args = train_args(mnist_dir, tmp_path, "drained") + ["--address", ray_cluster["address"],
                                                          "--preemption-check-steps", "5"]
    process = start(args, log)
    checkpoints = tmp_path / "checkpoints" / "drained"
    wait_for(lambda: latest_checkpoint(local_snapshot(checkpoints)), 600, "the first epoch's checkpoint")
    raylet_to_node = {pid: node for node, pid in ray_cluster["nodes"].items()}
    workers = [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("ray::RayTrainWorker")]
    doomed = next(raylet_to_node[w.ppid()] for w in workers if w.ppid() in raylet_to_node)

    drain = subprocess.run([str(ROOT / ".venv" / "bin" / "ray"), "drain-node", "--address", ray_cluster["address"],
                            "--node-id", doomed, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message", "pod is being evicted", "--deadline-remaining-seconds", "60"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # keep 127.0.0.1 as is
    assert drain.returncode == 0, drain.stderr
    assert not ray_cluster["marker"].exists()
    wait_for(lambda: (latest_checkpoint(local_snapshot(checkpoints)) or {}).get("preemption"), 120,
             "the just-in-time checkpoint")
    saved_at = latest_checkpoint(local_snapshot(checkpoints))
    wait_for(ray_cluster["marker"].exists, 30, "the mark that lets the pod's preStop hook end early")
    ray_cluster["command"](f"kill {doomed}")
    finish(process, log)

    metrics = json.loads((tmp_path / "runs" / "drained" / "metrics.json").read_text())
    resumed = metrics["attempts"][-1]["resumed_from"]
    assert resumed == {"epoch": saved_at["epoch"], "step": saved_at["step"]} and resumed["step"] > 0, (resumed, saved_at)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert "preemption notice: checkpoint saved" in log.read_text()
