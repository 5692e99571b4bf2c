"""Starts the e2e layer's cluster: the project's image built from the Dockerfile (image.py), the
loopback-only control plane (controlplane.py) and the real node running the image (node.py), with
every component's sockets watched (tests/netwatch.py). The pytest session fixture (conftest.py)
and the real-pods benchmark (bench/real_pods.py) both start it here."""

from __future__ import annotations

import time
from pathlib import Path

from controlplane import ControlPlane, build, tools_bin
from e2elib import CPU_NODES, GPU_NODES, GPUS_PER_NODE, E2E
from image import Docker, ensure_packages
from netwatch import LoopbackWatch
from node import HostState, Node, pick_subnet, service_range


def start_e2e(workdir: Path, timings: dict[str, float]) -> E2E:
    """Everything started, or everything it had started stopped again and the error raised."""
    started = time.monotonic()
    ensure_packages()   # before the snapshot: on a new machine even iptables-save is missing
    host_before = HostState.snapshot()   # what teardown must leave as it was
    watches: list[LoopbackWatch] = []
    docker = plane = node = None
    try:
        pod_network = pick_subnet()
        # The image first: the Docker engine's build reaches the package registries (as `uv sync`
        # does here), so it is not watched; the containers it runs later have no network at all.
        docker = Docker(workdir / "docker").start()
        t = time.monotonic()
        image = docker.build_project("cpu")
        timings["image (cached by its inputs)"] = time.monotonic() - t
        t = time.monotonic()
        bin_dir = build()
        timings["scripts/build-control-plane"] = time.monotonic() - t
        tools = tools_bin()

        def watch(pid):
            watches.append(LoopbackWatch(pid, interval=0.5, networks=(str(pod_network),)).__enter__())
        # Pods reach the API server through the `kubernetes` Service, on the pod bridge (node.py).
        plane = ControlPlane(bin_dir, workdir / "control-plane", on_spawn=watch,
                             service_cidr=str(service_range(pod_network)))
        t = time.monotonic()
        plane.start()
        plane.add_nodes(cpu_nodes=CPU_NODES, gpu_nodes=GPU_NODES, gpus_per_node=GPUS_PER_NODE)
        timings["control plane start"] = time.monotonic() - t
        t = time.monotonic()
        # 4 CPUs advertised: the chart's two 1-CPU workers, its head and submitter fit (node.py says how).
        node = Node(plane, workdir / "node", [image.tag, image.inputs_tag], docker, pod_network, on_spawn=watch,
                    advertised_cpus=4).start()
        # The pods: processes under containerd's shims, in network namespaces of their own.
        watches.append(LoopbackWatch(node.processes["containerd"].pid, interval=0.5, networks=(str(pod_network),),
                                     more_roots=node.shim_pids).__enter__())
        timings["real node start"] = time.monotonic() - t
        timings.update({f"real node: {k}": v for k, v in node.timings.items()})
    except BaseException:
        for part in (node, plane, docker):
            if part:
                part.stop()
        for w in watches:
            w.__exit__(None, None, None)
        raise
    timings["build + start"] = time.monotonic() - started
    return E2E(plane, tools, watches, docker=docker, image=image, node=node, host_before=host_before)
