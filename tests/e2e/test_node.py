"""The real node: a kubelet over containerd and runc runs pods from the image the tests built,
with the chart's security context enforced by the runtime, pod logs and exec through the API
server, a cluster DNS for `cluster.local` only, and a pod network with no way out."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from controlplane import k8s_version
from e2elib import CHART, wait_until
from node import BRIDGE, LABEL, RULE_COMMENT

pytestmark = pytest.mark.e2e

VALUES = CHART.parents[1] / "tests" / "e2e" / "values-real-node.yaml"
NAMESPACE = "real-node"
PROBE = """\
echo uid=$(id -u) gid=$(id -g)
# /home/app is the app user's own: only a read-only root filesystem stops the write.
if touch /home/app/probe 2>/tmp/touch.err; then echo rootfs=writable
elif grep -q "Read-only file system" /tmp/touch.err; then echo rootfs=read-only; else echo rootfs=denied; fi
if touch /tmp/probe 2>/dev/null; then echo tmp=writable; else echo tmp=read-only; fi
grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t' | tr : =
echo ready
exec sleep 3600
"""


@pytest.fixture(scope="module")
def rendered(e2e):
    """The chart as `helm template` renders it for the real node: its ServiceAccount, ConfigMap
    and the Ray head's pod template (what KubeRay would turn into a pod)."""
    e2e.namespace(NAMESPACE)
    out = e2e.helm("template", "probe", str(CHART), "-n", NAMESPACE, "-f", str(VALUES)).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    from kubernetes import client, utils
    api = e2e.api()
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "ConfigMap"):
            utils.create_from_dict(api, doc, namespace=NAMESPACE)
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    yield rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    client.CoreV1Api(api).delete_namespace(NAMESPACE)


def pod_from_template(template: dict, name: str, command: list[str], labels: dict | None = None) -> dict:
    """A Pod with the chart's pod spec (security context, volumes, resources, placement) whose
    container runs `command` instead of `ray start`."""
    spec = yaml.safe_load(yaml.safe_dump(template["spec"]))
    spec["restartPolicy"] = "Never"
    spec["terminationGracePeriodSeconds"] = 1
    spec["containers"][0]["command"] = command
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": name, "labels": {**template["metadata"].get("labels", {}), **(labels or {})}}}


def start_pod(e2e, pod: dict):
    from kubernetes import client
    core = client.CoreV1Api(e2e.api())
    core.create_namespaced_pod(NAMESPACE, pod)
    name = pod["metadata"]["name"]
    running = wait_until(f"pod {name} running", lambda: (p := core.read_namespaced_pod(name, NAMESPACE))
                         .status.phase == "Running" and p, timeout=120)
    return core, running


def exec_in(e2e, pod: str, *command: str) -> str:
    from kubernetes import client
    from kubernetes.stream import stream
    core = client.CoreV1Api(e2e.api())
    return stream(core.connect_get_namespaced_pod_exec, pod, NAMESPACE, command=list(command),
                  stderr=True, stdin=False, stdout=True, tty=False)


def test_the_node_is_a_real_kubelet_of_the_control_planes_version(e2e):
    from kubernetes import client
    core = client.CoreV1Api(e2e.api())
    node = core.read_node(e2e.node.name)
    assert node.status.node_info.kubelet_version == k8s_version(), node.status.node_info
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    assert {a.type: a.address for a in node.status.addresses}["InternalIP"] == e2e.node.address
    assert node.metadata.labels[LABEL[0]] == LABEL[1]
    # The kubelet reports its images with a later status update than its first.
    wanted = f"docker.io/library/{e2e.image.tag}"
    wait_until(f"{wanted} among the node's images", lambda: wanted in {
        name for image in core.read_node(e2e.node.name).status.images or [] for name in image.names or []},
        timeout=60)


def test_a_pod_of_the_chart_runs_there_with_its_security_context_enforced(e2e, rendered):
    core, pod = start_pod(e2e, pod_from_template(rendered, "probe", ["sh", "-c", PROBE]))
    assert pod.spec.node_name == e2e.node.name, "the scheduler placed it elsewhere"
    # Pod logs through the API server, from the real kubelet.
    logs = wait_until("the probe's report", lambda: (text := core.read_namespaced_pod_log("probe", NAMESPACE))
                      .rstrip().endswith("ready") and text, timeout=60)
    report = dict(line.split("=", 1) for line in logs.split() if "=" in line)
    assert report["uid"] == "1000" and report["gid"] == "1000", logs
    assert report["rootfs"] == "read-only" and report["tmp"] == "writable", logs
    for capabilities in ("CapEff", "CapPrm", "CapBnd"):
        assert int(report[capabilities], 16) == 0, f"{capabilities} {report[capabilities]}: capabilities left"
    assert report["NoNewPrivs"] == "1", logs   # allowPrivilegeEscalation: false
    assert report["Seccomp"] == "2", logs      # RuntimeDefault: a filter is installed
    # Exec through the API server.
    assert exec_in(e2e, "probe", "id", "-un").strip() == "app"
    assert "alexnet-job" in exec_in(e2e, "probe", "alexnet-job", "--help")
    core.delete_namespaced_pod("probe", NAMESPACE, grace_period_seconds=0)


