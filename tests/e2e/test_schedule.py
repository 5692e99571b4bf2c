"""Scheduled retraining on the real control plane: the controller-manager fires the chart's
CronJob; the command of the pod it makes runs for real on the host with that pod's
ServiceAccount token (TokenRequest, bound to the pod), creates the RayJob and prunes old ones,
which proves the chart's Role is enough; SelfSubjectAccessReviews prove it is no more."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from e2elib import CHART, wait_until

pytestmark = pytest.mark.e2e

NS = "sched"
RELEASE = "nightly"
FULLNAME = f"{RELEASE}-alexnet-train"
RETRAIN = f"{FULLNAME}-retrain"
VALUES = {
    "schedule": "* * * * *",   # every minute: the controller-manager fires it within a minute
    "cron": {"keep": 1, "promoteIfBetter": "test_accuracy"},
    "image": {"tag": "0.1.0-cpu"},
    "s3": {"endpoint": "http://127.0.0.1:8333", "bucket": "e2e", "prefix": "nightly"},
    "head": {"cpu": "1", "memory": "2Gi", "shmSize": "1Gi"},
    "workers": {"replicas": 1, "gpus": 0, "cpu": 1, "memory": "4Gi", "shmSize": "1Gi",
                "onePodPerNode": False, "tolerations": []},
}


def apis(e2e, api=None):
    from kubernetes import client
    api = api or e2e.api()
    return client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def schedule(e2e, tmp_path_factory):
    e2e.namespace(NS)
    values = tmp_path_factory.mktemp("sched") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    e2e.helm("install", RELEASE, CHART, "-n", NS, "-f", values)
    core, batch, custom = apis(e2e)
    manifest = yaml.safe_load(core.read_namespaced_config_map(FULLNAME, NS).data["rayjob.yaml"])
    # Two earlier nights' RayJobs, finished: `prune --keep 1` must delete them.
    for night in ("old01", "old02"):
        job = {**manifest, "metadata": {**manifest["metadata"], "name": f"{FULLNAME}-{night}"}}
        custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", job)
        custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", job["metadata"]["name"], {
            "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
        time.sleep(1.05)  # distinct creationTimestamps
    # The controller-manager's CronJob controller fires at the next minute.
    fired = wait_until("the CronJob to fire a Job", lambda: [
        j for j in batch.list_namespaced_job(NS).items
        if any(o.kind == "CronJob" and o.name == RETRAIN for o in j.metadata.owner_references or [])], timeout=90)
    job = fired[0]
    pod = wait_until("the schedule's pod to be scheduled", lambda: next((
        p for p in core.list_namespaced_pod(NS, label_selector=f"job-name={job.metadata.name}").items
        if p.spec.node_name), None), timeout=60)
    return {"manifest": manifest, "job": job, "pod": pod}


def test_the_controller_manager_fires_the_cronjob_with_the_chart_command(schedule):
    pod = schedule["pod"]
    assert pod.spec.service_account_name == RETRAIN
    script = pod.spec.containers[0].command[-1]
    assert "alexnet-job submit --manifest /etc/alexnet-job/rayjob.yaml --generate-name --promote-if-better test_accuracy" in script
    assert f"alexnet-job prune --keep 1 --selector alexnet-job/schedule={FULLNAME}" in script


def test_the_schedule_pod_command_runs_with_its_token_and_the_role_suffices(e2e, schedule, tmp_path):
    core, _, custom = apis(e2e)
    pod = schedule["pod"]
    # The pod's identity: a token for its ServiceAccount, bound to the pod, from the TokenRequest API.
    token = core.create_namespaced_service_account_token(pod.spec.service_account_name, NS, {"spec": {
        "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}}})
    kubeconfig = e2e.token_kubeconfig(tmp_path / "pod.kubeconfig", token.status.token, NS)
    # The pod's mounts: its ConfigMap volume's items, written where the command reads them.
    mount = tmp_path / "etc-alexnet-job"
    mount.mkdir()
    volume = next(v for v in pod.spec.volumes if v.name == "rayjob")
    data = core.read_namespaced_config_map(volume.config_map.name, NS).data
    for item in volume.config_map.items:
        (mount / item.path).write_text(data[item.key])
    container = pod.spec.containers[0]
    command = [part.replace("/etc/alexnet-job", str(mount)) for part in container.command]
    env = e2e.env(kubeconfig)
    env.update({e.name: e.value for e in container.env or [] if e.value is not None})
    before = {j["metadata"]["name"] for j in custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]}

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=tmp_path)
    try:
        created = wait_until("the RayJob the schedule's command creates", lambda: next((
            j for j in custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]
            if j["metadata"]["name"] not in before), None), timeout=60)
        name = created["metadata"]["name"]
        assert name.startswith(f"{FULLNAME}-") and len(name) == len(FULLNAME) + 6
        assert created["metadata"]["labels"]["alexnet-job/schedule"] == FULLNAME
        assert created["spec"]["entrypoint"].endswith(f"--run-name {name} --promote-if-better test_accuracy")
        time.sleep(2)
        assert process.poll() is None, "submit --manifest must wait for its RayJob"
        custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", name, {
            "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, (out, err)
    assert f"submitted RayJob {name}" in out and "deleted 2" in out, out
    # A delete is accepted before the object is gone (KubeRay's finalizer runs first): wait for it.
    def left():
        return [j["metadata"]["name"] for j in custom.list_namespaced_custom_object(
            "ray.io", "v1", NS, "rayjobs", label_selector=f"alexnet-job/schedule={FULLNAME}")["items"]]
    wait_until(f"the two older RayJobs to be gone, leaving only {name}", lambda: left() == [name], timeout=30)


ALLOWED = [("create", "rayjobs"), ("get", "rayjobs"), ("list", "rayjobs"), ("watch", "rayjobs"), ("delete", "rayjobs")]
DENIED = [
    ("update", "rayjobs"), ("patch", "rayjobs"), ("deletecollection", "rayjobs"), ("update", "rayjobs/status"),
    ("create", "rayclusters"), ("delete", "rayclusters"), ("create", "raycronjobs"),
    ("get", "secrets"), ("list", "configmaps"), ("create", "pods"), ("create", "pods/exec"), ("get", "pods/log"),
    ("create", "jobs"), ("create", "roles"), ("create", "rolebindings"), ("create", "serviceaccounts/token"),
]
GROUPS = {"rayjobs": "ray.io", "rayclusters": "ray.io", "raycronjobs": "ray.io", "jobs": "batch",
          "roles": "rbac.authorization.k8s.io", "rolebindings": "rbac.authorization.k8s.io"}


def can(api, verb, resource, namespace=NS) -> bool:
    from kubernetes import client
    name, _, sub = resource.partition("/")
    review = client.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {"resourceAttributes": {
        "namespace": namespace, "verb": verb, "group": GROUPS.get(name, ""), "resource": name,
        "subresource": sub}}})
    return review.status.allowed


def sa_api(e2e, tmp_path, account):
    from kubernetes import client, config
    core = client.CoreV1Api(e2e.api())
    token = core.create_namespaced_service_account_token(account, NS, {"spec": {"expirationSeconds": 600}})
    return config.new_client_from_config(str(e2e.token_kubeconfig(tmp_path / account, token.status.token, NS)))


def test_the_schedule_role_is_minimal(e2e, schedule, tmp_path):
    api = sa_api(e2e, tmp_path, RETRAIN)
    matrix = {(verb, resource): can(api, verb, resource) for verb, resource in ALLOWED + DENIED}
    assert [k for k in ALLOWED if not matrix[k]] == [], "the Role lacks what submit/prune need"
    assert [k for k in DENIED if matrix[k]] == [], "the Role grants more than submit/prune need"
    # Its rights end at its namespace.
    assert not can(api, "create", "rayjobs", "default") and not can(api, "list", "rayjobs", "")


def test_the_ray_pods_service_account_has_no_rights(e2e, schedule, tmp_path):
    api = sa_api(e2e, tmp_path, FULLNAME)
    assert not any(can(api, verb, resource) for verb, resource in ALLOWED + DENIED)


def test_helm_uninstall_removes_the_schedule(e2e, schedule):
    core, batch, custom = apis(e2e)
    e2e.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s")
    assert not batch.list_namespaced_cron_job(NS).items
    assert not [s for s in core.list_namespaced_service_account(NS).items if s.metadata.name.startswith(FULLNAME)]
