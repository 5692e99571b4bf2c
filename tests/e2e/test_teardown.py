"""Runs last (file and definition order): the KubeRay-CRDs-missing error, which removes the CRDs
for a moment, the network-safety check over everything the session's components did, and, last of
all, the real node's teardown: the machine must be left as it was found."""

from __future__ import annotations

import pytest

from e2elib import wait_until

pytestmark = pytest.mark.e2e


def test_error_kuberay_crds_missing_says_how_to_install(e2e):
    from kubernetes import client

    ext = client.ApiextensionsV1Api(e2e.api())
    ext.delete_custom_resource_definition("rayjobs.ray.io")
    try:
        wait_until("rayjobs.ray.io gone", lambda: "rayjobs.ray.io" not in
                   [c.metadata.name for c in ext.list_custom_resource_definition().items], timeout=60)
        for command in (["list"], ["submit", "--set", "image.tag=0.1.0-cpu", "--name", "alexnet-train-z"]):
            result = e2e.cli(*command, "-n", "default")
            assert result.returncode == 2, result.stderr
            assert "KubeRay CRDs missing" in result.stderr and "helm install kuberay-operator" in result.stderr
            assert "docs/kubernetes.md" in result.stderr
    finally:
        e2e.plane.install_crds()


def test_network_safety_every_component_stays_on_loopback(e2e):
    """Every socket of every process the fixture started, sampled all session long: listeners
    and peers on 127.0.0.0/8 or the real node's pod network only (pods' sockets included, read
    from their own network namespaces)."""
    for watch in e2e.watches:
        watch.sample()
    # etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK, the operator;
    # containerd, CoreDNS, the kubelet; the pods under containerd's shims.
    assert len(e2e.watches) == 10, "one watch per component"
    assert sum(w.sockets_seen for w in e2e.watches) > 100, "the watch saw no traffic: is it watching?"
    assert e2e.watches[-1].sockets_seen > 0, "the pods' watch saw no socket: is it watching?"
    violations = sorted(v for w in e2e.watches for v in w.violations | set(w.wildcard_listeners.values()))
    assert violations == [], "non-loopback sockets:\n" + "\n".join(violations)


def test_the_real_node_leaves_the_machine_as_it_was_found(e2e):
    """Stopping the node and the Docker engine (the session's finalizer does it again, harmlessly)
    leaves no sysctl changed, no iptables rule or chain, interface, mount, cgroup, state directory
    or process behind, against the snapshot taken before the fixture started anything."""
    import psutil
    from image import CACHE
    from node import HostState

    assert e2e.node.processes, "the node is not running: nothing to tear down"
    pods_watch = e2e.watches[-1]
    e2e.node.stop()
    e2e.docker.stop()
    after = HostState.snapshot()
    assert e2e.host_before.diff(after) == []
    # Processes of the node's or the engine's kind, or naming their files, started since the
    # snapshot (the control plane's are the fixture's to stop, after this test).
    daemons = {"containerd", "containerd-shim", "containerd-shim-runc-v2", "dockerd", "docker-proxy", "kubelet",
               "coredns", "runc", "pause"}
    marks = (str(e2e.node.workdir.parent), str(CACHE))
    leaked = []
    for pid in after.processes - e2e.host_before.processes - set(e2e.plane.pids()):
        try:
            process = psutil.Process(pid)
            cmdline = " ".join(process.cmdline())
            if process.name() in daemons or any(mark in cmdline for mark in marks):
                leaked.append(f"{pid} {cmdline[:200]}")
        except psutil.NoSuchProcess:
            pass
    assert leaked == [], "processes left running:\n" + "\n".join(leaked)
    assert not e2e.node.shim_pids() and pods_watch.more_roots() == []
