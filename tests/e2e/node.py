"""A real node for the e2e control plane: kubelet over containerd and runc, running the image.

What it starts, all stopped by pid at `stop()`:
- containerd (Debian's 1.6) and the kubelet (built with the control plane, same version), in one
  mount namespace of their own: every mount they make (container root filesystems, volumes,
  network-namespace files) stays out of the host's mount table, and the host-wide sysctls a
  kubelet or a CNI plugin would change (`vm.overcommit_memory`, `kernel.panic`, ...,
  `net.ipv4.ip_forward`) are masked there by bind-mounted files;
- CoreDNS, the cluster DNS: it answers `cluster.local` from the API server on the pod bridge's
  address and nothing else (no forwarding; any other name is refused).

The pod network is a bridge on a private /24 that this module creates and deletes, with no route
out: pods get no default route, forwarding stays off, and FORWARD rules drop anything between
the bridge and every other interface. The node's InternalIP is the bridge's address, so the API
server reaches its kubelet (logs, exec) there, and so do pods their host.

Pods reach the API server as in any cluster, through the `kubernetes` Service (in-cluster config:
KUBERNETES_SERVICE_HOST and the pod's ServiceAccount token). There is no kube-proxy: the control
plane's service range is the first /28 of the pod subnet (`service_range`), so that Service's
ClusterIP is the bridge's own address, and a relay in this process forwards that address's
port 443 to the API server on 127.0.0.1 (TLS passes through; the API server's certificate names
the address). Other Services' ClusterIPs lead nowhere; KubeRay's head Service is headless.

The machine is left as found: `HostState.snapshot()` before, `HostState.diff()` after, over
sysctls, iptables rules and chains, interfaces, mounts, cgroups, state directories and processes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controlplane import (ControlPlane, ControlPlaneError, PollTimeout, kubeconfig, lift_not_ready_taint, poll,
                          sign, tail)
from image import CACHE, FIXED_STATE_PATHS, CacheLock, Docker, absent_state_paths, remove_created, unmount_below
from ports import free_port

NODE_DIR = Path(__file__).resolve().parent / "node"
# Names of this session's own (two sessions on one machine must not share a bridge or cgroup).
BRIDGE = f"alexnetjob{os.getpid() % 100000}"   # at most 15 characters
POD_SUBNETS = ("10.213.77.0/24", "10.213.78.0/24", "172.29.213.0/24")  # the first free one
CGROUP_ROOT = f"/alexnet-job-e2e-{os.getpid()}"
CGROUP_V1 = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "docker.io/library/alexnet-job-test-pause:1"
RULE_COMMENT = f"alexnet-job-e2e-{os.getpid()}"
# The real node is tainted, so that only pods meant for it (tolerating this) go there: the other
# e2e tests expect their pods on KWOK's simulated nodes.
TAINT = {"key": "alexnet-job.e2e/node", "value": "real", "effect": "NoSchedule"}
LABEL = ("alexnet-job.e2e/node", "real")
# Host-wide settings the node's processes would change: masked in their mount namespace.
MASKED_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                  "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward")


# ----------------------------------------------------------------------------- the host, before and after

@dataclass
class HostState:
    sysctls: dict
    iptables: dict
    interfaces: list
    mounts: list
    cgroups: list
    paths: dict
    processes: set

    @staticmethod
    def snapshot() -> "HostState":
        sysctls = {}
        for name in MASKED_SYSCTLS + ("net/bridge/bridge-nf-call-iptables", "net/ipv4/conf/all/route_localnet"):
            try:
                sysctls[name] = Path("/proc/sys", name).read_text().strip()
            except OSError:
                sysctls[name] = None
        iptables = {}
        for command in ("iptables", "ip6tables"):
            iptables[command] = sorted(f"{kind} {table} {entry}" for table, (chains, rules) in iptables_rules(command).items()
                                       for kind, entries in (("chain", chains), ("rule", rules)) for entry in entries)
        interfaces_now = interfaces()
        mounts = sorted(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines())
        cgroups = sorted(str(p) for hierarchy in CGROUP_V1.iterdir() if hierarchy.is_dir()
                         for p in hierarchy.iterdir() if p.is_dir())
        paths = {p: Path(p).exists() for p in FIXED_STATE_PATHS}
        processes = {p.pid for p in _processes()}
        return HostState(sysctls, iptables, interfaces_now, mounts, cgroups, paths, processes)

    def diff(self, after: "HostState") -> list[str]:
        """What differs in `after`, one line per difference (processes: new ones still running)."""
        found = []
        for name, value in self.sysctls.items():
            if after.sysctls.get(name) != value:
                found.append(f"sysctl {name}: {value} -> {after.sysctls.get(name)}")
        for command, rules in self.iptables.items():
            for line in sorted(set(after.iptables[command]) - set(rules)):
                found.append(f"{command}: added {line}")
            for line in sorted(set(rules) - set(after.iptables[command])):
                found.append(f"{command}: removed {line}")
        for kind in ("interfaces", "mounts", "cgroups"):
            before, now = set(getattr(self, kind)), set(getattr(after, kind))
            found += [f"{kind}: added {x}" for x in sorted(now - before)]
            found += [f"{kind}: removed {x}" for x in sorted(before - now)]
        for path, existed in self.paths.items():
            if after.paths[path] != existed:
                found.append(f"path {path}: {'existed' if existed else 'absent'} before, "
                             f"{'exists' if after.paths[path] else 'gone'} now")
        return found


def interfaces() -> list[str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())


def _processes():
    import psutil
    return list(psutil.process_iter(["pid", "cmdline"]))


# ----------------------------------------------------------------------------- the node

def service_range(pod_subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The control plane's service range: the pod subnet's first /28, so that the `kubernetes`
    Service's ClusterIP (the range's first address) is the bridge's address. Pod IPs start after it."""
    return next(pod_subnet.subnets(new_prefix=28))


