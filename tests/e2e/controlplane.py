"""A real, loopback-only Kubernetes control plane for the e2e tests and bench/scale.py.

etcd, kube-apiserver (TLS, RBAC, real ServiceAccount tokens), kube-controller-manager,
kube-scheduler, KWOK (simulated nodes and pod lifecycles, and the kubelet API for pod logs) and
the KubeRay operator, all built by scripts/build-control-plane and run as child processes of
this one. Everything binds to and connects to 127.0.0.0/8 only:

- the API server binds and advertises 127.0.0.1; its `kubernetes` Service gets a ClusterIP from a
  service CIDR inside 127.0.0.0/8, and the endpoint reconciler is off, so that Service has no
  endpoints at all (nothing here resolves cluster DNS or uses in-cluster config anyway);
- simulated nodes carry 127.0.0.x InternalIPs and pods get 127.1.x.x IPs; the API server refuses
  loopback addresses in Endpoints and EndpointSlices, so no Service ever points anywhere;
- KWOK serves the kubelet API (pod logs) on 127.0.0.1 with a certificate the API server checks;
  CPU nodes advertise that address, GPU nodes their own 127.0.0.x, where nothing listens;
- the KubeRay operator reaches a Ray head's dashboard only through the API server's service
  proxy (--use-kubernetes-proxy), never by resolving `*.svc.cluster.local` with the host's DNS;
- metrics and health endpoints bind 127.0.0.1 or are off.

`ControlPlane.start()` raises ControlPlaneError with the reason (and the failing component's
log tail) when something does not come up; `stop()` ends only the processes it started.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
BUILD_SCRIPT = ROOT / "scripts" / "build-control-plane"
FETCH_TOOLS = ROOT / "scripts" / "fetch-tools"

# Without a real node the Services' ClusterIPs lead nowhere (the `kubernetes` one is 127.0.96.1);
# with one, the node passes a range on its pod bridge (node.service_range) instead.
SERVICE_CIDR = "127.0.96.0/24"
POD_CIDR = "127.1.0.1/16"        # KWOK's pod IPs
KUBELET_IP = "127.0.0.1"         # where KWOK serves the kubelet API (CPU nodes advertise it)
GPU = "nvidia.com/gpu"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


RAYSERVICE_STUB = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayservices.ray.io"},
    "spec": {"group": "ray.io", "scope": "Namespaced",
             "names": {"kind": "RayService", "listKind": "RayServiceList", "plural": "rayservices",
                       "singular": "rayservice"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}


class ControlPlaneError(RuntimeError):
    pass


class PollTimeout(Exception):
    def __init__(self, last_error):
        super().__init__(last_error)
        self.last_error = last_error


def poll(condition, timeout: float, interval: float, before_each=None):
    """Call `condition` until it returns something truthy (its errors count as not yet) and
    return that; PollTimeout, holding the last error, once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if before_each:
            before_each()
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last_error = error
        time.sleep(interval)
    raise PollTimeout(last_error)


def k8s_version() -> str:
    """The Kubernetes version every binary is built at: the wrapper module's k8s.io/kubernetes."""
    for line in (ROOT / "tools" / "control-plane" / "go.mod").read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["k8s.io/kubernetes"] and fields[1].startswith("v"):
            return fields[1]
    raise ControlPlaneError("no k8s.io/kubernetes version in tools/control-plane/go.mod")


