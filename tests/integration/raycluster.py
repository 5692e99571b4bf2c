"""A multi-node Ray cluster on loopback, in its own process, driven over stdin.

Ray's own test utility (ray.cluster_utils.Cluster) starts a head and worker nodes on this
machine, each a real raylet. Prints one JSON line {"address": ..., "nodes": {node id: raylet pid}}, then
obeys lines on stdin: "kill NODE_ID" removes that node at once; "shutdown" stops everything.
"""

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1, as job.train does

from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def main(worker_nodes: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True})  # port 8265 or, taken, the next free one
    for _ in range(worker_nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    by_id = {node.node_id: node for node in cluster.worker_nodes}
    raylets = {node_id: node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
               for node_id, node in by_id.items()}
    print(json.dumps({"address": cluster.address, "nodes": raylets}), flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "kill":
            cluster.remove_node(by_id[argument], allow_graceful=False)
            print(json.dumps({"killed": argument}), flush=True)
        elif command == "shutdown":
            break
    cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
