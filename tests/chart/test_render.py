"""The chart lints, renders, and what it renders is valid Kubernetes and valid KubeRay.

Core kinds are validated with kubernetes-validate --strict (unknown fields rejected). RayJob,
RayCluster and RayCronJob are validated against the KubeRay v1.7.0 CRDs' openAPIV3Schema, made
strict the same way (the API server with strict field validation rejects unknown fields; a CRD
schema alone would let a typo through), and every pod template embedded in them is also
validated strictly as a core PodTemplate.
"""

from __future__ import annotations

import json
from functools import cache

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chartlib import CASES, CHART, CRDS, KUBERNETES_VERSIONS, kinds, rayjob_specs, scheduled_rayjobs

pytestmark = pytest.mark.chart

CORE_KINDS = {"ConfigMap", "ServiceAccount", "CronJob", "Role", "RoleBinding", "Pod", "NetworkPolicy"}
CUSTOM_KINDS = {"RayJob", "RayCronJob"}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_helm_lint_strict(helm, case):
    result = helm("lint", "--strict", str(CHART), *case.args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_renders_only_known_kinds(render, case):
    found = {obj["kind"] for obj in render(case)}
    assert found <= CORE_KINDS | CUSTOM_KINDS, f"unexpected kinds {found - CORE_KINDS - CUSTOM_KINDS}"
    for obj in render(case):
        assert obj["metadata"]["namespace"] == "training", f"{obj['kind']} {obj['metadata']['name']} has no namespace"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_core_objects_are_valid_kubernetes(render, case, version):
    objects = [obj for obj in render(case) if obj["kind"] in CORE_KINDS]
    assert objects
    for obj in objects:
        _kubernetes_validate(obj, version, f"{obj['kind']} {obj['metadata']['name']}")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_kuberay_objects_match_the_crds(render, case):
    objects = render(case)
    checked = 0
    for obj in kinds(objects, "RayJob") + scheduled_rayjobs(objects):
        _crd_validate("rayjobs", obj)
        checked += 1
    for obj in kinds(objects, "RayCronJob"):
        _crd_validate("raycronjobs", obj)
        checked += 1
    # The RayCluster KubeRay builds from each RayJob's rayClusterSpec.
    for where, spec in rayjob_specs(objects):
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "cluster"},
                   "spec": spec["rayClusterSpec"]}
        _crd_validate("rayclusters", cluster)
    assert checked == 1, "every release renders exactly one RayJob, RayJob template or RayCronJob"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_pod_templates_inside_kuberay_objects_are_valid_kubernetes(render, case, version):
    for where, spec in rayjob_specs(render(case)):
        cluster = spec["rayClusterSpec"]
        templates = [("head", cluster["headGroupSpec"]["template"]), ("submitter", spec["submitterPodTemplate"])]
        templates += [(f"worker group {g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]]
        for name, template in templates:
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            _kubernetes_validate(wrapped, version, f"{where}: {name}")


def test_one_off_and_scheduled_modes_are_exclusive(render):
    by_name = {case.name: render(case) for case in CASES}
    one_off, nightly, ray_cron = by_name["defaults"], by_name["example-nightly"], by_name["full-raycronjob"]
    assert [o["kind"] for o in one_off if o["kind"] in {"RayJob", "CronJob", "RayCronJob", "Role"}] == ["RayJob"]
    assert not kinds(nightly, "RayJob"), "with schedule set the chart must not also start a RayJob now"
    assert len(kinds(nightly, "CronJob")) == 1 and len(scheduled_rayjobs(nightly)) == 1
    assert not kinds(ray_cron, "RayJob") and not kinds(ray_cron, "CronJob") and not kinds(ray_cron, "Role")
    assert not scheduled_rayjobs(ray_cron), "a RayCronJob carries its template itself"
    assert len(kinds(ray_cron, "RayCronJob")) == 1


def test_the_one_rayjob_template_is_shared(helm):
    """The one-off RayJob, the schedule's template and a RayCronJob's template are one define:
    rendered from the same values, they differ only in the run name the schedule leaves out."""

    def spec_of(*args: str) -> dict:
        result = helm("template", "same", str(CHART), "--namespace", "training", *args)
        assert result.returncode == 0, result.stderr
        objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        ((_, spec),) = rayjob_specs(objects)
        return spec

    one_off = spec_of()
    scheduled = spec_of("--set", "schedule=0 2 * * *")
    ray_cron = spec_of("--set", "schedule=0 2 * * *", "--set", "cron.useRayCronJob=true")
    assert one_off["entrypoint"] == scheduled["entrypoint"] + " --run-name same-alexnet-train"
    assert {**one_off, "entrypoint": scheduled["entrypoint"]} == scheduled
    assert ray_cron == scheduled


def _kubernetes_validate(obj: dict, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(part) for part in error.path)
        pytest.fail(f"{where} is not valid Kubernetes {version} at {path}: {error.message}")


@cache
def _crd_schema(plural: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(schema):
    """Reject unknown fields wherever the CRD lists an object's fields (as strict field validation does)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


def _crd_validate(plural: str, obj: dict) -> None:
    validator = jsonschema.Draft202012Validator(_crd_schema(plural))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '/'}: {e.message}" for e in errors[:10]]
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']} does not match the KubeRay {plural} CRD:\n"
                    + "\n".join(lines))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_worker_pods_drain_their_ray_node_before_kubernetes_stops_them(render, case):
    for where, spec in rayjob_specs(render(case)):
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            grace = pod.get("terminationGracePeriodSeconds")
            hook = pod["containers"][0].get("lifecycle", {}).get("preStop")
            if grace is None:
                assert hook is None, where
                continue
            script = hook["exec"]["command"][-1]
            assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in script, where
            # The drain deadline and the hook's wait both end before Kubernetes' SIGKILL.
            assert f"--deadline-remaining-seconds {grace - 5}" in script, where
            assert script.startswith(f"end=$(($(date +%s) + {grace - 10}));"), where
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["ALEXNET_JOB_PREEMPTION_MARKER"].startswith("/tmp/"), where  # /tmp is the pod's writable emptyDir
            # Ray's own SIGTERM drain would hold the pod another 30 s after the hook's checkpoint.
            assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0", where
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "lifecycle" not in head, where  # the head runs no training worker
        # ... and goes at once when deleted, rather than after Ray's 30 s drain on SIGTERM.
        assert {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "0"} in head["env"], where


def beside_head_pod_specs(objects: list[dict]) -> dict[str, dict]:
    """The pod specs of the pods that run beside the head: the submitter of each RayJob the release
    can create, the schedule's pod and the `helm test` pod."""
    specs = {f"submitter of {where}": spec["submitterPodTemplate"]["spec"] for where, spec in rayjob_specs(objects)}
    specs.update({f"CronJob {cron['metadata']['name']}": cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                  for cron in kinds(objects, "CronJob")})
    specs.update({f"Pod {pod['metadata']['name']}": pod["spec"] for pod in kinds(objects, "Pod")})
    return specs


@pytest.mark.parametrize("schedule", ["", "0 2 * * *"])
def test_the_pods_beside_the_head_are_placed_as_the_head_is(helm, schedule):
    """A node pool whose nodes are all tainted (or picked by a selector) must take the RayJob's
    submitter, the schedule's pod and the `helm test` pod too, or they are never scheduled: they
    get the head's nodeSelector, tolerations and affinity. (Found on the e2e layer's real node,
    which is tainted: first the submitter, then the schedule's pod.)"""
    placement = {"nodeSelector": {"pool": "training"},
                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}
    args = [arg for key, value in placement.items() for arg in ("--set-json", f"head.{key}={json.dumps(value)}")]
    result = helm("template", "placed", str(CHART), "--namespace", "training", "--set", f"schedule={schedule}", *args)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    ((_, spec),) = rayjob_specs(docs)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    beside = beside_head_pod_specs(docs)
    assert len(beside) == (3 if schedule else 2), list(beside)   # submitter, (CronJob,) test pod
    for key, value in placement.items():
        assert head[key] == value, key
        for pod, pod_spec in beside.items():
            assert pod_spec.get(key) == value, (pod, key)
    plain = helm("template", "plain", str(CHART), "--namespace", "training", "--set", f"schedule={schedule}")
    for pod, pod_spec in beside_head_pod_specs([doc for doc in yaml.safe_load_all(plain.stdout) if doc]).items():
        assert not {"nodeSelector", "tolerations", "affinity"} & set(pod_spec), pod
