"""Faults on real pods, as a cluster causes them:

- a worker pod evicted mid-training through the eviction API (what `kubectl drain` does): the
  real kubelet runs the chart's preStop hook, which drains the pod's Ray node; the workers
  checkpoint at once; the pod goes, KubeRay replaces it, Ray Train resumes from that checkpoint,
  and exactly one complete run is published;
- a lost RayJob try (its submitter pod deleted, with no submitter retries left): KubeRay fails the
  try and retries the RayJob on a new Ray cluster, which resumes the run from its checkpoint in
  storage and publishes it once.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from e2elib import wait_until
from realpods import VALUES, bridge_s3, keys, read_json, worker_nodes

pytestmark = pytest.mark.e2e

# Long enough for a fault to land mid-training: 3 epochs of 192 steps (6144 examples, batch 32),
# about 20 s each on this node's pods. (With 1024 examples the run had finished before the evicted
# pod's hook ran.)
LONGER = ["--set", "training.train_limit=6144", "--set", "training.epochs=3"]


def latest_checkpoint(s3, run: str) -> dict | None:
    """Metrics of the newest checkpoint Ray Train has registered for the run (None before one)."""
    snapshot = read_json(s3, f"checkpoints/{run}/checkpoint_manager_snapshot.json")
    latest = (snapshot or {}).get("latest_checkpoint_result")
    return latest and latest["metrics"]


def published_once(s3, run: str) -> dict:
    """The run's metrics.json, after checking that exactly one complete run is there and latest.json names it."""
    manifests = [key for key in keys(s3, "runs/") if key.endswith("/manifest.json")]
    assert manifests == [f"runs/{run}/manifest.json"], manifests
    assert read_json(s3, "latest.json")["run"] == run
    return read_json(s3, f"runs/{run}/metrics.json")


@pytest.fixture(scope="module")
def evicted(e2e, tmp_path_factory, mnist_dir):
    """A run with a worker pod evicted as its second epoch starts (the first one's checkpoint saved)."""
    from kubernetes import client
    ns, name = "evict-real", "evicted"
    rayjob = f"{name}-alexnet-train"
    core = client.CoreV1Api(e2e.api())
    with bridge_s3(e2e, tmp_path_factory.mktemp("s3-evict"), mnist_dir, ns) as (s3, values, _):
        try:
            # The hook drains, then keeps the pod up to 30 s for the checkpoint (grace - 10).
            submitted = e2e.cli("submit", "-n", ns, "--name", name, "-f", VALUES, *values, *LONGER,
                                "--set", "training.preemption_check_steps=2",
                                "--set", "workers.terminationGracePeriodSeconds=40")
            assert submitted.returncode == 0, submitted.stderr
            wait_until("the first epoch's checkpoint", lambda: (latest_checkpoint(s3, rayjob) or {}).get("epoch") == 1,
                       timeout=600, interval=0.5)
            # The pod without rank 0: its worker's report returns before the chief's upload ends,
            # and its pod must still wait for that upload (job/worker.py's barrier).
            chief_ip = worker_nodes(s3, rayjob)[0]
            (victim,) = [p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="ray.io/node-type=worker").items
                         if p.status.pod_ip != chief_ip]
            core.create_namespaced_pod_eviction(victim, ns, {
                "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": ns}})
            evicted_at = time.time()
            # The hook holds the pod until the preemption checkpoint is saved, then it goes.
            wait_until("the evicted pod to go", lambda: victim not in {p.metadata.name for p in core.list_namespaced_pod(
                ns, label_selector="ray.io/node-type=worker").items}, timeout=60, interval=0.5)
            gone_after = time.time() - evicted_at
            waited = e2e.cli("wait", rayjob, "-n", ns, timeout=900)
            logs = e2e.cli("logs", rayjob, "-n", ns)
            workers = {p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="ray.io/node-type=worker").items}
        finally:
            # Now, not when the module ends: until its TTL runs out, the finished job's cluster
            # would hold the CPUs the next test's pods wait for (5 minutes of a CI run).
            e2e.cli("cancel", rayjob, "-n", ns)
        yield {"s3": s3, "rayjob": rayjob, "victim": victim, "gone_after": gone_after,
               "wait": waited, "logs": logs.stdout, "workers": workers}


