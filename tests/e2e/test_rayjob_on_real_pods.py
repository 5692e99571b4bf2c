"""The users' main path on real pods: `alexnet-job submit --wait` with a values file for the real
node; KubeRay makes a Ray head and two worker pods from the image, the submitter pod runs the
chart's entrypoint, the two Ray Train workers train in different pods and the chief publishes the
run to a SeaweedFS on the pod bridge. Then `status`, `logs`, `wait`, `list`, `runs list` and
`predict` work on it as the README says."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from e2elib import CHART, wait_until
from realpods import MODELS, VALUES, bridge_s3, worker_nodes

sys.path.insert(0, str(CHART.parents[1] / "tests"))  # support
from support import write_digit_pngs  # noqa: E402

pytestmark = pytest.mark.e2e

NS = "train-real"
NAME = "real"
RAYJOB = f"{NAME}-alexnet-train"


@pytest.fixture(scope="module")
def trained(e2e, tmp_path_factory, mnist_dir):
    """One submitted run, trained on the real node and published to S3 on the pod bridge."""
    with bridge_s3(e2e, tmp_path_factory.mktemp("s3-bridge"), mnist_dir, NS) as (s3, values, watch):
        try:
            submit = e2e.cli("submit", "-n", NS, "--name", NAME, "-f", VALUES, *values, "--wait", timeout=900)
            yield {"s3": s3, "bucket": MODELS, "submit": submit, "watch": watch}
        finally:
            e2e.cli("cancel", RAYJOB, "-n", NS)


def test_submit_waits_for_a_job_that_trains_on_real_pods_and_publishes(e2e, trained):
    submit = trained["submit"]
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert f"{RAYJOB}: Complete job SUCCEEDED, workers 2/2 ready" in submit.stdout, submit.stdout
    from kubernetes import client
    pods = client.CoreV1Api(e2e.api()).list_namespaced_pod(NS).items
    assert {p.spec.node_name for p in pods} == {e2e.node.name}, "every pod of the job ran on the real node"


def test_the_two_ranks_trained_in_different_pods(e2e, trained):
    from kubernetes import client
    pods = client.CoreV1Api(e2e.api()).list_namespaced_pod(NS, label_selector="ray.io/node-type=worker").items
    worker_ips = {p.status.pod_ip for p in pods}
    assert len(worker_ips) == 2, worker_ips
    # Each worker's log, saved with the run, starts with its rank and its node's address.
    ranks = worker_nodes(trained["s3"], RAYJOB)
    assert sorted(ranks) == [0, 1] and set(ranks.values()) == worker_ips, (ranks, worker_ips)
    # Ray prefixes a remote worker's output with its node's address: the chief's lines, in the driver's.
    logs = e2e.cli("logs", RAYJOB, "-n", NS)
    assert logs.returncode == 0, logs.stderr
    assert re.search(rf"\(RayTrainWorker pid=\d+, ip={re.escape(ranks[0])}\) epoch 1/1 ", logs.stdout), logs.stdout[-3000:]


def test_status_wait_and_list_see_the_finished_job(e2e, trained):
    status = e2e.cli("status", RAYJOB, "-n", NS, "--output", "json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert (info["job_deployment_status"], info["job_status"]) == ("Complete", "SUCCEEDED"), info
    assert e2e.cli("wait", RAYJOB, "-n", NS).returncode == 0
    listing = e2e.cli("list", "-n", NS)
    assert listing.returncode == 0 and RAYJOB in listing.stdout, listing.stdout + listing.stderr


def test_the_published_run_is_listed_and_predicts(e2e, trained, tmp_path, mnist_dir):
    s3, bucket = trained["s3"], trained["bucket"]
    env = e2e.env(**s3.env)
    runs = subprocess.run([sys.executable, "-m", "job.cli", "runs", "list", f"s3://{bucket}", "--output", "json"],
                          capture_output=True, text=True, env=env, cwd=CHART.parents[1], timeout=120)
    assert runs.returncode == 0, runs.stderr
    listed = {run["run"]: run for run in json.loads(runs.stdout)}
    assert RAYJOB in listed and listed[RAYJOB]["test_accuracy"] is not None, listed
    images, _ = write_digit_pngs(mnist_dir, tmp_path, count=2)
    predict = subprocess.run([sys.executable, "-m", "job.cli", "predict", f"s3://{bucket}/runs/{RAYJOB}",
                              *map(str, images), "--output", "json"],
                             capture_output=True, text=True, env=env, cwd=CHART.parents[1], timeout=300)
    assert predict.returncode == 0, predict.stderr
    assert len(json.loads(predict.stdout)) == 2


def test_the_object_store_was_reached_over_the_pod_bridge_only(trained):
    watch = trained["watch"]
    watch.sample()
    assert watch.sockets_seen > 0 and not watch.violations, watch.violations


def test_status_shows_the_last_progress_and_logs_outlive_the_pods(e2e, trained):
    from kubernetes import client
    status = e2e.cli("status", RAYJOB, "-n", NS, env=trained["s3"].env)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^progress: +published: epoch 1/1, step (\d+)/\1, ", status.stdout, re.M), status.stdout
    # The Ray cluster goes once the job has ended (after the chart's job.ttlSecondsAfterFinished), the
    # submitter's pod with its Job's TTL: both deleted now. `logs` then shows what the driver printed,
    # saved with the run.
    client.CustomObjectsApi(e2e.api()).delete_collection_namespaced_custom_object("ray.io", "v1", NS, "rayclusters")
    core = client.CoreV1Api(e2e.api())
    core.delete_collection_namespaced_pod(NS, label_selector=f"batch.kubernetes.io/job-name={RAYJOB}",
                                          grace_period_seconds=0)
    wait_until("no pod of the RayJob", lambda: not core.list_namespaced_pod(NS).items, timeout=120)
    logs = e2e.cli("logs", RAYJOB, "-n", NS, env=trained["s3"].env)
    assert logs.returncode == 0, logs.stderr
    assert f"its driver's output as saved with the run, s3://{MODELS}/checkpoints/{RAYJOB}/logs" in logs.stderr
    assert re.search(r"\) epoch 1/1 ", logs.stdout) and f"run {RAYJOB} published at" in logs.stdout, logs.stdout
