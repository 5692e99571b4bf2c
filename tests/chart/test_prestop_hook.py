"""The worker pods' preStop hook, run as the kubelet runs it (`/bin/sh -c`), with `ray` stubbed
and the pod's processes faked: how long it keeps a pod up decides how fast an idle cluster goes
away and whether a drained worker's checkpoint is safe before the pod stops. (The drain itself
runs on the real node: tests/e2e/test_rayjob_on_real_pods_faults.py.)"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from chartlib import CHART, rayjob_specs

pytestmark = pytest.mark.chart

GRACE = 15  # the schema's least: the hook waits at most GRACE - 10 = 5 s


@pytest.fixture(scope="module")
def hook(helm) -> tuple[str, dict]:
    """The worker hook's script and its container's env, for a grace period of GRACE seconds."""
    result = helm("template", "hook", str(CHART), "--set", f"workers.terminationGracePeriodSeconds={GRACE}")
    assert result.returncode == 0, result.stderr
    (_, spec), = rayjob_specs([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    container = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    return container["lifecycle"]["preStop"]["exec"]["command"], {e["name"]: e["value"] for e in container["env"]}


PROCESSES = "/proc/[0-9]*/cmdline"  # where the hook looks for a training worker in its pod


def run_hook(hook, tmp_path, during=None) -> tuple[float, str]:
    """Run the hook with a `ray` that records its arguments and the pod's processes in
    tmp_path/proc (not this machine's, where other tests may be training); `during` runs once
    `ray drain-node` has been called. Returns (seconds the hook took, what `ray` was called with)."""
    command, env = hook
    assert PROCESSES in command[-1]
    script = command[-1].replace(PROCESSES, f"{tmp_path}/proc/[0-9]*/cmdline")
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "ray").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/ray-args\n')
    (stub / "ray").chmod(0o755)
    marker = tmp_path / "marker"
    marker.touch()  # a stale marker from an earlier drain must not end this one's wait
    started = time.monotonic()
    process = subprocess.Popen([*command[:-1], script], env={
        **os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "HOSTNAME": "worker-0",
        "ALEXNET_JOB_PREEMPTION_MARKER": str(marker)})
    if during:
        while not (tmp_path / "ray-args").exists() and process.poll() is None:
            time.sleep(0.05)
        during(marker)
    process.wait(timeout=GRACE)
    return time.monotonic() - started, (tmp_path / "ray-args").read_text()


def fake_process(tmp_path, pid: int, *argv: str) -> None:
    (tmp_path / "proc" / str(pid)).mkdir(parents=True)
    (tmp_path / "proc" / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


@pytest.fixture
def training_worker(tmp_path):
    """The pod's processes: `ray start`, its raylet, and a Ray Train worker (as Ray names it)."""
    fake_process(tmp_path, 1, "/usr/bin/python", "/usr/local/bin/ray", "start", "--block")
    fake_process(tmp_path, 40, "/ray/core/src/ray/raylet/raylet", "--node_ip_address=10.0.0.2")
    fake_process(tmp_path, 112, "ray::RayTrainWorker.run_train_fn")


@pytest.fixture
def idle_pod(tmp_path):
    fake_process(tmp_path, 1, "/usr/bin/python", "/usr/local/bin/ray", "start", "--block")
    fake_process(tmp_path, 40, "/ray/core/src/ray/raylet/raylet", "--node_ip_address=10.0.0.2")


def test_the_chart_names_the_marker_the_worker_writes(hook):
    assert hook[1]["ALEXNET_JOB_PREEMPTION_MARKER"] == "/tmp/alexnet-job-preemption-checkpoint"


def test_it_drains_the_pods_ray_node_as_preempted(hook, tmp_path):
    _, called = run_hook(hook, tmp_path)
    assert called.split()[:3] == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION"], called
    assert "terminating pod worker-0" in called and f"--deadline-remaining-seconds {GRACE - 5}" in called, called


def test_a_pod_with_no_training_worker_goes_at_once(hook, tmp_path, idle_pod):
    took, _ = run_hook(hook, tmp_path)
    assert took < 2, took


def test_a_training_pod_waits_for_the_checkpoint_then_a_little_more(hook, tmp_path, training_worker):
    took, _ = run_hook(hook, tmp_path, during=lambda marker: (time.sleep(1), marker.touch()))
    # Saved 1 s after the drain, then 5 s for Ray Train's controller to collect the report; not the full wait.
    assert 6 <= took < 8.5, took


def test_a_training_pod_with_no_checkpoint_waits_out_its_share_of_the_grace_period(hook, tmp_path, training_worker):
    took, _ = run_hook(hook, tmp_path)
    assert GRACE - 10 <= took < GRACE - 5, took
