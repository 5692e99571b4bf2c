"""TF_CONFIG for Ray Train's TensorFlow workers, from a module that does not import TensorFlow.

`TensorflowTrainer` takes its backend from `tensorflow_config`. Ray's own `TensorflowConfig`
does exactly what `TFConfig` does: before training, each worker learns every worker's address
and its own index through TF_CONFIG, which MultiWorkerMirroredStrategy reads. But it lives in
`ray.train.tensorflow`, whose `__init__` imports TensorFlow, and the Train controller unpickles
the backend config: it would spend 3 s of CPU (8 s without bytecode) loading TensorFlow, which it
never uses, on the critical path of every run's start. This module imports only Ray.
"""

from __future__ import annotations

import json
import os
import socket

import ray
from ray.train.backend import Backend, BackendConfig


class TFConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TFConfigBackend

    @property
    def framework(self):
        from job import ray_internals
        return ray_internals.tensorflow_framework()  # how Ray's state export names it


class TFConfigBackend(Backend):
    def on_start(self, worker_group, backend_config: TFConfig) -> None:
        addresses = worker_group.execute(worker_address)
        ray.get([worker_group.execute_single_async(rank, set_tf_config, addresses, rank)
                 for rank in range(len(addresses))])


def worker_address() -> str:
    """host:port for this worker's collective server: its node's address and a free port."""
    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def set_tf_config(addresses: list[str], rank: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                          "task": {"type": "worker", "index": rank}})
