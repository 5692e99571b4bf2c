"""Free TCP ports for the servers the tests start (SeaweedFS, MLflow, the control plane, the node).

A port is found free, then bound by a server started afterwards: something may take it in between.
Two things could. An outgoing connection, which the kernel gives a port of its ephemeral range (the
range a bind to port 0 picks from too): so ports come from below that range. And another server of
these tests: so no port is handed out twice by one process, and the servers that can tell a taken
port from other failures (tests/s3server.py, tests/mlflowserver.py) start again on new ones.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
_handed_out: set[int] = set()


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct TCP ports free on `host` now, below the ephemeral range, none handed out before."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    found = []
    for port in random.sample(range(10000, low), low - 10000):
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            _handed_out.update(found)
            return found
    raise RuntimeError(f"no {n} free ports on {host} below {low}")


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]
