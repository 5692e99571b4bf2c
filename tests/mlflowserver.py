"""A real MLflow tracking server on 127.0.0.1 for the tests, from PyPI's `mlflow` in an
environment of its own (`uvx`): the product speaks MLflow's REST API and needs no MLflow package,
and the server's dependencies stay out of the project's lock.

    with MLflowServer(tmp_path) as server:
        server.uri            # http://127.0.0.1:PORT
        server.get("runs/search", ...)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from ports import free_port

MLFLOW = "mlflow==3.17.2"  # 3.18.0 needs an mlflow-tracing the index does not have
HOST = "127.0.0.1"
# The first start installs the server into uv's cache (a minute or two); later ones take seconds.
START_TIMEOUT = 600.0


class MLflowServer:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.process: subprocess.Popen | None = None
        self.port = None

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        uvx = shutil.which("uvx") or shutil.which("uv")
        if not uvx:
            raise RuntimeError("uv is not on PATH: the MLflow server is run with `uvx --from mlflow`")
        command = [uvx, *(["tool", "run"] if uvx.endswith("/uv") else []), "--from", MLFLOW, "mlflow", "server",
                   "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                   "--artifacts-destination", str(self.workdir / "artifacts"), "--workers", "1"]
        log = open(self.workdir / "mlflow.log", "ab")
        for _ in range(3):  # a port found free can be taken before the server binds it: another one
            self.port = free_port(HOST)
            self.process = subprocess.Popen([*command, "--host", HOST, "--port", str(self.port)], cwd=self.workdir,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false",
                                                 "DO_NOT_TRACK": "true"},
                                            start_new_session=True)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"the MLflow server did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.5)
        return False

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.uri}/api/2.0/mlflow/{path}"
        data = json.dumps(body).encode() if method != "GET" else None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body, doseq=True)
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def runs(self, experiment: str = "alexnet-job") -> list[dict]:
        experiment_id = self.call("GET", "experiments/get-by-name", {"experiment_name": experiment})["experiment"]["experiment_id"]
        return self.call("POST", "runs/search", {"experiment_ids": [experiment_id]}).get("runs", [])

    def metric_history(self, run_id: str, key: str) -> list[dict]:
        return self.call("GET", "metrics/get-history", {"run_id": run_id, "metric_key": key}).get("metrics", [])

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # uvx, the server and its uvicorn worker
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "mlflow.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> "MLflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
