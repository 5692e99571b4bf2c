"""Policy over everything the chart can render: every pod (Ray head and workers, the submitter, the
schedule's pod, the test pod) passes Pod Security "restricted", runs with requests equal to limits,
mounts a service-account token only where it needs the API, and gets credentials only by
reference; the schedule's Role grants exactly what `submit` and `prune` need.
"""

from __future__ import annotations

import re

import pytest
import yaml

from chartlib import CASES, CHART, kinds, pod_specs, rayjob_specs, values_of

pytestmark = pytest.mark.chart

# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY|API_KEY", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_pod_passes_pod_security_restricted(render, case):
    pods = pod_specs(render(case))
    assert pods
    problems = [f"{where}: {problem}" for where, template in pods for problem in _restricted(template["spec"])]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_container_has_requests_equal_to_limits(render, case):
    for where, template in pod_specs(render(case)):
        for container in _containers(template["spec"]):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}/{container['name']}: requests {requests}"
            assert requests == limits, f"{where}/{container['name']}: requests {requests} != limits {limits}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_only_the_schedules_pod_mounts_a_token(render, case):
    objects = render(case)
    for where, template in pod_specs(objects):
        wanted = where.startswith("CronJob ")  # it creates, watches and prunes RayJobs
        assert template["spec"].get("automountServiceAccountToken") is wanted, where
    for account in kinds(objects, "ServiceAccount"):
        if not account["metadata"]["name"].endswith("-retrain"):
            assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_credentials_only_by_reference(render, case):
    objects = render(case)
    assert not kinds(objects, "Secret"), "the chart never holds credentials itself"
    for where, template in pod_specs(objects):
        for container in _containers(template["spec"]):
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                        f"{where}/{container['name']}: {env['name']} is not taken from a Secret"
                assert not AWS_KEY_ID.search(str(env.get("value", ""))), f"{where}: a key id in {env['name']}"
            for source in container.get("envFrom", []):
                assert set(source) == {"secretRef"}, f"{where}: envFrom {source}"
    for config in kinds(objects, "ConfigMap"):
        text = str(config["data"])
        assert not AWS_KEY_ID.search(text) and not re.search(r"(?i)secret_access_key\s*:", text), \
            f"ConfigMap {config['metadata']['name']} holds a credential"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ray_pods_have_sized_shm_and_a_writable_tmp(render, case):
    for where, spec in rayjob_specs(render(case)):
        cluster = spec["rayClusterSpec"]
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for name, group in groups:
            pod = group["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"], f"{where} {name}: /dev/shm {shm}"
            assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"], f"{where} {name}: /tmp is not a sized emptyDir"
            assert mounts["/etc/alexnet-job"] == "config"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_workers_are_a_static_gang_and_the_head_has_no_gpu(render, case):
    for where, spec in rayjob_specs(render(case)):
        cluster = spec["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert not [r for r in head["limits"] if r.endswith("/gpu")], f"{where}: the head asks for a GPU"
        (group,) = cluster["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1, where
        assert cluster["rayVersion"], where


def test_default_workers_own_whole_nodes(render):
    objects = render(next(case for case in CASES if case.name == "defaults"))
    ((_, spec),) = rayjob_specs(objects)
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    (term,) = worker["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    assert term["matchLabelKeys"] == ["ray.io/cluster"], "spread within one run's cluster, not across runs"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "training workers must not land on the head"
    for template in (head["template"]["spec"], worker):
        assert template["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_rbac_grants_exactly_what_submit_and_prune_need(render, case):
    objects = render(case)
    assert not kinds(objects, "ClusterRole") and not kinds(objects, "ClusterRoleBinding")
    roles, bindings, crons = kinds(objects, "Role"), kinds(objects, "RoleBinding"), kinds(objects, "CronJob")
    assert len(roles) == len(bindings) == len(crons) <= 1
    for role, binding, cron in zip(roles, bindings, crons):
        assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                  "verbs": ["create", "get", "list", "watch", "delete"]}]
        account = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                        "namespace": role["metadata"]["namespace"]}]
        ray_accounts = {t["spec"]["serviceAccountName"] for w, t in pod_specs(objects) if not w.startswith("CronJob")}
        assert account not in ray_accounts, "the Ray pods must not share the schedule's rights"