def test_cluster_dns_and_the_pod_network_reach_each_other_and_nothing_else(e2e, rendered):
    server = pod_from_template(rendered, "web", ["python", "-m", "http.server", "8080", "--directory", "/etc"],
                               labels={"probe": "web"})
    core, _ = start_pod(e2e, server)
    start_pod(e2e, pod_from_template(rendered, "client", ["sleep", "3600"]))
    core.create_namespaced_service(NAMESPACE, {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "None", "selector": {"probe": "web"}, "ports": [{"port": 8080}]}})
    web_ip = core.read_namespaced_pod("web", NAMESPACE).status.pod_ip
    assert web_ip != e2e.node.address and web_ip.startswith(e2e.node.address.rsplit(".", 1)[0] + ".")
    script = """
import socket, sys, urllib.request
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except OSError as error:
        return f"error {error}"
print("service", resolve(sys.argv[1]))
print("short", resolve("web"))
print("outside", resolve("pypi.org"))
for _ in range(100):
    try:
        print("http", urllib.request.urlopen(f"http://{sys.argv[1]}:8080/hostname", timeout=2).status)
        break
    except OSError:
        import time; time.sleep(0.2)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    udp.connect(("8.8.8.8", 53))
    print("route-out", udp.getsockname())
except OSError as error:
    print("route-out none", error.errno)
"""
    name = f"web.{NAMESPACE}.svc.cluster.local"
    out = wait_until("the headless service in cluster DNS",
                     lambda: (o := exec_in(e2e, "client", "python", "-c", script, name)) and f"service {web_ip}" in o and o,
                     timeout=60)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["short"] == web_ip, out            # the pod's search path is its namespace's
    assert lines["outside"].startswith("error"), out  # nothing is forwarded
    assert lines["http"] == "200", out               # pod to pod over the bridge
    assert lines["route-out"] == "none 101", out    # ENETUNREACH: no route off the /24
    # Forwarding between the bridge and any other interface is dropped, whatever ip_forward says.
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert rules.count(RULE_COMMENT) == 2 and f"-i {BRIDGE}" in rules, rules
    core.delete_namespaced_service("web", NAMESPACE)
    for pod in ("web", "client"):
        core.delete_namespaced_pod(pod, NAMESPACE, grace_period_seconds=0)


def test_the_teardown_check_sees_what_a_node_leaves_behind(tmp_path):
    """HostState.diff, which the last e2e test holds the node's teardown to, does report an
    interface, an iptables chain and rule, a cgroup and a state path left behind; and the
    teardown's iptables clean-up removes a chain added since its snapshot."""
    from node import CGROUP_V1, HostState, iptables_rules, nft_tables, remove_added_iptables, remove_added_nft_tables
    before = HostState.snapshot()
    iptables_before, tables_before = iptables_rules("iptables"), nft_tables()
    cgroup = CGROUP_V1 / "pids" / "alexnet-job-e2e-probe"
    made = []
    try:
        subprocess.run(["ip", "link", "add", "alexnetprobe0", "type", "bridge"], check=True)
        made.append("link")
        subprocess.run(["iptables", "-N", "ALEXNET-PROBE"], check=True)
        subprocess.run(["iptables", "-A", "ALEXNET-PROBE", "-s", "10.213.99.0/24", "-j", "DROP"], check=True)
        made.append("chain")
        cgroup.mkdir()
        after = HostState.snapshot()
        found = "\n".join(before.diff(after))
        assert "interfaces: added alexnetprobe0" in found
        assert "chain filter ALEXNET-PROBE" in found and "rule filter -A ALEXNET-PROBE -s 10.213.99.0/24" in found
        assert f"cgroups: added {cgroup}" in found
        remove_added_iptables("iptables", iptables_before)
        remove_added_nft_tables(tables_before)
        assert "ALEXNET-PROBE" not in "\n".join(before.diff(HostState.snapshot()))
    finally:
        if cgroup.exists():
            cgroup.rmdir()
        if "chain" in made:
            subprocess.run(["iptables", "-F", "ALEXNET-PROBE"], capture_output=True)
            subprocess.run(["iptables", "-X", "ALEXNET-PROBE"], capture_output=True)
        if "link" in made:
            subprocess.run(["ip", "link", "delete", "alexnetprobe0"], check=True)
    # (Only what this test made: the node's pods may come and go meanwhile.)
    assert [line for line in before.diff(HostState.snapshot()) if "probe" in line.lower()] == []


def test_a_pod_reaches_the_api_server_with_its_serviceaccount_token(e2e, rendered):
    """In-cluster config, as the schedule's pod uses it: the `kubernetes` Service's address from the
    kubelet's environment, the projected token and CA. The API server authenticates the pod's
    ServiceAccount (a SelfSubjectReview needs no role)."""
    pod = pod_from_template(rendered, "in-cluster", ["sleep", "3600"])
    pod["spec"]["automountServiceAccountToken"] = True
    start_pod(e2e, pod)
    script = """
import os
from kubernetes import client, config
config.load_incluster_config()
print("host", os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
review = client.AuthenticationV1Api().create_self_subject_review({"apiVersion": "authentication.k8s.io/v1",
                                                                  "kind": "SelfSubjectReview"})
print("user", review.status.user_info.username)
"""
    out = exec_in(e2e, "in-cluster", "python", "-c", script)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)
    assert lines.get("host") == f"{e2e.plane.kubernetes_service_ip} 443", out
    account = rendered["spec"]["serviceAccountName"]
    assert lines.get("user") == f"system:serviceaccount:{NAMESPACE}:{account}", out
    from kubernetes import client
    client.CoreV1Api(e2e.api()).delete_namespaced_pod("in-cluster", NAMESPACE, grace_period_seconds=0)
