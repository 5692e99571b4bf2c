"""Training jobs on a Kubernetes cluster: submit, status, list, logs, cancel, wait, prune.

The chart (charts/alexnet-train) is the one home of the RayJob spec: `submit` renders it with the
real helm binary and hands the objects to the kubernetes client; nothing here retypes the spec.
The schedule's pod submits the RayJob the chart rendered into its ConfigMap (`--manifest`).
Status is read from the RayJob alone (KubeRay mirrors its RayCluster's status into it), so the
schedule's Role (create/get/list/watch/delete rayjobs) is all `submit --manifest`, `wait` and
`prune` need. Knows nothing of TensorFlow or S3.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from job.errors import TrainingFailed, UserError

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
API_VERSION = f"{GROUP}/{VERSION}"
ROOT = Path(__file__).resolve().parent.parent
IMAGE_CHART = Path("/opt/alexnet-job/charts/alexnet-train")
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
OPERATOR_HINT = ("install the KubeRay operator v1.7.0 and its CRDs: helm install kuberay-operator "
                 "kuberay/kuberay-operator --version 1.7.0 (docs/kubernetes.md, step 1)")
TERMINAL_JOB_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}
TERMINAL_DEPLOYMENTS = {"Complete", "Failed", "ValidationFailed"}
NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' own generateName alphabet


class ClusterError(UserError):
    """The cluster cannot be reached or refuses the request: one line, exit 2."""


class KubeRayMissing(ClusterError):
    """The ray.io CRDs are not installed."""


class NameConflict(ClusterError):
    """An object of that name already exists."""


class Forbidden(ClusterError):
    """RBAC refused a request."""


class NotFound(ClusterError):
    """No such RayJob."""


# ----------------------------------------------------------------------------- connection

@dataclass
class Cluster:
    """A kubernetes ApiClient and the namespace commands act in."""
    api: object
    namespace: str
    server: str

    @property
    def custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self.api)

    @property
    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api)


def connect(namespace: str | None = None, context: str | None = None) -> Cluster:
    """The current kube context (KUBECONFIG or ~/.kube/config), or the pod's in-cluster config."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ and not os.environ.get("KUBECONFIG")
    default_namespace = "default"
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            if IN_CLUSTER_NAMESPACE.is_file():
                default_namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
        else:
            config.load_kube_config(context=context, client_configuration=configuration)
            _, active = config.list_kube_config_contexts()
            if context:
                active = next(c for c in config.list_kube_config_contexts()[0] if c["name"] == context)
            default_namespace = active.get("context", {}).get("namespace") or "default"
    except (ConfigException, OSError, StopIteration, TypeError) as error:
        raise ClusterError(f"no Kubernetes cluster configured ({one_line(error)}): set KUBECONFIG or a "
                           "current context in ~/.kube/config, or run inside a pod") from None
    configuration.retries = 1  # fail fast on an unreachable server; the caller says which one
    return Cluster(client.ApiClient(configuration), namespace or default_namespace, configuration.host)