def test_an_evicted_worker_pod_checkpoints_first_and_the_run_resumes_from_there(evicted):
    assert evicted["wait"].returncode == 0, evicted["wait"].stdout[-2000:] + evicted["logs"][-4000:]
    notice = re.search(r"preemption notice: checkpoint saved at epoch (\d+) step (\d+)", evicted["logs"])
    assert notice, evicted["logs"][-4000:]
    metrics = published_once(evicted["s3"], evicted["rayjob"])
    attempts = metrics["attempts"]
    assert len(attempts) == 2, attempts
    # The retry resumed from that checkpoint, mid-epoch 2 (the only mid-epoch one: checkpoint_every_steps is unset).
    epoch, step = int(notice[1]), int(notice[2])
    assert epoch == 2 and step > 0 and attempts[-1]["resumed_from"] == {"epoch": epoch - 1, "step": step}, attempts
    # The pod went once that checkpoint was saved, well before its 40 s grace period ran out.
    assert evicted["gone_after"] < 30, evicted["gone_after"]
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    workers = evicted["workers"]  # as the job ended
    assert evicted["victim"] not in workers and len(workers) == 2, workers   # KubeRay replaced the evicted pod


@pytest.fixture(scope="module")
def lost_try(e2e, tmp_path_factory, mnist_dir):
    """A run whose submitter pod is deleted once a checkpoint is in storage."""
    from kubernetes import client
    ns, name = "lost-try-real", "lost-try"
    rayjob = f"{name}-alexnet-train"
    api = e2e.api()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    with bridge_s3(e2e, tmp_path_factory.mktemp("s3-lost"), mnist_dir, ns) as (s3, values, _):
        try:
            submitted = e2e.cli("submit", "-n", ns, "--name", name, "-f", VALUES, *values, *LONGER,
                                "--set", "training.checkpoint_every_steps=5",
                                "--set", "job.submitter.backoffLimit=0", "--set", "job.backoffLimit=1",
                                "--set", "workers.terminationGracePeriodSeconds=30")
            assert submitted.returncode == 0, submitted.stderr
            saved = wait_until("a checkpoint in storage", lambda: latest_checkpoint(s3, rayjob), timeout=600, interval=1)
            first_cluster = custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", rayjob)["status"]["rayClusterName"]
            (submitter,) = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=submitter").items
            core.delete_namespaced_pod(submitter.metadata.name, ns)
            waited = e2e.cli("wait", rayjob, "-n", ns, timeout=900)
            status = custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", rayjob)["status"]
        finally:
            e2e.cli("cancel", rayjob, "-n", ns)
        yield {"s3": s3, "rayjob": rayjob, "saved": saved, "first_cluster": first_cluster, "status": status,
               "wait": waited}


def test_a_lost_rayjob_try_is_retried_on_a_new_cluster_that_resumes_the_run(e2e, lost_try):
    status = lost_try["status"]
    assert lost_try["wait"].returncode == 0, lost_try["wait"].stdout[-2000:] + json.dumps(status)
    assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Complete", "SUCCEEDED"), status
    assert status.get("failed") == 1 and status["rayClusterName"] != lost_try["first_cluster"], status
    metrics = published_once(lost_try["s3"], lost_try["rayjob"])
    resumed = metrics["attempts"][-1]["resumed_from"]
    saved = lost_try["saved"]
    # The retry resumed from the checkpoint in storage: the one seen before the fault, or a later one.
    assert resumed and (resumed["epoch"], resumed["step"]) >= (saved["epoch"], saved["step"]), (metrics["attempts"], saved)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
