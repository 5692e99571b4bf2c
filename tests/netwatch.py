"""Watch a process tree's sockets: every listener and peer must be on the loopback network."""

import ipaddress
import threading

import psutil

KERNEL_NAME_LENGTH = 15  # TASK_COMM_LEN - 1


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return ip.is_loopback


class LoopbackWatch:
    """Samples the sockets of `root_pid` and all its descendants until stopped.

    A socket listening on a wildcard or external address, or connected to a non-loopback peer,
    is recorded as a violation ("pid name: laddr -> raddr"). Wildcard listeners of processes
    whose name starts with one of `wildcard_listeners_allowed` are recorded apart, in
    `wildcard_listeners`, so a test can name that exception instead of ignoring it: one entry
    per socket ("pid laddr"), holding the record as first seen, because a Ray worker retitles
    itself per task and the same socket would otherwise count once per title.
    """

    def __init__(self, root_pid: int, interval: float = 0.5, wildcard_listeners_allowed: tuple = ()):
        self.root_pid, self.interval = root_pid, interval
        self.allowed = wildcard_listeners_allowed
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

    def _is_allowed(self, name: str) -> bool:
        # The kernel keeps 15 characters of a process name; psutil restores the rest from the
        # command line only when that still begins with them, which a process retitling itself
        # (Ray workers do, per task) may not at the moment of the read.
        truncated = len(name) == KERNEL_NAME_LENGTH
        return name.startswith(self.allowed) or (truncated and any(p.startswith(name) for p in self.allowed))

    def sample(self):
        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                connections = process.net_connections(kind="inet")
                name = process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for conn in connections:
                self.sockets_seen += 1
                local_ok = is_loopback(conn.laddr.ip)
                peer_ok = not conn.raddr or is_loopback(conn.raddr.ip)
                if local_ok and peer_ok:
                    continue
                peer = f"{conn.raddr.ip}:{conn.raddr.port}" if conn.raddr else conn.status
                record = f"{process.pid} {name}: {conn.laddr.ip}:{conn.laddr.port} -> {peer}"
                wildcard = ipaddress.ip_address(conn.laddr.ip.split("%")[0]).is_unspecified
                if not conn.raddr and wildcard and self._is_allowed(name):
                    self.wildcard_listeners.setdefault(f"{process.pid} {conn.laddr.ip}:{conn.laddr.port}", record)
                else:
                    self.violations.add(record)
