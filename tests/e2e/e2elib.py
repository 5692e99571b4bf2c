"""What the e2e tests share: the E2E handle on the session's control plane, and wait_until.

(A module of its own, not conftest.py: test modules import from it, and `conftest` is a name
every test directory uses.) session.py starts the cluster; the session fixture is in conftest.py.

The e2e layer's cluster: one real, loopback-only control plane for the whole session.

scripts/build-control-plane builds (or reuses) the binaries; tests/e2e/controlplane.py starts
etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK and the KubeRay operator,
installs the KubeRay CRDs and adds simulated nodes: one CPU node and four 8-GPU nodes (tainted
`nvidia.com/gpu:NoSchedule`). Every component's sockets are watched from the start
(tests/netwatch.py); test_teardown.py (last by file name) fails on any non-loopback listener or peer.

If the control plane cannot be built or started, the fixture fails with the reason: the e2e
tests never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: netwatch

from controlplane import ROOT, ControlPlane, PollTimeout, kubeconfig, poll  # noqa: E402
from netwatch import LoopbackWatch  # noqa: E402

CHART = ROOT / "charts" / "alexnet-train"
CPU_NODES, GPU_NODES, GPUS_PER_NODE = 1, 4, 8
TIMINGS: dict[str, float] = {}


@dataclass
class E2E:
    """What the tests get: the running control plane and how to talk to it."""
    plane: ControlPlane
    tools: Path
    watches: list[LoopbackWatch] = field(default_factory=list)
    docker: object = None       # image.Docker: the session's Docker engine
    image: object = None        # image.Built: the project's image, built from the Dockerfile
    node: object = None         # node.Node: the real node (kubelet, containerd) running it
    host_before: object = None  # node.HostState before anything started

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def stop(self) -> None:
        """Stop the watches, then the node, the control plane and the Docker engine, by pid."""
        for w in self.watches:
            w.__exit__(None, None, None)
        self.node.stop()
        self.plane.stop()
        self.docker.stop()

    def env(self, kubeconfig: Path | None = None, **extra) -> dict:
        """Environment for a host-side command: this cluster's kubeconfig, helm on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "ALEXNET_JOB_CHART")}
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["PATH"] = f"{self.tools}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.0/8,localhost"
        return {**env, **extra}

    def run(self, *args, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120, **kw):
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                                env=self.env(kubeconfig), timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def helm(self, *args, **kw):
        return self.run(self.tools / "helm", *args, **kw)

    def kubectl(self, *args, **kw):
        return self.run(self.tools / "kubectl", *args, **kw)

    def cli(self, *args, kubeconfig: Path | None = None, timeout: float = 120, input=None, env: dict | None = None):
        """The real `alexnet-job` command line, in a fresh process on the host (`env`: added variables)."""
        return subprocess.run([sys.executable, "-m", "job.cli", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env=self.env(kubeconfig, **(env or {})), timeout=timeout, input=input)

    def api(self):
        return self.plane.api()

    def token_kubeconfig(self, path: Path, token: str, namespace: str) -> Path:
        path.write_text(yaml.safe_dump(kubeconfig(self.plane.server, self.plane.pki / "ca.crt", "sa",
                                                  token=token, namespace=namespace)))
        return path

    def namespace(self, name: str) -> str:
        from kubernetes import client
        client.CoreV1Api(self.api()).create_namespace({"metadata": {"name": name}})
        # The controller-manager's ServiceAccount controller makes `default` in it.
        wait_until(f"ServiceAccount default in {name}",
                   lambda: client.CoreV1Api(self.api()).read_namespaced_service_account("default", name))
        return name


def wait_until(what: str, condition, timeout: float = 60, interval: float = 0.25):
    """Poll `condition` until it returns something truthy; fail the test with `what` otherwise."""
    try:
        return poll(condition, timeout, interval)
    except PollTimeout as timed_out:
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {timed_out.last_error})")


