"""Benchmark 10: the same training run on real pods and locally, side by side.

On real pods (the e2e layer's cluster: the image built from the Dockerfile, a kubelet over
containerd, KubeRay; started here as the tests start it, so it needs root and the node packages):
`alexnet-job submit --wait` with tests/e2e/values-real-node.yaml, MNIST from a SeaweedFS on the pod
bridge. Locally: `alexnet-job train` with the very config.yaml the chart renders for that RayJob
(only --data and --output differ: a local folder for each). Prints seconds from `submit` to each
step of the way (RayJob, pods scheduled, containers started, Ray head and workers ready, the
driver started, its first training step, training done, the run published, the command back),
the same for the local run from its command's start, and what pulling the image would add.

Usage: uv run python bench/real_pods.py [--set training.KEY=VALUE ...]   (as root: it starts the e2e cluster)
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import MNIST, ROOT, run_train, table

sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests")]
from realpods import VALUES, bridge_s3, read_json  # noqa: E402
from image import DOCKER_CLIENT  # noqa: E402
from session import start_e2e  # noqa: E402

NS, NAME = "bench", "bench"
RAYJOB = f"{NAME}-alexnet-train"


def seconds(stamp) -> float:
    """A Kubernetes timestamp (datetime or RFC 3339 text) as Unix seconds."""
    if isinstance(stamp, str):
        stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return stamp.timestamp()


def condition_time(pod, kind: str) -> float | None:
    found = [c.last_transition_time for c in pod.status.conditions or [] if c.type == kind and c.status == "True"]
    return seconds(found[0]) if found else None


def pod_timeline(e2e) -> list[tuple[str, float]]:
    """(event, Unix time) of the RayJob's pods: the latest of each kind, as the slowest decides."""
    from kubernetes import client
    pods = client.CoreV1Api(e2e.api()).list_namespaced_pod(NS).items
    groups = {"head": [], "workers": [], "submitter": []}
    for pod in pods:
        labels = pod.metadata.labels or {}
        group = ("submitter" if labels.get("app.kubernetes.io/component") == "submitter"
                 else "head" if labels.get("ray.io/node-type") == "head" else "workers")
        groups[group].append(pod)
    events = []
    for group, members in groups.items():
        for label, when in (("pod created", lambda p: seconds(p.metadata.creation_timestamp)),
                            ("scheduled", lambda p: condition_time(p, "PodScheduled")),
                            ("container started", lambda p: seconds(p.status.container_statuses[0].state.running.started_at
                                                                      if p.status.container_statuses[0].state.running
                                                                      else p.status.container_statuses[0].state.terminated.started_at)),
                            ("ready", lambda p: condition_time(p, "Ready"))):
            times = [t for t in (when(p) for p in members) if t]
            if times and not (group == "submitter" and label == "ready"):
                events.append((f"{group}: {label}", max(times)))
    return events


def on_real_pods(e2e, workdir: Path, extra: list[str]) -> tuple[list[tuple[str, float]], dict, float]:
    with bridge_s3(e2e, workdir / "s3", MNIST, NS) as (s3, values, _):
        submitted_at = time.time()
        submit = e2e.cli("submit", "-n", NS, "--name", NAME, "-f", VALUES, *values, *extra, "--wait", timeout=1800)
        returned_at = time.time()
        if submit.returncode:
            sys.exit(f"submit failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}")
        from kubernetes import client
        rayjob = client.CustomObjectsApi(e2e.api()).get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", RAYJOB)
        metrics = read_json(s3, f"runs/{RAYJOB}/metrics.json")
        manifest = read_json(s3, f"runs/{RAYJOB}/manifest.json")
        config = yaml.safe_load(client.CoreV1Api(e2e.api()).read_namespaced_config_map(RAYJOB, NS).data["config.yaml"])
        events = [("RayJob created", seconds(rayjob["metadata"]["creationTimestamp"])), *pod_timeline(e2e),
                  ("driver started (alexnet-job train)", metrics["started_at"]),
                  ("first training step", metrics["started_at"] + metrics["startup_seconds"]),
                  ("training finished", metrics["training_finished_at"]),
                  ("run published (manifest)", seconds(manifest["published_at"])),
                  ("RayJob complete", seconds(rayjob["status"]["endTime"])),
                  ("submit --wait returned", returned_at)]
        e2e.cli("cancel", RAYJOB, "-n", NS)
        return sorted(((name, at - submitted_at) for name, at in events), key=lambda e: e[1]), config, returned_at - submitted_at


def locally(config: dict, workdir: Path) -> list[tuple[str, float]]:
    config = {k: v for k, v in config.items() if k not in ("output", "data")}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics, wall = run_train("--config", str(path), "--data", str(MNIST), output=str(workdir / "local"))
    start = metrics["exited_at"] - wall
    published = json.loads(next((workdir / "local" / "runs").glob("*/manifest.json")).read_text())["published_at"]
    return [("first training step", metrics["started_at"] + metrics["startup_seconds"] - start),
            ("training finished", metrics["training_finished_at"] - start),
            ("run published (manifest)", seconds(published) - start),
            ("command returned", wall)]


def image_pull(e2e) -> str:
    """What a node without the image downloads: its layers gzipped, as a registry serves them
    (`docker save | gzip`, measured here), at a few link speeds."""
    save = subprocess.Popen([DOCKER_CLIENT, "save", e2e.image.tag], stdout=subprocess.PIPE, env=e2e.docker.env())
    gzip = subprocess.Popen(["gzip", "-6"], stdin=save.stdout, stdout=subprocess.PIPE)
    save.stdout.close()
    megabytes = sum(len(chunk) for chunk in iter(lambda: gzip.stdout.read(1 << 20), b"")) / 1e6
    if save.wait() or gzip.wait():
        sys.exit("docker save | gzip failed")
    speeds = ", ".join(f"{megabytes / rate:.0f} s at {label}" for label, rate in
                       (("100 MB/s", 100), ("1 Gbit/s", 125), ("10 Gbit/s", 1250)))
    return (f"image {e2e.image.tag}: {megabytes:.0f} MB gzipped; a node without it downloads that first "
            f"({speeds}) and unpacks it (unpacking here: see docs/benchmarks.md, section 9)")


def main() -> None:
    extra = sys.argv[1:]
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-pods-") as tmp:
        workdir = Path(tmp)
        e2e = start_e2e(workdir / "e2e", timings)
        try:
            pods, config, pods_wall = on_real_pods(e2e, workdir, extra)
            pull = image_pull(e2e)
        finally:
            e2e.stop()
        local = locally(config, workdir)
    print(f"\n10) the same run on real pods and locally (config: {json.dumps({k: config[k] for k in ('dataset', 'train_limit', 'test_limit', 'epochs', 'batch_size', 'workers')})})")
    print(f"cluster start (not counted): {timings['build + start']:.0f} s")
    local_at = dict(local)
    rows = [(name, f"{at:.1f}", f"{local_at[name]:.1f}" if name in local_at else "")
            for name, at in pods]
    rows.append(("command returned (local: train)", f"{pods_wall:.1f}", f"{local_at['command returned']:.1f}"))
    print(table(rows, ("seconds from the command's start", "real pods (submit)", "local (train)")))
    first_pods = dict(pods)["first training step"]
    print(f"ratio real pods / local: first step {first_pods / local_at['first training step']:.2f}x, "
          f"command {pods_wall / local_at['command returned']:.2f}x")
    print(pull)


if __name__ == "__main__":
    main()
