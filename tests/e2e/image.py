"""The project's image, built from the repository's Dockerfile by a real Docker engine.

Docker Hub cannot be reached from these machines, so the Dockerfile's `PYTHON_IMAGE` (the
official `python:3.11-slim-bookworm` for users) is replaced by a local stand-in made from Debian's
own packages: `debootstrap --variant=minbase bookworm` with python3, pip and venv, the machine's
trusted CA certificates (the package registries are reached through a TLS proxy whose CA only
this machine trusts) and `SSL_CERT_FILE` pointing at them, for uv. The stand-in is for tests on
this machine only and is never pushed anywhere. The Dockerfile itself is built unchanged, with
the legacy builder: BuildKit would fetch the `# syntax=` frontend from Docker Hub.

Both images are cached by the hash of what goes into them (the base: its recipe and the CA
certificates; the project image: the base and every file of the build context), so a warm run
reuses them. The engine keeps its data under ~/.cache/alexnet-job/docker (ALEXNET_JOB_CACHE moves
it); everything else it writes (socket, pid file, exec root) lives in the session's work dir.

`Docker.start()` runs dockerd with no bridge, no iptables rules and no IP forwarding: builds run
with `--network host` (they reach the package registries, as `uv sync` on this machine does),
containers run with `--network none`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ALEXNET_JOB_CACHE", Path.home() / ".cache" / "alexnet-job"))
NODE_PACKAGES = ROOT / "scripts" / "node-packages"
DOCKER_CLIENT = "/usr/bin/docker"  # Debian's, the daemon's own version (a newer client may default to BuildKit)

# The stand-in base: what it is made of. Changing this string rebuilds it.
BASE_SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # uv verifies TLS with its own roots unless told to use the system's (which hold this
    # machine's proxy CA); pip on Debian uses the system's already.
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
}
MACHINE_CAS = Path("/usr/local/share/ca-certificates")
# Paths the Docker engine, containerd, the kubelet and the CNI plugins write to whatever they are
# told (containerd's `opt` plugin, shim sockets, device plugins, container log links, CNI
# results, network-namespace files). Whoever creates one removes it when stopping.
FIXED_STATE_PATHS = ("/opt/containerd", "/run/containerd", "/var/lib/containerd", "/var/lib/docker", "/run/docker",
                     "/etc/docker", "/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
                     "/var/run/netns", "/etc/cni", "/opt/cni")


class CacheLock:
    """An exclusive lock on one of the cache's stores (Docker's data root, containerd's root),
    which one daemon at a time may use: a second test session waits for the first."""

    def __init__(self, store: Path, timeout: float = 1800):
        self.path, self.timeout, self.handle = store.with_name(store.name + ".lock"), timeout, None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("w")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    raise ImageError(f"{self.path} is held by another test session for over {self.timeout:.0f} s")
                time.sleep(1)

    def release(self) -> None:
        if self.handle:
            self.handle.close()  # closing drops the lock
            self.handle = None


def absent_state_paths() -> list[str]:
    return [path for path in FIXED_STATE_PATHS if not Path(path).exists()]


def remove_created(absent_before: list[str]) -> None:
    """Remove those of `absent_before` that exist now (unmounting anything inside first)."""
    for path in absent_before:
        if Path(path).exists():
            unmount_below(Path(path))
            shutil.rmtree(path, ignore_errors=True)


def docker_cgroups() -> list[Path]:
    """The cgroup dockerd (cgroupfs driver) puts its containers under, in every v1 hierarchy: it
    makes it for its first container and leaves it behind when it stops."""
    root = Path("/sys/fs/cgroup")
    return [hierarchy / "docker" for hierarchy in sorted(root.iterdir()) if hierarchy.is_dir()] if root.is_dir() else []


def remove_cgroups(cgroups: list[Path]) -> None:
    """rmdir each cgroup that exists, its (empty) children first; one still in use stays."""
    for cgroup in cgroups:
        if cgroup.is_dir():
            for child in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    child.rmdir()
                except OSError:
                    pass
            try:
                cgroup.rmdir()
            except OSError:
                pass


class ImageError(RuntimeError):
    pass


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def debian_mirror() -> str:
    """The machine's own Debian mirror (the first `URIs:` of its apt sources)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in source.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb "):
            return line.split()[1]
    raise ImageError("no Debian mirror in /etc/apt/sources.list(.d): debootstrap needs one")


