"""`alexnet-job submit | status | list | logs | cancel | wait` against the real API server.

Transitions up to a running gang are driven by the real operator and KWOK; a job's terminal
state (the simulated pods run no Ray) is written by the test through the RayJob's status
subresource, as KubeRay itself would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from e2elib import ROOT, wait_until

pytestmark = pytest.mark.e2e

NS = "cli"
# Two 1-CPU workers on the CPU node, as the chart's cpu-smoke example.
VALUES = {
    "image": {"tag": "0.1.0-cpu"},
    "s3": {"endpoint": "http://127.0.0.1:8333", "bucket": "e2e", "prefix": "cli"},
    "head": {"cpu": "1", "memory": "2Gi", "shmSize": "1Gi"},
    "workers": {"replicas": 2, "gpus": 0, "cpu": 1, "memory": "4Gi", "shmSize": "1Gi",
                "onePodPerNode": False, "tolerations": []},
    "training": {"dataset": "synthetic", "epochs": 1, "batch_size": 32},
    "job": {"ttlSecondsAfterFinished": 600},
}


@pytest.fixture(scope="module")
def ns(e2e, tmp_path_factory):
    e2e.namespace(NS)
    values = tmp_path_factory.mktemp("cli") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    return {"values": values}


def custom(e2e):
    from kubernetes import client
    return client.CustomObjectsApi(e2e.api())


def set_status(e2e, name, **status):
    """Write a RayJob's status through the status subresource (what KubeRay does on a real cluster)."""
    custom(e2e).patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", name, {"status": status})


def status_json(e2e, name) -> dict:
    result = e2e.cli("status", name, "-n", NS, "--output", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_submit_prints_the_rayjob_run_and_model_location(e2e, ns):
    result = e2e.cli("submit", "-f", ns["values"], "--name", "alexnet-train-a", "-n", NS)
    assert result.returncode == 0, result.stderr
    assert "submitted RayJob alexnet-train-a in namespace cli" in result.stdout
    assert "run: alexnet-train-a" in result.stdout
    assert "model: s3://e2e/cli/runs/alexnet-train-a/" in result.stdout
    rayjob = custom(e2e).get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "alexnet-train-a")
    # The spec is the chart's: the entrypoint the chart rendered, not one typed in Python.
    assert rayjob["spec"]["entrypoint"].startswith("alexnet-job train --config /etc/alexnet-job/config.yaml")


def test_status_follows_the_operator_and_kwok_to_a_running_gang(e2e, ns):
    first = status_json(e2e, "alexnet-train-a")
    assert first["name"] == "alexnet-train-a" and first["workers_desired"] == 2
    info = wait_until("the operator to bring the gang up (KWOK runs the pods)", lambda: (
        lambda i: i if i["job_deployment_status"] in ("Initializing", "Running") and i["workers_ready"] == 2
        else None)(status_json(e2e, "alexnet-train-a")), timeout=120)
    assert info["ray_cluster"].startswith("alexnet-train-a")
    text = e2e.cli("status", "alexnet-train-a", "-n", NS)
    assert text.returncode == 0
    assert "workers:     2/2 ready" in text.stdout and "run:         alexnet-train-a" in text.stdout


def test_status_shows_the_published_metrics_once_they_exist(e2e, ns, tmp_path, monkeypatch):
    """The values put runs in s3://e2e/cli; a real S3 server (SeaweedFS) plays that bucket."""
    from s3server import S3Server
    from job import storage
    server = S3Server()
    server.start()
    try:
        server.create_bucket("e2e")
        env = e2e.env(**server.env)
        before = json.loads(subprocess.run([sys.executable, "-m", "job.cli", "status", "alexnet-train-a", "-n", NS,
                                            "--output", "json"], capture_output=True, text=True, cwd=ROOT,
                                           env=env, check=True).stdout)
        assert before["published"]["uri"] == "s3://e2e/cli/runs/alexnet-train-a"
        assert before["published"]["complete"] is False

        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        # While it trains: the progress record its chief keeps in the job's output.
        from job import progress
        writer = progress.Writer("s3://e2e/cli", "alexnet-train-a")
        writer.put({"run": "alexnet-train-a", "state": "training", "epoch": 2, "epochs": 5, "step": 30,
                    "steps_per_epoch": 100, "loss": 0.1234, "accuracy": 0.9612, "images_per_second": 1180.0,
                    "elapsed_seconds": 100.0, "eta_seconds": 125.0})
        writer.close()
        training = subprocess.run([sys.executable, "-m", "job.cli", "status", "alexnet-train-a", "-n", NS],
                                  capture_output=True, text=True, cwd=ROOT, env=env)
        assert training.returncode == 0, training.stderr
        assert re.search(r"^progress: +training: epoch 2/5, step 30/100, loss 0\.1234, accuracy 0\.9612, 1180 img/s, "
                         r"elapsed 1m40s, ETA 2m05s \(updated 0m\d\ds ago\)$", training.stdout, re.M), training.stdout

        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.json").write_text('{"test_accuracy": 0.9876}')
        storage.publish(run, "s3://e2e/cli", "alexnet-train-a",
                        manifest_extra={"metrics": {"test_accuracy": 0.9876, "test_loss": 0.0412}})
        after = subprocess.run([sys.executable, "-m", "job.cli", "status", "alexnet-train-a", "-n", NS],
                               capture_output=True, text=True, cwd=ROOT, env=env)
        assert after.returncode == 0, after.stderr
        assert ("published:   test accuracy 0.9876, test loss 0.0412 at s3://e2e/cli/runs/alexnet-train-a"
                in after.stdout), after.stdout
    finally:
        server.close()