def build(env: dict | None = None) -> Path:
    """scripts/build-control-plane (cached): the dir holding every binary."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise ControlPlaneError(f"scripts/build-control-plane failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def tools_bin() -> Path:
    """scripts/fetch-tools (helm, kubectl)."""
    result = subprocess.run([str(FETCH_TOOLS)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"scripts/fetch-tools failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- certificates

def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def sign(pki: Path, name: str, subject: str, extensions: str) -> None:
    """<name>.key and <name>.crt in `pki`, signed by its CA."""
    (pki / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "7", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)


def make_pki(pki: Path, api_addresses: tuple[str, ...] = ()) -> None:
    """A CA, the API server's and KWOK's serving certificates, client certificates per identity,
    and the ServiceAccount token signing key. The API server's certificate also names
    `api_addresses` (where pods reach it)."""
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "7", "-subj", "/CN=alexnet-job-e2e-ca", cwd=pki)
    serving = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    api_serving = serving.replace("DNS:localhost", ",".join(["DNS:localhost", "DNS:kubernetes.default.svc",
                                                            *(f"IP:{a}" for a in api_addresses)]))
    client = "extendedKeyUsage=clientAuth\n"
    certs = {  # name: (subject, extensions)
        "apiserver": ("/CN=kube-apiserver", api_serving),
        "kubelet": ("/CN=kwok-kubelet", serving),
        "admin": ("/O=system:masters/CN=e2e-admin", client),
        "controller-manager": ("/CN=system:kube-controller-manager", client),
        "scheduler": ("/CN=system:kube-scheduler", client),
        # KWOK plays every kubelet and the operator is trusted here: its own RBAC is not under test.
        "kwok": ("/O=system:masters/CN=kwok", client),
        "operator": ("/O=system:masters/CN=kuberay-operator", client),
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", client),
    }
    for name, (subject, extensions) in certs.items():
        sign(pki, name, subject, extensions)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig(server: str, ca: Path, user: str, cert: Path | None = None, key: Path | None = None,
               token: str | None = None, namespace: str = "default") -> dict:
    creds = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user, "namespace": namespace}}],
    }


# ----------------------------------------------------------------------------- processes

@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log: Path


def clean_env() -> dict:
    """The components' environment: no proxies (nothing may leave the machine), no stray kubeconfig."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "kubeconfig")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.0/8,localhost"
    return env


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path
    components: list[Component] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    on_spawn: object = None  # called with each started component's pid (e.g. to watch its sockets)
    service_cidr: str = SERVICE_CIDR

    def __post_init__(self):
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.etcd_port, self.peer_port, self.api_port, self.kubelet_port = (free_port() for _ in range(4))
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        # The API server gives the `kubernetes` Service the range's first address.
        self.kubernetes_service_ip = str(next(ipaddress.ip_network(self.service_cidr).hosts()))
        self.kwok_logs = self.workdir / "pod-logs"   # what KWOK serves as containers' logs
        self.driver_log = self.kwok_logs / "driver.log"

    # -- lifecycle

    def start(self) -> "ControlPlane":
        started = time.monotonic()
        try:
            make_pki(self.pki, (self.kubernetes_service_ip,))
            for name in ("admin", "controller-manager", "scheduler", "kwok", "operator"):
                cfg = kubeconfig(self.server, self.pki / "ca.crt", name, self.pki / f"{name}.crt",
                                 self.pki / f"{name}.key")
                (self.workdir / f"{name}.kubeconfig").write_text(yaml.safe_dump(cfg))
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self.install_crds()
            self._start_operator()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM each component this object started (newest first), then SIGKILL stragglers."""
        for component in reversed(self.components):
            if component.process.poll() is None:
                component.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for component in reversed(self.components):
            try:
                component.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                component.process.kill()
                component.process.wait()
        self.components.clear()

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.components]

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> Component:
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        process = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=self.workdir, env={**clean_env(), **(env or {})})
        handle.close()
        component = Component(name, process, log)
        self.components.append(component)
        if self.on_spawn:
            self.on_spawn(process.pid)
        return component

    def check_alive(self) -> None:
        for c in self.components:
            if c.process.poll() is not None:
                raise ControlPlaneError(f"{c.name} exited with code {c.process.returncode}:\n{tail(c.log)}")

    def wait_for(self, what: str, condition, timeout: float = 60, component: Component | None = None):
        try:
            return poll(condition, timeout, 0.2, before_each=self.check_alive)
        except PollTimeout as timed_out:
            logs = f"\n{component.name} log:\n{tail(component.log)}" if component else ""
            raise ControlPlaneError(f"{what} not ready after {timeout:.0f}s (last error: {timed_out.last_error}){logs}")

    # -- components

    def _start_etcd(self) -> None:
        etcd = self.spawn("etcd", [
            "etcd", "--name=e2e", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-cluster=e2e=http://127.0.0.1:{self.peer_port}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        self.wait_for("etcd", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{self.etcd_port}/health", timeout=2).status == 200, component=etcd)

    def _start_apiserver(self) -> None:
        p = self.pki
        api = self.spawn("kube-apiserver", [
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            # Node: the real node's kubelet gets exactly a node's rights (system:node:<name>).
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}", f"--api-audiences={SA_ISSUER}",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-cluster-ip-range={self.service_cidr}",
            # No endpoints for the `kubernetes` Service: nothing is ever sent to its ClusterIP.
            "--endpoint-reconciler-type=none",
            # Pod logs: the API server reaches a node's kubelet (KWOK) at its InternalIP, checking
            # its certificate against our CA.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            "--profiling=false", "--v=1",
        ])
        self.wait_for("kube-apiserver", self._healthy, timeout=90, component=api)

    def _healthy(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=3) as response:
            return response.status == 200

    def _start_controller_manager(self) -> None:
        p = self.pki
        self.spawn("kube-controller-manager", [
            "kube-controller-manager", f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            f"--service-cluster-ip-range={self.service_cidr}",
            # Simulated nodes: no node lifecycle (taints, evictions) or cloud controllers.
            "--controllers=*,-node-lifecycle-controller,-cloud-node-lifecycle-controller",
            "--concurrent-cron-job-syncs=2", "--v=1",
        ])

    def _start_scheduler(self) -> None:
        self.spawn("kube-scheduler", [
            "kube-scheduler", f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--v=1",
        ])

    def _start_kwok(self) -> None:
        self.kwok_logs.mkdir(exist_ok=True)
        self.driver_log.write_text("")
        # Logs of Ray containers, served by KWOK's kubelet API: a file the test writes to.
        config = [{
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "ClusterLogs", "metadata": {"name": "ray"},
            "spec": {"selector": {}, "logs": [{"containers": ["ray-head", "ray-job-submitter"],
                                               "logsFile": str(self.driver_log), "follow": True}]},
        }]
        config_file = self.workdir / "kwok.yaml"
        # KWOK's own default stages (nodes Ready, pods Running, Job pods Succeeded), then ours.
        stages = [stage for stage in yaml.safe_load_all((self.bin_dir / "kwok-stages.yaml").read_text()) if stage]
        (pod_complete,) = [stage for stage in stages if stage["metadata"]["name"] == "pod-complete"]
        # Except the RayJob's submitter: a real `ray job submit` follows the Ray job and runs as
        # long as it does. Had it Succeeded at once, KubeRay would fail the RayJob 30 s later
        # (submitter done, no Ray job found) and retry it on a new cluster every 30 s, so its
        # pods would come and go under the tests.
        pod_complete["spec"]["selector"]["matchExpressions"].append(
            {"key": ".spec.containers.[].name", "operator": "NotIn", "values": ["ray-job-submitter"]})
        config_file.write_text(yaml.safe_dump_all(stages + config))
        self.spawn("kwok", [
            "kwok", f"--kubeconfig={self.workdir / 'kwok.kubeconfig'}", f"--config={config_file}",
            "--manage-nodes-with-label-selector=type=kwok",
            f"--cidr={POD_CIDR}", f"--node-ip={KUBELET_IP}", f"--node-port={self.kubelet_port}",
            f"--server-address={KUBELET_IP}:{self.kubelet_port}",
            f"--tls-cert-file={self.pki / 'kubelet.crt'}", f"--tls-private-key-file={self.pki / 'kubelet.key'}",
        ], env={"HOME": str(self.workdir)})  # KWOK reads ~/.kwok: keep the user's out

    def _start_operator(self) -> None:
        self.spawn("ray-operator", [
            "ray-operator", f"--kubeconfig={self.workdir / 'operator.kubeconfig'}",
            "--enable-leader-election=false", "--use-kubernetes-proxy",
            f"--metrics-addr=127.0.0.1:{free_port()}", f"--health-probe-bind-address=127.0.0.1:{free_port()}",
            "--log-stdout-encoder=console",
        ])

    def driver_output(self, *lines: str, append: bool = True) -> None:
        """Add lines to what KWOK serves as the Ray containers' output (CRI log format, as a
        kubelet's container runtime writes it)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        with self.driver_log.open("a" if append else "w") as log:
            log.writelines(f"{stamp} stdout F {line}\n" for line in lines)

    # -- API objects

    def api(self):
        """A kubernetes ApiClient authenticated as the cluster admin."""
        from kubernetes import config
        return config.new_client_from_config(str(self.kubeconfig))

    def install_crds(self) -> None:
        """KubeRay's CRDs as the chart is tested against (../shared/kuberay-crds), plus a stub
        RayService CRD: the operator watches RayServices and exits if it cannot, but that CRD is
        not among the shared ones and nothing here makes RayServices."""
        from kubernetes import client, utils
        from kubernetes.client.exceptions import ApiException
        api = self.api()
        ext = client.ApiextensionsV1Api(api)
        existing = {crd.metadata.name for crd in ext.list_custom_resource_definition().items}
        files = sorted(CRDS.glob("ray.io_*.yaml"))
        if len(files) < 3:  # RayJob, RayCluster, RayCronJob: never start a cluster without them
            raise RuntimeError(f"KubeRay CRDs missing: expected ray.io_*.yaml in {CRDS} (../shared beside the clone)")
        for path in files:
            if yaml.safe_load(path.read_text())["metadata"]["name"] not in existing:
                utils.create_from_yaml(api, str(path))
        if "rayservices.ray.io" not in existing:
            try:
                ext.create_custom_resource_definition(RAYSERVICE_STUB)
            except ApiException as error:
                if error.status != 409:
                    raise

        def established():
            for crd in ext.list_custom_resource_definition().items:
                if crd.spec.group == "ray.io":
                    conditions = {c.type: c.status for c in crd.status.conditions or []}
                    if conditions.get("Established") != "True":
                        return False
            return True
        self.wait_for("KubeRay CRDs", established)

    def wait_ready(self) -> None:
        from kubernetes import client
        core = client.CoreV1Api(self.api())
        # The default ServiceAccount (controller-manager) and the ServiceAccount admission need it.
        self.wait_for("default ServiceAccount",
                      lambda: core.read_namespaced_service_account("default", "default"), timeout=60)
        self.wait_for("kube-root-ca.crt ConfigMap",
                      lambda: core.read_namespaced_config_map("kube-root-ca.crt", "default"), timeout=60)

    def add_nodes(self, cpu_nodes: int = 1, gpu_nodes: int = 4, gpus_per_node: int = 8,
                  gpu_product: str = "NVIDIA-A100-SXM4-80GB", prefix: str = "") -> list[str]:
        """Simulated nodes: CPU nodes advertise KWOK's kubelet address (127.0.0.1); GPU nodes get
        `nvidia.com/gpu` capacity, the labels of NVIDIA's GPU feature discovery, the usual
        `nvidia.com/gpu:NoSchedule` taint and their own 127.0.0.x address."""
        from kubernetes import client
        core = client.CoreV1Api(self.api())
        names = []
        for kind, count in (("cpu", cpu_nodes), ("gpu", gpu_nodes)):
            for i in range(count):
                name = f"{prefix}{kind}-{i}"
                labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                          "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": f"sim-{kind}"}
                capacity = {"cpu": "96", "memory": "1Ti", "pods": "110"}
                taints = []
                address = KUBELET_IP
                if kind == "gpu":
                    labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": gpu_product,
                               "nvidia.com/gpu.count": str(gpus_per_node)}
                    capacity[GPU] = str(gpus_per_node)
                    taints = [{"key": GPU, "value": "present", "effect": "NoSchedule"}]
                    address = f"127.0.{2 + i // 250}.{1 + i % 250}"
                node = {
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
                    "spec": {"taints": taints},
                    "status": {"capacity": capacity, "allocatable": capacity,
                               "addresses": [{"type": "InternalIP", "address": address},
                                             {"type": "Hostname", "address": name}]},
                }
                core.create_node(node)
                names.append(name)

        def ready():
            nodes = {n.metadata.name: n for n in core.list_node(label_selector="type=kwok").items}
            return all(name in nodes and any(c.type == "Ready" and c.status == "True"
                                             for c in nodes[name].status.conditions or []) for name in names)
        self.wait_for(f"{len(names)} simulated nodes", ready, timeout=120)
        for name in names:
            lift_not_ready_taint(core, name)
        return names


def lift_not_ready_taint(core, name: str) -> None:
    """The API server taints every new node `not-ready`; the node lifecycle controller, which
    would lift it, is off (simulated nodes send no heartbeats). Lift it here, once it is Ready."""
    node = core.read_node(name)
    taints = [t for t in node.spec.taints or [] if t.key != "node.kubernetes.io/not-ready"]
    core.patch_node(name, {"spec": {"taints": [{"key": t.key, "value": t.value, "effect": t.effect}
                                               for t in taints] or None}})


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def which(name: str, *dirs: Path) -> str:
    for d in dirs:
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise ControlPlaneError(f"{name} not found")
    return found