class ApiRelay:
    """Forwards TCP connections from `listen` to `target` (the `kubernetes` Service's ClusterIP and
    port to the API server on 127.0.0.1), one pair of pump threads per connection."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(listen)
        self.connections: dict[frozenset, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name="api-relay", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = frozenset((client, upstream))
            with self.lock:
                self.connections[pair] = 2   # pumps still running
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: frozenset) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:   # the second pump to end closes the pair (a session makes thousands)
                if pair in self.connections:
                    self.connections[pair] -= 1
                    if not self.connections[pair]:
                        del self.connections[pair]
                        for end in pair:
                            end.close()

    def stop(self) -> None:
        self.server.close()
        with self.lock:
            for pair in self.connections:
                for end in pair:
                    end.close()
            self.connections.clear()
        self.thread.join(5)


def pick_subnet() -> ipaddress.IPv4Network:
    """The first of POD_SUBNETS that no route or address of the machine touches."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
            word = line.split()[1]
        if word != "default":
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    for candidate in map(ipaddress.ip_network, POD_SUBNETS):
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise ControlPlaneError(f"every candidate pod subnet {POD_SUBNETS} overlaps a route of this machine")


@dataclass
class Node:
    plane: ControlPlane
    workdir: Path
    image_refs: list[str]              # images to have in containerd (Docker tags; with the inputs tag)
    docker: Docker
    subnet: ipaddress.IPv4Network
    name: str = "node-real-0"
    # CPUs the node advertises. None: the machine's. More lets a test schedule what the chart
    # makes for a cluster (two 1-CPU workers, a head and a submitter) on a 2-core machine: the
    # kubelet's cAdvisor counts /sys/devices/system/cpu/cpu<N>, which its own mount namespace
    # replaces (NUMA nodes hidden, so that count is taken). CPU limits still hold per container.
    advertised_cpus: int | None = None
    processes: dict = field(default_factory=dict)   # name -> Popen
    timings: dict = field(default_factory=dict)
    on_spawn: object = None

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        hosts = list(self.subnet.hosts())
        self.address = str(hosts[0])            # the bridge's, the kubelet's and CoreDNS's address
        self.kubelet_port, self.healthz_port = free_port(), free_port()
        self.socket = self.workdir / "containerd.sock"
        self.containerd_root = CACHE / "containerd"  # kept between runs: the imported image
        self.lock = CacheLock(self.containerd_root)
        self.cgroups_made: list[Path] = []
        self.rules: list[list[str]] = []
        self.bridge_made = False
        self.relay: ApiRelay | None = None

    # -- lifecycle

    def start(self) -> "Node":
        try:
            self._network()
            self._start_api_relay()
            self._start_containerd()
            t = time.monotonic()
            self._import_images()
            self.timings["images into containerd"] = time.monotonic() - t
            self._start_coredns()
            self._certificates()
            self._cgroups()
            self._start_kubelet()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Delete the node's pods, stop kubelet, containerd and CoreDNS by pid, then remove every
        trace: leftover container processes, cgroups, the bridge, the rules, state directories."""
        if "kubelet" in self.processes and self.processes["kubelet"].poll() is None:
            self._drain()
        if self.relay:
            self.relay.stop()
            self.relay = None
        for name in ("kubelet", "coredns", "containerd"):
            process = self.processes.pop(name, None)
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        # containerd's shims outlive it by design; so may a container whose shim died. Both are
        # known by the work dir in their command line or by the cgroups that are ours.
        for pid in sorted(self._leftover_pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        for cgroup in sorted(self.cgroups_made, key=lambda p: -len(p.parts)):
            for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(sub)
            _rmdir(cgroup)
        self.cgroups_made.clear()
        for rule in reversed(self.rules):
            subprocess.run(["iptables", "-D", *rule], capture_output=True)
        self.rules.clear()
        # The kubelet adds chains of its own (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...) and rules
        # jumping to them; remove whatever it added.
        for command, before in getattr(self, "iptables_before", {}).items():
            remove_added_iptables(command, before)
        remove_added_nft_tables(getattr(self, "nft_tables_before", nft_tables()))
        # A pod's veth goes when the kernel destroys its network namespace, which it does in the
        # background, seconds after the last process, mount and socket holding it are gone. The
        # bridge (and its address) stays until then: a killed pod's connections close with a FIN
        # the host must answer, or the socket retransmits it for minutes and keeps the namespace
        # (measured: a veth outlived a teardown that removed the bridge first by 3.5 minutes).
        before = set(getattr(self, "interfaces_before", interfaces()))
        try:
            poll(lambda: not set(interfaces()) - before - {BRIDGE}, 60, 0.5)
        except PollTimeout:
            pass  # the teardown check names what is left
        if self.bridge_made:
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
            self.bridge_made = False
        unmount_below(self.workdir)
        remove_created(getattr(self, "absent_before", []))
        self.lock.release()

    # -- pieces

    def _network(self) -> None:
        self.absent_before = absent_state_paths()
        self.interfaces_before = interfaces()
        self.iptables_before = {command: iptables_rules(command) for command in ("iptables", "ip6tables")}
        self.nft_tables_before = nft_tables()
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        self.bridge_made = True
        run(["ip", "addr", "add", f"{self.address}/{self.subnet.prefixlen}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        # Nothing crosses between the pod network and any other interface, whatever forwarding says.
        for rule in (["FORWARD", "-i", BRIDGE, "!", "-o", BRIDGE], ["FORWARD", "!", "-i", BRIDGE, "-o", BRIDGE]):
            full = [*rule, "-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"]
            run(["iptables", "-I", *full])
            self.rules.append(full)
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        hosts = list(self.subnet.hosts())
        (cni / "net.d" / "10-alexnet-e2e.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "alexnet-e2e",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
                # No routes: a pod reaches the /24 (its peers, the host's bridge address) and nothing else.
                # Pod IPs start past the service range at the subnet's start.
                "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet),
                                                            "rangeStart": str(hosts[service_range(self.subnet).num_addresses]),
                                                            "rangeEnd": str(hosts[-1])}]],
                         "dataDir": str(cni / "ipam")},
            }],
        }, indent=2))

    def _start_api_relay(self) -> None:
        if self.plane.kubernetes_service_ip != self.address:
            raise ControlPlaneError(f"the control plane's service range {self.plane.service_cidr} must be "
                                    f"service_range({self.subnet}) for pods to reach the API server")
        api = self.plane.server.rsplit(":", 1)
        self.relay = ApiRelay((self.address, 443), ("127.0.0.1", int(api[1])))

    def spawn(self, name: str, args: list[str], namespace_of: int | None = None, setup: list[str] = ()) -> subprocess.Popen:
        """Start a daemon (in `namespace_of`'s mount namespace, or a child of it where `setup`
        mounts something for it alone)."""
        log = (self.workdir / f"{name}.log").open("ab")
        if setup:
            args = ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c",
                    "\n".join(["set -e", *setup, 'exec "$@"']), "sh", *args]
        if namespace_of:
            args = ["nsenter", f"--mount=/proc/{namespace_of}/ns/mnt", "--", *args]
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=self.workdir, env=node_env())
        log.close()
        self.processes[name] = process
        if self.on_spawn:
            self.on_spawn(process.pid)
        return process

    def _start_containerd(self) -> None:
        state = self.workdir / "containerd-state"
        config = self.workdir / "containerd.toml"
        cri = {
            "sandbox_image": PAUSE_IMAGE,
            # Root here may not lower a process's oom_score_adj; without this every sandbox fails.
            "restrict_oom_score_adj": True,
            "netns_mounts_under_state_dir": True,
            "disable_apparmor": True,
            "stream_server_address": "127.0.0.1", "stream_server_port": "0",
            "enable_cdi": False,
            "containerd": {"snapshotter": "overlayfs", "default_runtime_name": "runc",
                           "runtimes": {"runc": {"runtime_type": "io.containerd.runc.v2",
                                                 "options": {"SystemdCgroup": False,
                                                             "Root": str(self.workdir / "runc")}}}},
            "cni": {"bin_dir": "/usr/lib/cni", "conf_dir": str(self.workdir / "cni" / "net.d"), "max_conf_num": 1},
        }
        config.write_text(toml({
            "version": 2, "root": str(self.containerd_root), "state": str(state),
            "grpc": {"address": str(self.socket)}, "ttrpc": {"address": str(self.socket) + ".ttrpc"},
            "debug": {"address": ""}, "metrics": {"address": ""},
            # opt writes /opt/containerd; the others are snapshotters this host cannot use.
            "disabled_plugins": ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
                                 "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                                 "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"],
            "plugins": {"io.containerd.grpc.v1.cri": cri},
        }))
        self.lock.acquire()
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        # A mount namespace of its own: private mounts, and the host-wide sysctls masked by files.
        masks = self.workdir / "sysctl-masks"
        masks.mkdir(exist_ok=True)
        script = ["set -e", "mount --make-rprivate /"]
        for name in MASKED_SYSCTLS:
            source = Path("/proc/sys", name)
            mask = masks / name.replace("/", ".")
            mask.write_text(source.read_text())
            script.append(f"mount --bind {mask} {source}")
        # The kubelet's root dir is shared between containerd's namespace and the kubelet's own
        # (nested) one, so that the volumes it mounts there reach the containers.
        kubelet_root = self.workdir / "kubelet"
        kubelet_root.mkdir(exist_ok=True)
        script += [f"mount --bind {kubelet_root} {kubelet_root}", f"mount --make-shared {kubelet_root}"]
        script.append(f'exec containerd --config {config}')
        process = self.spawn("containerd", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                            "\n".join(script)])
        ctr_ok = lambda: self.ctr("version", check=False).returncode == 0  # noqa: E731
        self._wait("containerd", ctr_ok, 60, "containerd")
        self.namespace_pid = process.pid

    def ctr(self, *args, check: bool = True, timeout: float = 600, stdin=None) -> subprocess.CompletedProcess:
        result = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                                capture_output=True, text=True, timeout=timeout, stdin=stdin)
        if check and result.returncode != 0:
            raise ControlPlaneError(f"ctr {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
        return result

    def _import_images(self) -> None:
        """The pause image and the project's, from Docker into containerd, unless already there."""
        pause = self._pause_image()
        have = set(self.ctr("images", "list", "--quiet").stdout.split())
        wanted = [pause, *self.image_refs]
        # The project image comes with its inputs tag: under its plain tag, containerd may hold an
        # older build, which must be replaced.
        if any(docker_ref(ref) not in have for ref in wanted):
            save = subprocess.Popen(["/usr/bin/docker", "save", *wanted], stdout=subprocess.PIPE, env=self.docker.env())
            # Unpacked into the overlayfs snapshotter now, where the CRI plugin looks for it.
            self.ctr("images", "import", "--snapshotter", "overlayfs", "-", stdin=save.stdout, timeout=1800)
            save.stdout.close()
            if save.wait() != 0:
                raise ControlPlaneError("docker save failed")
        # Drop images of earlier runs (other inputs hashes): containerd frees their content.
        keep = {docker_ref(ref) for ref in wanted}
        project_repos = {docker_ref(ref).rsplit(":", 1)[0] for ref in self.image_refs}
        for ref in self.ctr("images", "list", "--quiet").stdout.split():
            if ref.rsplit(":", 1)[0] in project_repos and ref not in keep and ":inputs-" in ref:
                self.ctr("images", "remove", ref, check=False)

    def _pause_image(self) -> str:
        tag = "alexnet-job-test-pause:1"
        if self.docker.has(tag):
            return tag
        build = self.workdir / "pause-build"
        build.mkdir(exist_ok=True)
        run(["gcc", "-static", "-Os", "-o", str(build / "pause"), str(NODE_DIR / "pause.c")])
        tar = subprocess.run(["tar", "-C", str(build), "-c", "pause"], capture_output=True, check=True).stdout
        self.docker.docker("import", "--change", 'ENTRYPOINT ["/pause"]', "-", tag, input=tar)
        return tag

    def _start_coredns(self) -> None:
        corefile = self.workdir / "Corefile"
        corefile.write_text(f"""\
cluster.local:53 {{
    bind {self.address}
    errors
    kubernetes cluster.local {{
        kubeconfig {self.plane.kubeconfig} e2e
        pods disabled
    }}
}}
""")
        self.spawn("coredns", [str(self.plane.bin_dir / "coredns"), "-conf", str(corefile), "-dns.port", "53"])
        time.sleep(0.5)
        if self.processes["coredns"].poll() is not None:
            raise ControlPlaneError(f"coredns exited:\n{tail(self.workdir / 'coredns.log')}")

    def _certificates(self) -> None:
        """The kubelet's client certificate (a node identity: the Node authorizer limits it) and
        its serving certificate for the bridge address, from the control plane's CA."""
        pki = self.plane.pki
        specs = {
            "node-client": (f"/O=system:nodes/CN=system:node:{self.name}", "extendedKeyUsage=clientAuth\n"),
            "node-serving": (f"/CN={self.name}", f"subjectAltName=IP:{self.address}\nextendedKeyUsage=serverAuth\n"),
        }
        for name, (subject, extensions) in specs.items():
            sign(pki, name, subject, extensions)
        self.kubeconfig = self.workdir / "kubelet.kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig(self.plane.server, pki / "ca.crt", f"system:node:{self.name}",
                                                             pki / "node-client.crt", pki / "node-client.key")))

    def _cgroups(self) -> None:
        """The kubelet's cgroupRoot in every v1 hierarchy (cpuset needs its cpus and mems set)."""
        for hierarchy in sorted(p for p in CGROUP_V1.iterdir() if p.is_dir() and not p.is_symlink()):
            path = hierarchy / CGROUP_ROOT.lstrip("/")
            if not path.exists():
                path.mkdir()
                self.cgroups_made.append(path)
            if (hierarchy / "cpuset.cpus").exists():
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((hierarchy / knob).read_text())

    def _start_kubelet(self) -> None:
        pki = self.plane.pki
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("")  # pods get the cluster DNS only, nothing of the host's
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.address, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.healthz_port,
            "tlsCertFile": str(pki / "node-serving.crt"), "tlsPrivateKeyFile": str(pki / "node-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # This host is cgroup v1 and cannot be switched.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": CGROUP_ROOT,
            "oomScoreAdj": 0,
            "clusterDNS": [self.address], "clusterDomain": "cluster.local", "resolvConf": str(resolv),
            # Local images only: never collect them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "failSwapOn": False, "protectKernelDefaults": False,
            "podLogsDirectory": str(self.workdir / "pod-logs"),
            "maxPods": 20, "serializeImagePulls": False, "registerWithTaints": [TAINT],
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s",
        }
        config_file = self.workdir / "kubelet.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self.spawn("kubelet", [
            str(self.plane.bin_dir / "kubelet"), f"--config={config_file}", f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={self.name}", f"--node-ip={self.address}",
            f"--root-dir={self.workdir / 'kubelet'}", f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--node-labels={LABEL[0]}={LABEL[1]}", "--v=1",
        ], namespace_of=self.namespace_pid, setup=self._cpu_masks())

    def _cpu_masks(self) -> list[str]:
        if not self.advertised_cpus:
            return []
        fake = self.workdir / "sysfs-cpu"
        for i in range(self.advertised_cpus):
            (fake / "cpu" / f"cpu{i}").mkdir(parents=True, exist_ok=True)
        (fake / "node").mkdir(exist_ok=True)
        return [f"mount --bind {fake / 'node'} /sys/devices/system/node",
                f"mount --bind {fake / 'cpu'} /sys/devices/system/cpu"]

    def _wait_ready(self) -> None:
        from kubernetes import client
        core = client.CoreV1Api(self.plane.api())

        def ready():
            node = core.read_node(self.name)
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        self._wait(f"node {self.name} Ready", ready, 120, "kubelet")
        lift_not_ready_taint(core, self.name)

    def _wait(self, what: str, condition, timeout: float, component: str) -> None:
        def alive():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(f"{name} exited ({process.returncode}):\n"
                                            f"{tail(self.workdir / f'{name}.log')}")
        try:
            poll(condition, timeout, 0.25, before_each=alive)
        except PollTimeout as timed_out:
            raise ControlPlaneError(f"{what} not ready after {timeout:.0f}s (last error: {timed_out.last_error})\n"
                                    f"{component} log:\n{tail(self.workdir / f'{component}.log')}")

    def _drain(self) -> None:
        """Delete every pod bound to this node and wait until containerd runs no task."""
        from kubernetes import client
        try:
            core = client.CoreV1Api(self.plane.api())
            for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items:
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
            poll(lambda: not core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items,
                 60, 0.5)
            poll(lambda: not self.ctr("tasks", "list", "--quiet", check=False).stdout.strip(), 30, 0.5)
        except Exception:  # noqa: BLE001 - teardown goes on: whatever is left is killed below
            pass

    def _leftover_pids(self) -> set[int]:
        pids = set()
        marker = str(self.workdir)
        for process in _processes():
            cmdline = " ".join(process.info["cmdline"] or [])
            if marker in cmdline and process.pid != os.getpid():
                pids.add(process.pid)
        for cgroup in self.cgroups_made:
            for procs in cgroup.rglob("cgroup.procs"):
                try:
                    pids |= {int(p) for p in procs.read_text().split()}
                except OSError:
                    pass
        return pids

    def shim_pids(self) -> list[int]:
        """containerd's shims for this node (each the parent of a pod's processes): they outlive
        containerd by design, so they are not its descendants."""
        address = str(self.socket)
        return [p.pid for p in _processes() if address in (p.info["cmdline"] or []) and p.pid not in self.pids()]

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]