def call(cluster: Cluster, what: str, function, *args, **kwargs):
    """Call the API; turn transport and HTTP errors into one-line ClusterErrors. A 404 that is not
    about a named object means the resource type itself is missing: say so if it is KubeRay's."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return function(*args, **kwargs)
    except ApiException as error:
        converted = api_error(cluster, what, error)
        if error.status == 404 and "ray.io" in what and "not found" not in str(converted).replace("Not Found", ""):
            require_kuberay(cluster)
        raise converted from None
    except (HTTPError, OSError) as error:
        raise ClusterError(f"cannot reach the Kubernetes API server at {cluster.server}: "
                           f"{one_line(getattr(error, 'reason', None) or error)}") from None


def api_error(cluster: Cluster, what: str, error) -> ClusterError:
    message = error.reason or ""
    try:
        body = json.loads(error.body or "{}")
        message = body.get("message") or message
    except (ValueError, TypeError):
        pass
    if error.status == 401:
        return ClusterError(f"the API server at {cluster.server} rejected our credentials (401): {message}")
    if error.status == 403:
        return Forbidden(f"permission denied to {what}: {message}")
    if error.status == 409:
        return NameConflict(f"cannot {what}: {message}")
    if error.status == 404 and "could not find the requested resource" in message:
        return KubeRayMissing(f"the cluster has no ray.io/v1 RayJob resource (KubeRay CRDs missing): {OPERATOR_HINT}")
    if error.status == 404:
        return NotFound(f"cannot {what}: {message}")
    return ClusterError(f"cannot {what}: {error.status} {message}")


def require_kuberay(cluster: Cluster) -> None:
    from kubernetes import client

    groups = call(cluster, "list API groups", client.ApisApi(cluster.api).get_api_versions)
    for group in groups.groups:
        if group.name == GROUP and any(v.version == VERSION for v in group.versions):
            resources = call(cluster, "list ray.io/v1 resources",
                             client.CustomObjectsApi(cluster.api).get_api_resources, GROUP, VERSION)
            if any(r.name == PLURAL for r in resources.resources):
                return
    raise KubeRayMissing(f"the cluster has no ray.io/v1 RayJob resource (KubeRay CRDs missing): {OPERATOR_HINT}")


# ----------------------------------------------------------------------------- rendering

def chart_path() -> Path:
    """ALEXNET_JOB_CHART, else the clone's charts/alexnet-train, else the image's copy."""
    if os.environ.get("ALEXNET_JOB_CHART"):
        path = Path(os.environ["ALEXNET_JOB_CHART"])
        if not (path / "Chart.yaml").is_file():
            raise UserError(f"ALEXNET_JOB_CHART={path} is not a Helm chart (no Chart.yaml)")
        return path
    for path in (ROOT / "charts" / "alexnet-train", IMAGE_CHART):
        if (path / "Chart.yaml").is_file():
            return path
    raise UserError("cannot find the alexnet-train chart: set ALEXNET_JOB_CHART to its folder")


def helm_binary() -> str:
    """helm on PATH: `submit` renders the chart with it (users bring their own, as for `helm install`)."""
    found = shutil.which("helm")
    if not found:
        raise UserError("helm is not installed: `alexnet-job submit` renders the chart with helm 3; install it "
                        "(https://helm.sh/docs/intro/install/, e.g. `brew install helm`) or put it on PATH")
    return found


def check_values_files(values_files) -> None:
    """The user's own values files first: before a cluster is looked for or helm runs."""
    for path in values_files:
        if not Path(path).is_file():
            raise UserError(f"values file {path} does not exist")


def render(release: str, namespace: str, values_files: list[str] = (), sets: list[str] = ()) -> list[dict]:
    """`helm template` of the chart: the objects one release makes (without the helm test pod)."""
    check_values_files(values_files)
    command = [helm_binary(), "template", release, str(chart_path()), "--namespace", namespace, "--skip-tests"]
    for path in values_files:
        command += ["-f", str(path)]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"invalid values: {helm_message(result.stderr)}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def helm_message(stderr: str) -> str:
    """helm's error as one line: the chart's own words (schema or `fail` message), no template path."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    lines = [re.sub(r"^Error: ", "", line) for line in lines]
    lines = [re.sub(r"^execution error at \([^)]*\): ", "", line) for line in lines]
    lines = [line for line in lines if line != "alexnet-train:" and not line.startswith(("WARNING", "Use --debug"))]
    text = "; ".join(line.lstrip("- ") for line in lines) or "helm template failed"
    return text.replace("values don't meet the specifications of the schema(s) in the following chart(s):; ",
                        "the chart's schema says: ")


# ----------------------------------------------------------------------------- submit

@dataclass
class Submitted:
    name: str
    namespace: str
    run_name: str | None
    output: str | None
    objects: list[str]

    @property
    def model_uri(self) -> str | None:
        if self.output and self.run_name:
            return f"{self.output.rstrip('/')}/runs/{self.run_name}/"
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "run_name": self.run_name,
                "output": self.output, "model": self.model_uri, "objects": self.objects}


def entrypoint_args(rayjob: dict) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def run_name_of(rayjob: dict) -> str | None:
    args = entrypoint_args(rayjob)
    return args[args.index("--run-name") + 1] if "--run-name" in args[:-1] else None


def output_of(objects: list[dict]) -> str | None:
    """`output` from the chart's config.yaml (the ConfigMap the Ray head reads)."""
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and "config.yaml" in obj.get("data", {}):
            return (yaml.safe_load(obj["data"]["config.yaml"]) or {}).get("output")
    return None