def ensure_packages() -> None:
    result = subprocess.run([str(NODE_PACKAGES)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"scripts/node-packages failed:\n{result.stderr[-2000:]}")


def unmount_below(path: Path) -> None:
    """Unmount whatever is mounted at or below `path`, deepest first (a failed debootstrap can
    leave its chroot's /proc and /sys mounted)."""
    prefix = str(path.resolve())
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go's filepath.Match, plus `**` for any depth)."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(part, re.escape(part)) for part in parts))


def context_files() -> list[Path]:
    """The files of the Docker build context under .dockerignore's rules, as Docker reads them:
    the last rule that matches a path (or one of its parent folders) decides; `!` keeps."""
    rules = [(line.startswith("!"), dockerignore_regex(line.lstrip("!")))
             for line in (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
             if line and not line.startswith("#")]
    kept = []
    for path in sorted(p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.relative_to(ROOT).parts):
        parts = path.relative_to(ROOT).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        excluded = False
        for keep, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not keep
        if not excluded:
            kept.append(path)
    return kept


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


@dataclass
class Built:
    """A built image: its tags and what it took."""
    tag: str             # alexnet-job:<version>-cpu, as the chart's image.tag names it
    inputs_tag: str      # alexnet-job:inputs-<hash>, the cache key
    base: str
    seconds: dict
    size_bytes: int


class Docker:
    """A Docker engine of the session's own, on its own socket; stop() ends it by its pid."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.socket = workdir / "docker.sock"
        self.data_root = CACHE / "docker"
        self.process: subprocess.Popen | None = None
        self.log = workdir / "dockerd.log"
        self.lock = CacheLock(self.data_root)

    def env(self) -> dict:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0",
                "DOCKER_CONFIG": str(self.workdir / "docker-config")}

    def start(self) -> "Docker":
        ensure_packages()
        self.lock.acquire()
        self.absent_before = absent_state_paths()
        self.cgroups_absent_before = [cgroup for cgroup in docker_cgroups() if not cgroup.exists()]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        (self.workdir / "docker-config").mkdir(exist_ok=True)
        (self.workdir / "daemon.json").write_text("{}")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([
                "dockerd", f"--host=unix://{self.socket}", f"--data-root={self.data_root}",
                f"--exec-root={self.workdir / 'docker-exec'}", f"--pidfile={self.workdir / 'dockerd.pid'}",
                f"--config-file={self.workdir / 'daemon.json'}",
                "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
                "--bridge=none", "--storage-driver=overlay2", "--userland-proxy=false",
            ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ImageError(f"dockerd exited ({self.process.returncode}):\n{tail(self.log)}")
            if self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise ImageError(f"dockerd did not answer within 60 s:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # dockerd unmounts its overlays and netns files on a clean stop; make sure of it.
        unmount_below(self.workdir / "docker-exec")
        unmount_below(self.data_root)
        remove_created(getattr(self, "absent_before", []))
        remove_cgroups(getattr(self, "cgroups_absent_before", []))  # found missing on a new machine
        self.lock.release()

    def pid(self) -> int:
        return self.process.pid

    def docker(self, *args, check: bool = True, timeout: float = 600, input: bytes | None = None,
               stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        result = subprocess.run([DOCKER_CLIENT, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                                env=self.env(), timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise ImageError(f"docker {' '.join(map(str, args[:3]))} failed ({result.returncode}): "
                             f"{result.stderr.decode(errors='replace')[-2000:]}")
        return result

    def has(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def run(self, image: str, *command, options=(), timeout: float = 600) -> subprocess.CompletedProcess:
        """`docker run --rm --network none` of `image`; stdout and stderr as text."""
        result = subprocess.run([DOCKER_CLIENT, "run", "--rm", "--network", "none", *options, image, *command],
                                capture_output=True, text=True, env=self.env(), timeout=timeout)
        return result

    # -- images

    def base_image(self) -> str:
        """The stand-in for `python:3.11-slim-bookworm`, made with debootstrap (cached)."""
        cas = b"".join(p.read_bytes() for p in sorted(MACHINE_CAS.glob("*.crt")))
        recipe = f"{BASE_SUITE} {BASE_PACKAGES} {sorted(BASE_ENV.items())}".encode()
        tag = f"alexnet-job-test-base:{BASE_SUITE}-{digest(recipe, cas)}"
        if self.has(tag):
            return tag
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".rootfs.") as tmp:
            rootfs = Path(tmp) / "rootfs"
            try:
                step(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", BASE_SUITE, str(rootfs),
                      debian_mirror()], "debootstrap", timeout=900)
                for ca in sorted(MACHINE_CAS.glob("*.crt")):
                    shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
                step(["chroot", str(rootfs), "update-ca-certificates"], "update-ca-certificates")
                # pip installs system-wide in an image (the official python images allow it too).
                for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                    marker.unlink()
                shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
                (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
                shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
                (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
            finally:
                unmount_below(rootfs)
            changes = [arg for key, value in BASE_ENV.items() for arg in ("--change", f"ENV {key}={value}")]
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            result = subprocess.run([DOCKER_CLIENT, "import", *changes, "--change", 'CMD ["python3"]', "-", tag],
                                    stdin=tar.stdout, capture_output=True, text=True, env=self.env())
            tar.stdout.close()
            if tar.wait() != 0 or result.returncode != 0:
                raise ImageError(f"docker import of the base failed: {result.stderr[-2000:]}")
        for old in self.tags("alexnet-job-test-base"):
            if old != tag:
                self.docker("rmi", old, check=False)
        return tag

    def tags(self, repository: str) -> list[str]:
        out = self.docker("images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout.decode()
        return [line for line in out.split() if line and not line.endswith(":<none>")]

    def build_project(self, variant: str = "cpu") -> Built:
        """`docker build` of the repository's Dockerfile, unchanged, on the stand-in base."""
        seconds = {}
        t = time.monotonic()
        base = self.base_image()
        seconds["base image"] = time.monotonic() - t
        base_id = self.docker("image", "inspect", "--format", "{{.Id}}", base).stdout.strip()
        files = [ROOT / "Dockerfile", *context_files()]
        key = digest(base_id, variant.encode(),
                     *(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() for p in files))
        tag = f"alexnet-job:{project_version()}-{variant}"
        inputs_tag = f"alexnet-job:inputs-{variant}-{key}"
        t = time.monotonic()
        if not self.has(inputs_tag):
            log = self.workdir / f"docker-build-{variant}.log"
            with log.open("wb") as out:
                result = self.docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
                                     "--build-arg", f"VARIANT={variant}", "-t", tag, "-t", inputs_tag, str(ROOT),
                                     check=False, timeout=1800, stdout=out)
            if result.returncode != 0:
                raise ImageError(f"docker build failed ({result.returncode}); {log}:\n{tail(log)}\n"
                                 f"{result.stderr.decode(errors='replace')[-1000:]}")
            for old in self.tags("alexnet-job"):
                if old.startswith(f"alexnet-job:inputs-{variant}-") and old != inputs_tag:
                    self.docker("rmi", old, check=False)
            self.docker("image", "prune", "--force", check=False)
        else:
            self.docker("tag", inputs_tag, tag)
        seconds["project image"] = time.monotonic() - t
        size = int(self.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
        return Built(tag, inputs_tag, base, seconds, size)


def step(command: list[str], what: str, timeout: float = 300) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ImageError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
