"""The e2e layer's session fixture: one real, loopback-only control plane (see e2elib.py), the
project's image built from the Dockerfile (image.py), and a real node running it (node.py).

If any of them cannot be built or started, the fixture fails with the reason: the e2e tests never
skip.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import ControlPlane, ControlPlaneError, build, tools_bin  # noqa: E402
from e2elib import CPU_NODES, GPU_NODES, GPUS_PER_NODE, TIMINGS, E2E  # noqa: E402
from image import Docker, ImageError  # noqa: E402
from netwatch import LoopbackWatch  # noqa: E402
from node import HostState, Node, pick_subnet  # noqa: E402


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    started = time.monotonic()
    host_before = HostState.snapshot()   # what teardown must leave as it was
    watches: list[LoopbackWatch] = []
    docker = plane = node = None
    try:
        workdir = tmp_path_factory.mktemp("e2e")
        pod_network = pick_subnet()
        # The image first: the Docker engine's build reaches the package registries (as `uv sync`
        # does here), so it is not watched; the containers it runs later have no network at all.
        docker = Docker(workdir / "docker").start()
        t = time.monotonic()
        image = docker.build_project("cpu")
        TIMINGS["image (cached by its inputs)"] = time.monotonic() - t
        t = time.monotonic()
        bin_dir = build()
        TIMINGS["scripts/build-control-plane"] = time.monotonic() - t
        tools = tools_bin()

        def watch(pid):
            watches.append(LoopbackWatch(pid, interval=0.5, networks=(str(pod_network),)).__enter__())
        plane = ControlPlane(bin_dir, workdir / "control-plane", on_spawn=watch)
        t = time.monotonic()
        plane.start()
        plane.add_nodes(cpu_nodes=CPU_NODES, gpu_nodes=GPU_NODES, gpus_per_node=GPUS_PER_NODE)
        TIMINGS["control plane start"] = time.monotonic() - t
        t = time.monotonic()
        # 4 CPUs advertised: the chart's two 1-CPU workers, its head and submitter fit (node.py says how).
        node = Node(plane, workdir / "node", [image.tag, image.inputs_tag], docker, pod_network, on_spawn=watch,
                    advertised_cpus=4).start()
        # The pods: processes under containerd's shims, in network namespaces of their own.
        watches.append(LoopbackWatch(node.processes["containerd"].pid, interval=0.5, networks=(str(pod_network),),
                                     more_roots=node.shim_pids).__enter__())
        TIMINGS["real node start"] = time.monotonic() - t
        TIMINGS.update({f"real node: {k}": v for k, v in node.timings.items()})
    except Exception as error:  # noqa: BLE001 - whatever it is, fail with the reason; never skip
        for part in (node, plane, docker):
            if part:
                part.stop()
        for w in watches:
            w.__exit__(None, None, None)
        reason = str(error) if isinstance(error, (ControlPlaneError, ImageError)) else f"{type(error).__name__}: {error}"
        pytest.fail(f"the e2e cluster did not start: {reason}", pytrace=False)
    TIMINGS["build + start"] = time.monotonic() - started
    env = E2E(plane, tools, watches, docker=docker, image=image, node=node, host_before=host_before)
    try:
        yield env
    finally:
        for w in watches:
            w.__exit__(None, None, None)
        node.stop()
        plane.stop()
        docker.stop()


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "e2e cluster")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f}s")