def job_output(cluster: Cluster, rayjob: dict) -> str | None:
    """`output` of the config.yaml the RayJob's head mounts (the chart's ConfigMap), or None."""
    head = rayjob["spec"].get("rayClusterSpec", {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
    for volume in head.get("volumes", []):
        name = (volume.get("configMap") or {}).get("name")
        if not name:
            continue
        try:
            config_map = call(cluster, f"get configmaps {name!r} in namespace {cluster.namespace}",
                              cluster.core.read_namespaced_config_map, name, cluster.namespace)
        except NotFound:
            continue
        if "config.yaml" in (config_map.data or {}):
            return (yaml.safe_load(config_map.data["config.yaml"]) or {}).get("output")
    return None


def submit(cluster: Cluster, release: str, values_files=(), sets=()) -> Submitted:
    """Render the chart for `release` and create its objects: the RayJob first (so a name
    conflict stops before anything is made), then its ConfigMap and ServiceAccount, owned by
    the RayJob so that `cancel` removes them too."""
    objects = render(release, cluster.namespace, values_files, sets)
    rayjobs = [obj for obj in objects if obj.get("kind") == KIND]
    if len(rayjobs) != 1:
        raise UserError("these values render no RayJob (is `schedule` set? a schedule is installed with "
                        "`helm install`, not submitted)")
    require_kuberay(cluster)
    rayjob = rayjobs[0]
    created = create_rayjob(cluster, rayjob)
    owner = {"apiVersion": API_VERSION, "kind": KIND, "name": created["metadata"]["name"],
             "uid": created["metadata"]["uid"], "blockOwnerDeletion": False}
    names = [f"rayjob/{created['metadata']['name']}"]
    for obj in objects:
        if obj is rayjob:
            continue
        obj.setdefault("metadata", {}).setdefault("ownerReferences", []).append(owner)
        create_object(cluster, obj)
        names.append(f"{obj['kind'].lower()}/{obj['metadata']['name']}")
    return Submitted(created["metadata"]["name"], cluster.namespace, run_name_of(rayjob), output_of(objects), names)


def create_rayjob(cluster: Cluster, rayjob: dict) -> dict:
    namespace = rayjob["metadata"].get("namespace") or cluster.namespace
    rayjob["metadata"]["namespace"] = namespace
    return call(cluster, f"create rayjobs.ray.io {rayjob['metadata']['name']!r} in namespace {namespace}",
                cluster.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, rayjob)


def create_object(cluster: Cluster, obj: dict) -> None:
    from kubernetes import utils

    kind, name = obj["kind"], obj["metadata"]["name"]
    obj["metadata"]["namespace"] = cluster.namespace
    try:
        utils.create_from_dict(cluster.api, obj, namespace=cluster.namespace)
    except utils.FailToCreateError as error:
        raise api_error(cluster, f"create {kind} {name!r} in namespace {cluster.namespace}",
                        error.api_exceptions[0]) from None


def read_manifest(path: str) -> dict:
    """A RayJob manifest as the chart rendered it (the schedule's ConfigMap holds one)."""
    try:
        rayjob = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read the RayJob manifest {path}: {one_line(error)}") from None
    if not isinstance(rayjob, dict) or rayjob.get("kind") != KIND or rayjob.get("apiVersion") != API_VERSION:
        raise UserError(f"{path} is not a {API_VERSION} {KIND} manifest")
    return rayjob


def submit_manifest(cluster: Cluster, rayjob: dict, generate_name: bool = False,
                    promote_if_better: str | None = None, attempts: int = 5) -> Submitted:
    """The schedule's path: create the RayJob the chart rendered into its ConfigMap (read by
    read_manifest). With --generate-name it gets a unique name (`<name>-<5 chars>`, as
    Kubernetes' generateName) and its run is named after it (`--run-name`), so a RayJob retry
    resumes that run."""
    if cluster.namespace and not rayjob["metadata"].get("namespace"):
        rayjob["metadata"]["namespace"] = cluster.namespace
    require_kuberay(cluster)
    base = rayjob["metadata"]["name"]
    for attempt in range(attempts if generate_name else 1):
        job = json.loads(json.dumps(rayjob))
        name = f"{base}-{''.join(secrets.choice(NAME_SUFFIX_ALPHABET) for _ in range(5))}" if generate_name else base
        job["metadata"]["name"] = name
        extra = []
        if generate_name and run_name_of(job) is None:
            extra += ["--run-name", name]
        if promote_if_better:
            extra += ["--promote-if-better", promote_if_better]
        if extra:
            job["spec"]["entrypoint"] = shlex.join(entrypoint_args(job) + extra)
        try:
            created = create_rayjob(cluster, job)
        except NameConflict:
            if generate_name and attempt < attempts - 1:
                continue
            raise
        return Submitted(created["metadata"]["name"], created["metadata"]["namespace"], run_name_of(job), None,
                         [f"rayjob/{created['metadata']['name']}"])
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- reading

def get(cluster: Cluster, name: str) -> dict:
    return call(cluster, f"get rayjobs.ray.io {name!r} in namespace {cluster.namespace}",
                cluster.custom.get_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL, name)


def list_jobs(cluster: Cluster, selector: str | None = None) -> list[dict]:
    """RayJobs of the namespace, newest first."""
    result = call(cluster, f"list rayjobs.ray.io in namespace {cluster.namespace}",
                  cluster.custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL,
                  label_selector=selector or "")
    return sorted(result["items"], key=lambda j: (j["metadata"]["creationTimestamp"], j["metadata"]["name"]),
                  reverse=True)


def summary(rayjob: dict) -> dict:
    """What `status` and `list` show, from the RayJob alone."""
    status = rayjob.get("status") or {}
    cluster_status = status.get("rayClusterStatus") or {}
    desired = cluster_status.get("desiredWorkerReplicas")
    if desired is None:
        desired = sum(g.get("replicas", 0) for g in rayjob["spec"].get("rayClusterSpec", {}).get("workerGroupSpecs", []))
    return {
        "name": rayjob["metadata"]["name"],
        "namespace": rayjob["metadata"]["namespace"],
        "created": rayjob["metadata"]["creationTimestamp"],
        "run_name": run_name_of(rayjob),
        "job_deployment_status": status.get("jobDeploymentStatus") or "New",
        "job_status": status.get("jobStatus") or "",
        "reason": status.get("reason") or "",
        "message": status.get("message") or "",
        "start_time": status.get("startTime") or "",
        "end_time": status.get("endTime") or "",
        "ray_cluster": status.get("rayClusterName") or "",
        "workers_ready": cluster_status.get("readyWorkerReplicas", 0),
        "workers_desired": desired,
        "failed": status.get("failed", 0),
        "succeeded": status.get("succeeded", 0),
    }


def is_terminal(info: dict) -> bool:
    return info["job_deployment_status"] in TERMINAL_DEPLOYMENTS


def succeeded(info: dict) -> bool:
    return info["job_deployment_status"] == "Complete" and info["job_status"] == "SUCCEEDED"


def wait(cluster: Cluster, name: str, progress=None, timeout: float | None = None, interval: float = 2.0) -> dict:
    """Poll the RayJob until it is Complete or Failed; `progress(info)` on each change.
    Raises TrainingFailed (exit 1) if it did not succeed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = None
    while True:
        info = summary(get(cluster, name))
        key = (info["job_deployment_status"], info["job_status"], info["workers_ready"], info["reason"])
        if key != seen and progress:
            progress(info)
        seen = key
        if is_terminal(info):
            if not succeeded(info):
                detail = f": {info['reason']} {info['message']}".rstrip() if info["reason"] or info["message"] else ""
                raise TrainingFailed(f"RayJob {name} ended {info['job_deployment_status']}"
                                     f"{' / ' + info['job_status'] if info['job_status'] else ''}{detail}")
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"RayJob {name} is still {info['job_deployment_status']} after {timeout:.0f}s")
        time.sleep(interval)


# ----------------------------------------------------------------------------- logs

def log_pod(cluster: Cluster, name: str) -> tuple[str, str]:
    """The pod that prints the driver's output: the submitter (`ray job submit` follows the
    job's logs), else the Ray head. Returns (pod name, container)."""
    rayjob = get(cluster, name)
    ns = cluster.namespace
    submitter = call(cluster, f"list pods in namespace {ns}", cluster.core.list_namespaced_pod, ns,
                     label_selector=f"batch.kubernetes.io/job-name={name}").items
    if submitter:
        newest = max(submitter, key=lambda p: p.metadata.creation_timestamp)
        return newest.metadata.name, newest.spec.containers[0].name
    ray_cluster = (rayjob.get("status") or {}).get("rayClusterName")
    if ray_cluster:
        heads = call(cluster, f"list pods in namespace {ns}", cluster.core.list_namespaced_pod, ns,
                     label_selector=f"ray.io/cluster={ray_cluster},ray.io/node-type=head").items
        if heads:
            return heads[0].metadata.name, heads[0].spec.containers[0].name
    raise ClusterError(f"RayJob {name} has no submitter or head pod yet "
                       f"({summary(rayjob)['job_deployment_status']}): try again when it is Running")


def logs(cluster: Cluster, name: str, follow: bool = False, write=print) -> None:
    pod, container = log_pod(cluster, name)
    if not follow:
        text = call(cluster, f"get pods/log of {pod}", cluster.core.read_namespaced_pod_log, pod,
                    cluster.namespace, container=container)
        for line in text.splitlines():
            write(line)
        return
    response = call(cluster, f"get pods/log of {pod}", cluster.core.read_namespaced_pod_log, pod,
                    cluster.namespace, container=container, follow=True, _preload_content=False)
    try:
        buffer = b""
        for chunk in response.stream(1024):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                write(line.decode(errors="replace"))
        if buffer:
            write(buffer.decode(errors="replace"))
    finally:
        response.release_conn()


def saved_logs(cluster: Cluster, name: str) -> tuple[str, str] | None:
    """(where, text) of the driver's output the RayJob's run saved in its storage (the newest
    attempt's last: all of them, oldest first), or None if there is none or it cannot be read."""
    from job import runlogs
    from job.storage import StorageError
    rayjob = get(cluster, name)
    output, run_name = job_output(cluster, rayjob), run_name_of(rayjob)
    if not (output and run_name):
        return None
    try:
        uri, logs = runlogs.saved(output, run_name)
    except (OSError, StorageError):
        return None
    drivers = [text for file, text in logs if file.startswith("driver-")]
    return (uri, "".join(drivers)) if drivers else None


# ----------------------------------------------------------------------------- cancel, prune

def cancel(cluster: Cluster, name: str) -> None:
    """Delete the RayJob; Kubernetes' garbage collector deletes its RayCluster, pods, submitter
    and what `submit` made, all owned by it."""
    from kubernetes import client

    call(cluster, f"delete rayjobs.ray.io {name!r} in namespace {cluster.namespace}",
         cluster.custom.delete_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL, name,
         body=client.V1DeleteOptions(propagation_policy="Background"))


def prune(cluster: Cluster, keep: int, selector: str) -> dict:
    """Delete all but the `keep` newest RayJobs matching `selector`, except ones still running."""
    if keep < 0:
        raise UserError(f"--keep must be 0 or more, not {keep}")
    if not selector or "=" not in selector:
        raise UserError("--selector must be LABEL=VALUE (e.g. alexnet-job/schedule=nightly)")
    jobs = list_jobs(cluster, selector)
    deleted, kept, running = [], [j["metadata"]["name"] for j in jobs[:keep]], []
    for job in jobs[keep:]:
        info = summary(job)
        if not is_terminal(info):
            running.append(info["name"])
            continue
        try:
            cancel(cluster, info["name"])
        except NotFound:
            pass  # another pruner was first
        deleted.append(info["name"])
    return {"kept": kept, "deleted": deleted, "still_running": running}


def one_line(error) -> str:
    return " ".join(str(error).split())