def test_the_policy_catches_a_bad_pod():
    """The checks above can fail: a root, privileged, hostPath pod breaks each rule."""
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True, "runAsUser": 0,
                                                           "capabilities": {"add": ["SYS_ADMIN"]}},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}
    problems = "\n".join(_restricted(bad))
    for expected in ("hostNetwork", "hostPath", "privileged", "runAsUser 0", "runAsNonRoot",
                     "allowPrivilegeEscalation", "drop ALL", "adds SYS_ADMIN", "seccomp", "hostPort"):
        assert expected in problems, f"{expected!r} not reported:\n{problems}"


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"] + pod.get("ephemeralContainers", [])


def _restricted(pod: dict) -> list[str]:
    """Violations of Pod Security "restricted" (and so of "baseline") in a pod spec."""
    problems = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field) is True:
            problems.append(f"{field} is true")
    for volume in pod.get("volumes", []):
        kind = (set(volume) - {"name"}).pop()
        if kind not in RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} is a {kind}")
    pod_context = pod.get("securityContext", {})
    if pod_context.get("sysctls"):
        problems.append("sets sysctls")
    for container in _containers(pod):
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            problems.append(f"{name} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name} does not set allowPrivilegeEscalation: false")
        if not (context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True):
            problems.append(f"{name} does not set runAsNonRoot: true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name} has runAsUser 0")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name} does not drop ALL capabilities")
        problems += [f"{name} adds {cap}" for cap in capabilities.get("add", []) if cap != "NET_BIND_SERVICE"]
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name} has seccomp profile {seccomp}")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name} sets procMount")
        problems += [f"{name} uses hostPort {p['hostPort']}" for p in container.get("ports", []) if p.get("hostPort")]
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) applied to labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for rule in selector.get("matchExpressions", []):
        key, operator, values = rule["key"], rule["operator"], rule.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ray_refuses_callers_without_the_clusters_token(render, case):
    for where, spec in rayjob_specs(render(case)):
        assert spec["rayClusterSpec"].get("authOptions") == {"mode": "token"}, where


def test_ray_token_authentication_can_be_turned_off(helm):
    out = helm("template", "open", str(CHART), "--set", "rayAuth.mode=disabled", "--set", "networkPolicy.enabled=false")
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [spec["rayClusterSpec"].get("authOptions") for _, spec in rayjob_specs(objects)] == [None]
    assert kinds(objects, "NetworkPolicy") == []


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_only_the_releases_ray_pods_submitter_and_the_operator_reach_the_ray_pods(render, case):
    objects = render(case)
    (policy,) = kinds(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    pods = {where: template["metadata"]["labels"] for where, template in pod_specs(objects)}
    guarded = {where for where, labels in pods.items() if _selects(spec["podSelector"], labels)}
    assert guarded == {where for where in pods if where.endswith((" head", "worker group workers"))}, guarded
    admitted_everywhere = [rule for rule in spec["ingress"] if "ports" not in rule]
    (own,) = admitted_everywhere
    (peer,) = own["from"]
    assert set(peer) == {"podSelector"}   # this namespace only
    admitted = {where for where, labels in pods.items() if _selects(peer["podSelector"], labels)}
    assert admitted == guarded | {where for where in pods if where.endswith(" submitter")}, admitted
    # Another release's Ray pods (same chart, another instance) are not admitted.
    for labels in pods.values():
        assert not _selects(peer["podSelector"], {**labels, "app.kubernetes.io/instance": "someone-else"})
    operator = spec["ingress"][1]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]   # the dashboard only
    values = values_of(case)
    assert operator["from"] == [values["networkPolicy"]["operator"]]
    assert spec["ingress"][2:] == values["networkPolicy"]["extraIngress"]


def test_the_operator_is_admitted_to_the_dashboard_port_the_head_uses(helm):
    out = helm("template", "port", str(CHART), "--set-string", "head.rayStartParams.dashboard-port=8300")
    assert out.returncode == 0, out.stderr
    (policy,) = kinds([d for d in yaml.safe_load_all(out.stdout) if d], "NetworkPolicy")
    assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 8300}]
