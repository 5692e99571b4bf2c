"""Scheduled retraining on real pods: the controller-manager fires the chart's CronJob; its pod
runs in a real container on the real node and, with its ServiceAccount token (in-cluster config,
through the `kubernetes` Service), creates a uniquely named RayJob from the chart's template,
waits for it, and sends its run through the promotion gate. The RayJob trains on real pods.

The bucket already has a better current model (`champion`, test accuracy 0.999): the night's run
must be published complete but not promoted, and the manifest must say why."""

from __future__ import annotations

import json

import pytest

from e2elib import CHART, wait_until
from realpods import MODELS, VALUES, bridge_s3, read_json

pytestmark = pytest.mark.e2e

NS = "sched-real"
RELEASE = "nightly-real"
FULLNAME = f"{RELEASE}-alexnet-train"
RETRAIN = f"{FULLNAME}-retrain"
CHAMPION = {"manifest_version": 1, "run": "champion", "published_at": "2026-12-01T02:00:00+00:00",
            "files": [], "total_bytes": 0, "metrics": {"test_accuracy": 0.999}, "promotion": None}


@pytest.fixture(scope="module")
def night(e2e, tmp_path_factory, mnist_dir):
    from kubernetes import client
    with bridge_s3(e2e, tmp_path_factory.mktemp("s3-sched"), mnist_dir, NS) as (s3, values, watch):
        s3.client().put_object(Bucket=MODELS, Key="runs/champion/manifest.json", Body=json.dumps(CHAMPION).encode())
        s3.client().put_object(Bucket=MODELS, Key="latest.json",
                               Body=json.dumps({"run": "champion", "manifest": "runs/champion/manifest.json"}).encode())
        batch = client.BatchV1Api(e2e.api())
        try:
            e2e.helm("install", RELEASE, CHART, "-n", NS, "-f", VALUES, *values,
                     "--set", "schedule=* * * * *", "--set", "cron.keep=1")
            fired = wait_until("the CronJob to fire a Job", lambda: [
                j for j in batch.list_namespaced_job(NS).items
                if any(o.kind == "CronJob" and o.name == RETRAIN for o in j.metadata.owner_references or [])],
                timeout=90)
            # One night is enough: no second Job once this one ends.
            batch.patch_namespaced_cron_job(RETRAIN, NS, {"spec": {"suspend": True}})
            name = fired[0].metadata.name
            job = wait_until("the schedule's Job to end", lambda: (j := batch.read_namespaced_job(name, NS)).status
                             and (j.status.succeeded or j.status.failed) and j, timeout=900, interval=2)
            yield {"s3": s3, "job": job}
        finally:
            e2e.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m", check=False, timeout=400)


def schedule_pod(e2e, job):
    from kubernetes import client
    core = client.CoreV1Api(e2e.api())
    (pod,) = core.list_namespaced_pod(NS, label_selector=f"job-name={job.metadata.name}").items
    return core, pod


def test_the_schedules_pod_ran_on_the_real_node_with_its_serviceaccount(e2e, night):
    core, pod = schedule_pod(e2e, night["job"])
    logs = core.read_namespaced_pod_log(pod.metadata.name, NS)
    assert night["job"].status.succeeded == 1, logs[-3000:]
    assert pod.spec.node_name == e2e.node.name
    assert pod.spec.service_account_name == RETRAIN
    status = pod.status.container_statuses[0]
    assert status.state.terminated.exit_code == 0 and status.image_id, status


def test_its_rayjob_trained_on_real_pods_and_went_through_the_gate(e2e, night):
    from kubernetes import client
    custom = client.CustomObjectsApi(e2e.api())
    (rayjob,) = [job for job in custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]
                 if job["metadata"]["name"].startswith(f"{FULLNAME}-")]
    name = rayjob["metadata"]["name"]
    assert (rayjob["status"]["jobDeploymentStatus"], rayjob["status"]["jobStatus"]) == ("Complete", "SUCCEEDED")
    workers = client.CoreV1Api(e2e.api()).list_namespaced_pod(NS, label_selector="ray.io/node-type=worker").items
    assert {p.spec.node_name for p in workers} == {e2e.node.name} and len(workers) == 2
    s3 = night["s3"]
    manifest = read_json(s3, f"runs/{name}/manifest.json")   # the run is named after its RayJob
    assert manifest is not None, f"runs/{name} was not published"
    promotion = manifest["promotion"]
    assert (promotion["metric"], promotion["latest_run"]) == ("test_accuracy", "champion"), promotion
    assert promotion["promoted"] is False and "0.999" in promotion["reason"], promotion
    assert read_json(s3, "latest.json")["run"] == "champion"
    _, pod = schedule_pod(e2e, night["job"])
    logs = client.CoreV1Api(e2e.api()).read_namespaced_pod_log(pod.metadata.name, NS)
    assert f"submitted RayJob {name}" in logs and f"{name}: Complete job SUCCEEDED" in logs, logs[-3000:]
