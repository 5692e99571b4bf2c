"""What the tests of the RayJob on real pods share: a SeaweedFS on the pod bridge holding MNIST
(the pods cannot reach the internet, so `training.data` points there), its keys as the Secret the
chart loads, and the objects of the storage layout the tests read back."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from e2elib import CHART

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: s3server, netwatch
from netwatch import LoopbackWatch  # noqa: E402
from s3server import S3Server  # noqa: E402

VALUES = CHART.parents[1] / "tests" / "e2e" / "values-real-node.yaml"
MODELS = "models"       # the chart's s3.bucket in these tests
DATASETS = "datasets"   # values-real-node.yaml reads s3://datasets/mnist
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@contextmanager
def bridge_s3(e2e, workdir: Path, mnist_dir: Path, namespace: str):
    """A SeaweedFS bound to the bridge's address (pods reach it; nothing else on the machine is
    used), the buckets, MNIST in s3://datasets/mnist, the namespace and its `s3` Secret. Yields
    (server, chart value arguments, the watch over the server's sockets)."""
    from kubernetes import client
    s3 = S3Server(workdir, host=e2e.node.address)
    watch = None
    try:
        s3.start()
        watch = LoopbackWatch(s3.process.pid, interval=0.5, networks=(str(e2e.node.subnet),)).__enter__()
        s3.create_bucket(MODELS)
        s3.create_bucket(DATASETS)
        for name in MNIST_FILES:
            s3.client().upload_file(str(mnist_dir / name), DATASETS, f"mnist/{name}")
        e2e.namespace(namespace)
        client.CoreV1Api(e2e.api()).create_namespaced_secret(namespace, {
            "metadata": {"name": "s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
        values = ["--set", f"s3.endpoint={s3.endpoint}", "--set", f"s3.bucket={MODELS}", "--set", "s3.existingSecret=s3"]
        yield s3, values, watch
    finally:
        if watch:
            watch.__exit__(None, None, None)
        s3.close()


def read_json(s3: S3Server, key: str, bucket: str = MODELS) -> dict | None:
    try:
        return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.client().exceptions.NoSuchKey:
        return None


def keys(s3: S3Server, prefix: str, bucket: str = MODELS) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def worker_nodes(s3: S3Server, run: str, bucket: str = MODELS) -> dict[int, str]:
    """{rank: node address} of the run's workers, from the first line of each worker's log saved
    with the run (job/runlogs.py): `rank R of N on node ADDRESS, pid P`."""
    client = s3.client()
    nodes = {}
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"checkpoints/{run}/logs/worker-").get("Contents", [])
    for item in listed:
        first = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode().splitlines()[0]
        rank, node = re.match(r"rank (\d+) of \d+ on node ([\d.]+), pid \d+$", first).groups()
        nodes[int(rank)] = node
    return nodes
