"""The chart installed as a user would, with `helm install` and the real node's values file: the
RayJob it creates trains on real pods and publishes, with Ray's token authentication on; a pod of
someone else's cannot drive that Ray cluster; `helm test` runs its pod there; `helm uninstall`
leaves nothing of the release in the namespace (the RayJob's RayCluster, pods and submitter Job
go with the RayJob).

The pod bridge of the test node enforces no NetworkPolicy (no network plugin here implements
it): the chart's policy is checked by the API server admitting it, and by tests/chart, which
evaluates its selectors against every pod the chart makes. What the intruder meets here is the
token alone."""

from __future__ import annotations

import json
import time

import pytest

from e2elib import CHART, wait_until
from realpods import VALUES, bridge_s3, keys, read_json

pytestmark = pytest.mark.e2e

NS = "helm-real"
RELEASE = "by-helm"
RAYJOB = f"{RELEASE}-alexnet-train"
# What a namespace holds before any release: its own ServiceAccount and CA bundle, and the tests' Secret.
NAMESPACE_OWN = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt"), ("Secret", "s3")}


def namespace_objects(e2e) -> set[tuple[str, str]]:
    """(kind, name) of everything in the namespace that a release could have made."""
    from kubernetes import client
    api = e2e.api()
    core, batch, rbac = client.CoreV1Api(api), client.BatchV1Api(api), client.RbacAuthorizationV1Api(api)
    custom, networking = client.CustomObjectsApi(api), client.NetworkingV1Api(api)
    found = set()
    for kind, items in (("Pod", core.list_namespaced_pod(NS).items), ("Service", core.list_namespaced_service(NS).items),
                        ("ConfigMap", core.list_namespaced_config_map(NS).items),
                        ("Secret", core.list_namespaced_secret(NS).items),
                        ("ServiceAccount", core.list_namespaced_service_account(NS).items),
                        ("Job", batch.list_namespaced_job(NS).items), ("CronJob", batch.list_namespaced_cron_job(NS).items),
                        ("Role", rbac.list_namespaced_role(NS).items),
                        ("RoleBinding", rbac.list_namespaced_role_binding(NS).items),
                        ("NetworkPolicy", networking.list_namespaced_network_policy(NS).items)):
        found |= {(kind, item.metadata.name) for item in items}
    for kind, plural in (("RayJob", "rayjobs"), ("RayCluster", "rayclusters")):
        found |= {(kind, item["metadata"]["name"])
                  for item in custom.list_namespaced_custom_object("ray.io", "v1", NS, plural)["items"]}
    return found


@pytest.fixture(scope="module")
def installed(e2e, tmp_path_factory, mnist_dir):
    with bridge_s3(e2e, tmp_path_factory.mktemp("s3-helm"), mnist_dir, NS) as (s3, values, watch):
        try:
            # The finished job's cluster must outlive the tests that use it (the default keeps it 300 s).
            install = e2e.helm("install", RELEASE, CHART, "-n", NS, "-f", VALUES, *values,
                               "--set", "job.ttlSecondsAfterFinished=3600")
            waited = e2e.cli("wait", RAYJOB, "-n", NS, timeout=900)
            yield {"s3": s3, "install": install, "wait": waited}
        finally:
            e2e.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m", check=False, timeout=400)


def test_helm_install_trains_on_real_pods_and_publishes(e2e, installed):
    assert installed["wait"].returncode == 0, installed["wait"].stdout[-3000:] + installed["wait"].stderr[-3000:]
    s3 = installed["s3"]
    manifest = read_json(s3, f"runs/{RAYJOB}/manifest.json")
    assert manifest is not None and manifest["metrics"]["test_accuracy"] is not None, keys(s3, "runs/")
    assert read_json(s3, "latest.json")["run"] == RAYJOB
    from kubernetes import client
    pods = client.CoreV1Api(e2e.api()).list_namespaced_pod(NS).items
    assert {p.spec.node_name for p in pods} == {e2e.node.name}, [(p.metadata.name, p.spec.node_name) for p in pods]
    assert len([p for p in pods if p.metadata.labels.get("ray.io/node-type") == "worker"]) == 2


# Run in a pod that is not the release's: the head's job API and its GCS, without the token, with
# a wrong one, and with the cluster's own (which shows the refusals are the token's doing).
PROBE = r"""
import json, os, subprocess, sys, urllib.error, urllib.request
head, token = sys.argv[1], sys.argv[2]

def job_api(token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(f"http://{head}:8265/api/jobs/", headers=headers),
                                      timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code

def gcs(token):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    done = subprocess.run(["ray", "status", "--address", f"{head}:6379"], env=env, capture_output=True,
                          text=True, timeout=120)
    return [done.returncode, (done.stdout + done.stderr)[-600:]]

print(json.dumps({"job api": [job_api(None), job_api("not-the-token"), job_api(token)],
                  "gcs": [gcs(None), gcs("not-the-token"), gcs(token)]}))
"""


