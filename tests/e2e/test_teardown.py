"""Runs last (file and definition order): the KubeRay-CRDs-missing error, which removes the CRDs
for a moment, and the network-safety check over everything the session's components did."""

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
    and peers on 127.0.0.0/8 only."""
    for watch in e2e.watches:
        watch.sample()
    assert len(e2e.watches) == 6, "one watch per component"
    assert sum(w.sockets_seen for w in e2e.watches) > 100, "the watch saw no traffic: is it watching?"
    violations = sorted(v for w in e2e.watches for v in w.violations | set(w.wildcard_listeners.values()))
    assert violations == [], "non-loopback sockets:\n" + "\n".join(violations)