def iptables_rules(command: str) -> dict[str, tuple[set, set]]:
    """`<command>-save` as {table: (chains, rules)}."""
    tables, table = {}, None
    for line in subprocess.run([f"{command}-save"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = (set(), set())
        elif line.startswith(":") and table:
            tables[table][0].add(line[1:].split()[0])
        elif line.startswith("-A ") and table:
            tables[table][1].add(line)
    return tables


def nft_tables() -> set[str]:
    """The kernel's nftables tables, as "family name" (iptables-nft keeps its tables there)."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")}


def remove_added_nft_tables(before: set[str]) -> None:
    """iptables-nft makes its tables (filter, nat, mangle) on first use; delete those that did not
    exist `before` and hold no rule now."""
    for table in nft_tables() - before:
        listing = subprocess.run(["nft", "list", "table", *table.split()], capture_output=True, text=True).stdout
        rules = [line for line in listing.splitlines() if line.startswith("\t\t") and "type " not in line]
        if not rules:
            subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True)


def remove_added_iptables(command: str, before: dict) -> None:
    for table, (chains, rules) in iptables_rules(command).items():
        old_chains, old_rules = before.get(table, (set(), set()))
        for rule in sorted(rules - old_rules, reverse=True):
            subprocess.run([command, "-t", table, "-D", *shlex.split(rule)[1:]], capture_output=True)
        for chain in chains - old_chains:
            subprocess.run([command, "-t", table, "-F", chain], capture_output=True)
        for chain in chains - old_chains:
            subprocess.run([command, "-t", table, "-X", chain], capture_output=True)


def docker_ref(tag: str) -> str:
    """A Docker image name as containerd (and the kubelet) spell it."""
    name = tag if "/" in tag else f"library/{tag}"
    return name if name.split("/")[0].count(".") else f"docker.io/{name}"


def node_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy",
                                                                       "kubeconfig")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.0/8,localhost"
    return env


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def toml(data: dict, prefix: str = "") -> str:
    """Just enough TOML for containerd's config: scalars, lists of strings, nested tables."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    lines = [f"{key} = {value(v)}" for key, v in data.items() if not isinstance(v, dict)]
    for key, v in data.items():
        if isinstance(v, dict):
            name = f'{prefix}.{json.dumps(key) if "." in key else key}' if prefix else (json.dumps(key) if "." in key else key)
            lines += ["", f"[{name}]", toml(v, name)]
    return "\n".join(line for line in lines if line is not None)