def test_nobody_else_can_drive_the_ray_cluster(e2e, installed):
    from kubernetes import client
    from kubernetes.stream import stream
    api = e2e.api()
    core = client.CoreV1Api(api)
    cluster = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "ray.io", "v1", NS, "rayjobs", RAYJOB)["status"]["rayClusterName"]
    (head,) = core.list_namespaced_pod(NS, label_selector=f"ray.io/cluster={cluster},ray.io/node-type=head").items
    env = {e.name: e for e in head.spec.containers[0].env}
    assert env["RAY_AUTH_MODE"].value == "token" and env["RAY_AUTH_TOKEN"].value_from.secret_key_ref.name == cluster
    import base64
    token = base64.b64decode(core.read_namespaced_secret(cluster, NS).data["auth_token"]).decode()
    # The chart's NetworkPolicy, as the API server admitted it.
    (policy,) = client.NetworkingV1Api(api).list_namespaced_network_policy(NS).items
    assert policy.spec.pod_selector.match_labels["app.kubernetes.io/instance"] == RELEASE

    intruder = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "intruder", "labels": {"app": "intruder"}},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                         "automountServiceAccountToken": False, "nodeSelector": head.spec.node_selector,
                         "tolerations": [t.to_dict() for t in head.spec.tolerations or []
                                         if t.key and t.key.startswith("alexnet-job")],
                         "securityContext": {"runAsUser": 1000, "runAsNonRoot": True,
                                             "seccompProfile": {"type": "RuntimeDefault"}},
                         "containers": [{"name": "probe", "image": head.spec.containers[0].image,
                                         "imagePullPolicy": "Never", "command": ["sleep", "600"],
                                         "env": [{"name": "HOME", "value": "/tmp"}],
                                         "resources": {"limits": {"cpu": "250m", "memory": "768Mi"}},
                                         "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}]}}
    core.create_namespaced_pod(NS, intruder)
    try:
        wait_until("the intruder pod to run", lambda: core.read_namespaced_pod("intruder", NS).status.phase == "Running",
                   timeout=120)
        out = stream(core.connect_get_namespaced_pod_exec, "intruder", NS, stdin=False, stdout=True, stderr=True,
                     tty=False, command=["python", "-c", PROBE, head.status.pod_ip, token], _request_timeout=600)
    finally:
        core.delete_namespaced_pod("intruder", NS, grace_period_seconds=0)
    found = json.loads(out.strip().splitlines()[-1])
    assert found["job api"] == [401, 403, 200], found
    (no_token, wrong_token, with_token) = found["gcs"]
    assert with_token[0] == 0, found
    for refused in (no_token, wrong_token):
        assert refused[0] != 0 and "InvalidAuthToken" in refused[1], found


def test_helm_test_runs_its_pod_on_the_real_node(e2e, installed):
    # The test pod runs the real CLI in the image on the release's config; it is deleted when it
    # succeeds (kept, for `helm test --logs`, when it fails), so its events say where it ran.
    tested = e2e.helm("test", RELEASE, "-n", NS, "--timeout", "3m", check=False, timeout=240)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "Phase:          Succeeded" in tested.stdout, tested.stdout
    from kubernetes import client
    pod = f"{RAYJOB}-test-config"
    events = client.CoreV1Api(e2e.api()).list_namespaced_event(NS, field_selector=f"involvedObject.name={pod}").items
    said = {e.reason: e.message for e in events}
    assert "Started" in said and f"to {e2e.node.name}" in said.get("Scheduled", ""), said
    assert pod not in {p.metadata.name for p in client.CoreV1Api(e2e.api()).list_namespaced_pod(NS).items}


def test_helm_uninstall_leaves_nothing_in_the_cluster(e2e, installed):
    before = namespace_objects(e2e)
    # The finished job's cluster is still there (job.ttlSecondsAfterFinished): uninstall must take it.
    assert {"RayJob", "RayCluster", "Pod", "Job", "ConfigMap"} <= {kind for kind, _ in before - NAMESPACE_OWN}, before
    uninstall = e2e.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m", check=False, timeout=400)
    assert uninstall.returncode == 0, uninstall.stderr
    # The RayCluster, its pods and the submitter's Job are the RayJob's: the garbage collector
    # deletes them after it.
    deadline = time.monotonic() + 240
    while (left := namespace_objects(e2e) - NAMESPACE_OWN) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