def test_submit_json_and_list_newest_first_with_label_filter(e2e, ns):
    time.sleep(1.1)  # creationTimestamp has 1 s resolution
    result = e2e.cli("submit", "-f", ns["values"], "--set", "job.labels.team=vision", "--name", "alexnet-train-b",
                     "-n", NS, "--output", "json")
    assert result.returncode == 0, result.stderr
    submitted = json.loads(result.stdout)
    assert submitted["name"] == "alexnet-train-b" and submitted["model"] == "s3://e2e/cli/runs/alexnet-train-b/"
    assert "configmap/alexnet-train-b" in submitted["objects"]

    listing = e2e.cli("list", "-n", NS)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "DEPLOYMENT", "JOB"]
    assert [line.split()[0] for line in lines[1:]] == ["alexnet-train-b", "alexnet-train-a"]
    filtered = json.loads(e2e.cli("list", "-n", NS, "-l", "team=vision", "--output", "json").stdout)
    assert [job["name"] for job in filtered] == ["alexnet-train-b"]


def test_logs_come_from_the_driver_pod_through_the_loopback_kubelet(e2e, ns):
    e2e.plane.driver_output("epoch 1/1 loss 2.30 accuracy 0.11", append=False)
    wait_until("a submitter or head pod", lambda: e2e.cli("logs", "alexnet-train-a", "-n", NS).returncode == 0,
               timeout=60)
    result = e2e.cli("logs", "alexnet-train-a", "-n", NS)
    assert "epoch 1/1 loss 2.30 accuracy 0.11" in result.stdout, result.stderr
    # Still the first try: the simulated submitter runs as long as a real one would (see
    # ControlPlane._start_kwok), so KubeRay does not retry the RayJob under the test.
    assert custom(e2e).get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "alexnet-train-a")[
        "status"].get("failed", 0) == 0
    as_json = json.loads(e2e.cli("logs", "alexnet-train-a", "-n", NS, "--output", "json").stdout)
    assert "epoch 1/1 loss 2.30 accuracy 0.11" in as_json["lines"]

    follow = subprocess.Popen([sys.executable, "-m", "job.cli", "logs", "alexnet-train-a", "-n", NS, "-f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e2e.env())
    try:
        assert "epoch 1/1" in follow.stdout.readline()
        e2e.plane.driver_output("test accuracy 0.9876")
        assert "test accuracy 0.9876" in follow.stdout.readline()
    finally:
        follow.terminate()
        follow.wait(10)


def test_wait_reports_progress_and_exits_0_on_success(e2e, ns):
    waiter = subprocess.Popen([sys.executable, "-m", "job.cli", "wait", "alexnet-train-a", "-n", NS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e2e.env())
    time.sleep(3)
    assert waiter.poll() is None, "wait returned before the job ended"
    set_status(e2e, "alexnet-train-a", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
               endTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert "alexnet-train-a: Running" in out or "alexnet-train-a: Initializing" in out, out
    assert "RayJob alexnet-train-a succeeded" in out
    info = status_json(e2e, "alexnet-train-a")
    assert (info["job_deployment_status"], info["job_status"]) == ("Complete", "SUCCEEDED") and info["end_time"]


def test_status_watch_shows_each_change_until_the_job_ends(e2e, ns):
    watch = subprocess.Popen([sys.executable, "-m", "job.cli", "status", "alexnet-train-b", "-n", NS, "--watch",
                              "--interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=e2e.env())
    time.sleep(3)
    assert watch.poll() is None, "status --watch returned before the job ended"
    set_status(e2e, "alexnet-train-b", jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed")
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 1, (out, err)
    assert "RayJob alexnet-train-b ended Failed / FAILED" in err
    blocks = [b for b in out.split("\n\n") if b.strip()]
    assert len(blocks) >= 2 and "job:         FAILED" in blocks[-1] and "FAILED" not in blocks[0], out


def test_wait_exits_1_on_failure_with_the_reason(e2e, ns):
    set_status(e2e, "alexnet-train-b", jobDeploymentStatus="Failed", jobStatus="FAILED",
               reason="AppFailed", message="Job entrypoint command failed with exit code 1")
    result = e2e.cli("wait", "alexnet-train-b", "-n", NS)
    assert result.returncode == 1
    assert "RayJob alexnet-train-b ended Failed / FAILED: AppFailed Job entrypoint command failed" in result.stderr
    as_json = e2e.cli("wait", "alexnet-train-b", "-n", NS, "--output", "json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["job_status"] == "FAILED"


def test_submit_wait_follows_until_the_end(e2e, ns):
    submit = subprocess.Popen([sys.executable, "-m", "job.cli", "submit", "-f", str(ns["values"]),
                               "--name", "alexnet-train-c", "-n", NS, "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e2e.env())
    wait_until("RayJob alexnet-train-c", lambda: custom(e2e).get_namespaced_custom_object(
        "ray.io", "v1", NS, "rayjobs", "alexnet-train-c"), timeout=60)
    time.sleep(2)
    set_status(e2e, "alexnet-train-c", jobDeploymentStatus="Failed", jobStatus="STOPPED", reason="JobDeadlineExceeded")
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 1, (out, err)
    assert "submitted RayJob alexnet-train-c" in out and "JobDeadlineExceeded" in err


def test_cancel_deletes_the_rayjob_its_cluster_pods_and_config(e2e, ns):
    from kubernetes import client

    result = e2e.cli("cancel", "alexnet-train-a", "-n", NS, "--output", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": "alexnet-train-a", "namespace": NS, "cancelled": True}
    core = client.CoreV1Api(e2e.api())
    wait_until("RayJob, RayCluster, pods and ConfigMap of alexnet-train-a gone", lambda: (
        not [j for j in custom(e2e).list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]
             if j["metadata"]["name"] == "alexnet-train-a"]
        and not [c for c in custom(e2e).list_namespaced_custom_object("ray.io", "v1", NS, "rayclusters")["items"]
                 if c["metadata"]["name"].startswith("alexnet-train-a")]
        and not [p for p in core.list_namespaced_pod(NS).items if p.metadata.name.startswith("alexnet-train-a")]
        and not [c for c in core.list_namespaced_config_map(NS).items if c.metadata.name == "alexnet-train-a"]),
        timeout=90)
    gone = e2e.cli("status", "alexnet-train-a", "-n", NS)
    assert gone.returncode == 2 and "not found" in gone.stderr


# ----------------------------------------------------------------------------- errors

def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet-job: error: "), result.stderr
    return lines[0]


def test_error_no_kube_context(e2e, tmp_path):
    line = one_error_line(e2e.cli("list", kubeconfig=tmp_path / "missing"))
    assert "no Kubernetes cluster configured" in line and "KUBECONFIG" in line


def test_error_unreachable_cluster(e2e, tmp_path):
    from controlplane import kubeconfig
    from ports import free_port
    port = free_port()  # nothing listens there
    path = tmp_path / "unreachable"
    path.write_text(yaml.safe_dump(kubeconfig(f"https://127.0.0.1:{port}", e2e.plane.pki / "ca.crt", "admin",
                                              e2e.plane.pki / "admin.crt", e2e.plane.pki / "admin.key")))
    line = one_error_line(e2e.cli("status", "x", kubeconfig=path, timeout=60))
    assert f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}" in line


def test_error_rbac_forbidden_names_verb_and_resource(e2e, ns, tmp_path):
    from kubernetes import client

    core = client.CoreV1Api(e2e.api())
    core.create_namespaced_service_account(NS, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token("nobody", NS, {"spec": {"expirationSeconds": 600}})
    path = e2e.token_kubeconfig(tmp_path / "nobody", token.status.token, NS)
    line = one_error_line(e2e.cli("list", kubeconfig=path))
    assert "permission denied to list rayjobs.ray.io in namespace cli" in line
    assert 'cannot list resource "rayjobs" in API group "ray.io"' in line
    line = one_error_line(e2e.cli("submit", "-f", ns["values"], "--name", "alexnet-train-x", kubeconfig=path))
    assert 'cannot create resource "rayjobs"' in line


def test_error_name_conflict(e2e, ns):
    line = one_error_line(e2e.cli("submit", "-f", ns["values"], "--name", "alexnet-train-b", "-n", NS))
    assert "cannot create rayjobs.ray.io 'alexnet-train-b' in namespace cli" in line and "already exists" in line


def test_error_invalid_values_quotes_the_chart(e2e, ns):
    line = one_error_line(e2e.cli("submit", "-f", ns["values"], "--set", "workers.replicas=0", "-n", NS))
    assert "invalid values: the chart's schema says: at '/workers/replicas': minimum: got 0, want 1" in line
    line = one_error_line(e2e.cli("submit", "-f", ns["values"], "--set", "training.batch_size=33", "-n", NS))
    assert "training.batch_size 33 does not divide across 2 replicas" in line


def test_error_unknown_rayjob(e2e, ns):
    for command in (["status", "nope"], ["cancel", "nope"], ["wait", "nope"], ["logs", "nope"]):
        line = one_error_line(e2e.cli(*command, "-n", NS))
        assert '"nope" not found' in line, line

