"""Watch a process tree's sockets: every listener and peer must be on the loopback network (or
on a network the watch is told is the test's own, such as the e2e node's pod bridge)."""

import ipaddress
import os
import socket
import threading
from collections import namedtuple

import psutil

KERNEL_NAME_LENGTH = 15  # TASK_COMM_LEN - 1
Address = namedtuple("Address", "ip port")
Connection = namedtuple("Connection", "laddr raddr status")
TCP_LISTEN = "0A"


def _ip(address: str):
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip


def is_loopback(address: str) -> bool:
    return _ip(address).is_loopback


def _hex_address(text: str) -> Address:
    """An address of /proc/net/{tcp,udp}[6]: host-order 32-bit words of hex, then the port."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return Address(socket.inet_ntop(family, raw), int(port, 16))


def foreign_namespace_connections(pid: int) -> list[Connection]:
    """The inet sockets of a process in another network namespace (a pod's), read from its own
    /proc/PID/net: psutil reads the caller's namespace's tables, where they are not."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            local, remote = _hex_address(fields[1]), _hex_address(fields[2])
            connected = remote.port != 0
            status = "LISTEN" if table.startswith("tcp") and fields[3] == TCP_LISTEN else "NONE"
            found.append(Connection(local, remote if connected else (), status))
    return found


class LoopbackWatch:
    """Samples the sockets of `root_pid` and all its descendants until stopped.

    A socket listening on a wildcard or external address, or connected to a non-loopback peer,
    is recorded as a violation ("pid name: laddr -> raddr"). Wildcard listeners of processes
    whose name starts with one of `wildcard_listeners_allowed` are recorded apart, in
    `wildcard_listeners`, so a test can name that exception instead of ignoring it: one entry
    per socket ("pid laddr"), holding the record as first seen, because a Ray worker retitles
    itself per task and the same socket would otherwise count once per title.
    """

    def __init__(self, root_pid: int, interval: float = 0.5, wildcard_listeners_allowed: tuple = (),
                 networks: tuple = (), more_roots=None):
        self.root_pid, self.interval = root_pid, interval
        # A callable giving more trees to watch at each sample: processes that are not the root's
        # descendants, such as containerd's shims (and the pods under them), which outlive it.
        self.more_roots = more_roots
        self.allowed = wildcard_listeners_allowed
        # Besides loopback: networks the test made itself (the e2e node's pod bridge, a /24 with
        # no route out); a listener or peer there is fine.
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)
        self.own_netns = os.stat("/proc/self/ns/net").st_ino
        self.violations: set[str] = set()
        self.wildcard_listeners: dict[str, str] = {}
        self.sockets_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _ok(self, address: str) -> bool:
        ip = _ip(address)
        return ip.is_loopback or any(ip in network for network in self.networks if ip.version == network.version)

    def _is_allowed(self, name: str) -> bool:
        # The kernel keeps 15 characters of a process name; psutil restores the rest from the
        # command line only when that still begins with them, which a process retitling itself
        # (Ray workers do, per task) may not at the moment of the read.
        truncated = len(name) == KERNEL_NAME_LENGTH
        return name.startswith(self.allowed) or (truncated and any(p.startswith(name) for p in self.allowed))

    def sample(self):
        processes = []
        for pid in [self.root_pid, *(self.more_roots() if self.more_roots else ())]:
            try:
                root = psutil.Process(pid)
                processes += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for process in processes:
            try:
                name = process.name()
                in_pod = os.stat(f"/proc/{process.pid}/ns/net").st_ino != self.own_netns
                if in_pod:
                    connections = foreign_namespace_connections(process.pid)
                else:
                    connections = process.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError,
                    ProcessLookupError):
                continue
            for conn in connections:
                self.sockets_seen += 1
                # A pod's network namespace holds loopback and one address on the test's own
                # network, so a wildcard listener there listens on nothing else.
                local_ok = self._ok(conn.laddr.ip) or (in_pod and bool(self.networks) and
                                                       _ip(conn.laddr.ip).is_unspecified)
                peer_ok = not conn.raddr or self._ok(conn.raddr.ip)
                if local_ok and peer_ok:
                    continue
                peer = f"{conn.raddr.ip}:{conn.raddr.port}" if conn.raddr else conn.status
                record = f"{process.pid} {name}: {conn.laddr.ip}:{conn.laddr.port} -> {peer}"
                wildcard = ipaddress.ip_address(conn.laddr.ip.split("%")[0]).is_unspecified
                if not conn.raddr and wildcard and self._is_allowed(name):
                    self.wildcard_listeners.setdefault(f"{process.pid} {conn.laddr.ip}:{conn.laddr.port}", record)
                else:
                    self.violations.add(record)
