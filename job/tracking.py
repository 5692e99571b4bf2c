"""Experiment tracking in MLflow, optional: `--mlflow-tracking-uri` (or MLFLOW_TRACKING_URI).

A run logs its config as params, each epoch's metrics, its final test metrics and where it is
stored; a run promoted to `latest` becomes a new version of the registered model
`alexnet-job-<model>`. One MLflow run per run name: a restarted worker group, a resumed run and a
RayJob retry all find the MLflow run tagged with the run's name and log into it (Ray Train
would start a new one each time: ray-project/ray#48664).

Spoken over MLflow's REST API with the standard library, so the product needs no MLflow package.
Tracking never costs the training run: a server that is down or refuses costs one warning line,
then that process stops trying.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

RUN_TAG = "alexnet-job.run"
PROXIED_ARTIFACTS = "mlflow-artifacts:/"  # the server stores artifacts itself (MLflow's default)
TIMEOUT_SECONDS = 10.0


class TrackingError(Exception):
    pass


class Tracker:
    """The MLflow run of one alexnet-job run; every call is a no-op once one has failed."""

    def __init__(self, tracking_uri: str | None, run_id: str | None = None):
        self.base = tracking_uri.rstrip("/") if tracking_uri else None
        self.run_id = run_id
        self.failed = False

    @property
    def active(self) -> bool:
        return bool(self.base and self.run_id and not self.failed)

    # -- the driver: find or create the run ------------------------------------------------------
    def start(self, experiment: str, run_name: str, params: dict) -> str | None:
        """The MLflow run of `run_name` in `experiment` (made, with `params`, if there is none);
        its id, or None if tracking is off or failed."""
        if not self.base:
            return None
        try:
            experiment_id = self._experiment(experiment)
            found = self._call("POST", "runs/search", {
                "experiment_ids": [experiment_id], "max_results": 1,
                "filter": f"tags.`{RUN_TAG}` = '{run_name}'"}).get("runs", [])
            if found:
                self.run_id = found[0]["info"]["run_id"]
                self._call("POST", "runs/update", {"run_id": self.run_id, "status": "RUNNING"})
            else:
                created = self._call("POST", "runs/create", {
                    "experiment_id": experiment_id, "run_name": run_name, "start_time": _now_ms(),
                    "tags": [{"key": RUN_TAG, "value": run_name}]})
                self.run_id = created["run"]["info"]["run_id"]
                # Params are logged once: MLflow refuses to change one, and a resumed run's may differ.
                self._call("POST", "runs/log-batch", {"run_id": self.run_id, "params": [
                    {"key": key, "value": "" if value is None else str(value)[:6000]} for key, value in params.items()]})
        except TrackingError as error:
            self._give_up(error)
            return None
        return self.run_id

    def _experiment(self, name: str) -> str:
        try:
            return self._call("GET", "experiments/get-by-name", {"experiment_name": name})["experiment"]["experiment_id"]
        except TrackingError as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(error):
                raise
        return self._call("POST", "experiments/create", {"name": name})["experiment_id"]

    # -- the chief: metrics, where the run is, the model version --------------------------------
    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.active:
            now = _now_ms()
            self._try("POST", "runs/log-batch", {"run_id": self.run_id, "metrics": [
                {"key": key, "value": float(value), "timestamp": now, "step": step}
                for key, value in metrics.items() if isinstance(value, (int, float))]})

    def set_tags(self, tags: dict) -> None:
        if self.active:
            self._try("POST", "runs/log-batch", {"run_id": self.run_id, "tags": [
                {"key": key, "value": str(value)} for key, value in tags.items()]})

    def register_model(self, name: str, run_uri: str) -> str | None:
        """A new version of registered model `name` holding the published run's model; its
        version number. A run in object storage is the version's source as it is; a run in a local
        folder, which the server cannot read, has its model files uploaded to the MLflow run's
        artifacts first (MLflow refuses local paths as sources)."""
        if not self.active:
            return None
        try:
            # A restart that publishes again (finding the run complete) must not add a version.
            found = self._call("GET", "model-versions/search", {"filter": f"name='{name}' and run_id='{self.run_id}'"})
            if found.get("model_versions"):
                return found["model_versions"][0]["version"]
            source = run_uri if "://" in run_uri else self._upload_model(Path(run_uri))
            try:
                self._call("POST", "registered-models/create", {"name": name})
            except TrackingError as error:
                if "RESOURCE_ALREADY_EXISTS" not in str(error):
                    raise
            created = self._call("POST", "model-versions/create", {"name": name, "source": source, "run_id": self.run_id})
            return created["model_version"]["version"]
        except TrackingError as error:
            self._give_up(error)
            return None

    def _upload_model(self, run_dir: Path) -> str:
        """model.keras and saved_model/ of a local run into the MLflow run's artifacts, under
        model/, through the server's artifact proxy; the artifact location."""
        artifact_uri = self._call("GET", "runs/get", {"run_id": self.run_id})["run"]["info"]["artifact_uri"]
        if not artifact_uri.startswith(PROXIED_ARTIFACTS):
            raise TrackingError(f"the server keeps artifacts at {artifact_uri}, not through itself: a run in a local "
                                "folder cannot be registered; publish to s3:// instead")
        files = [run_dir / "model.keras", *sorted(p for p in (run_dir / "saved_model").rglob("*") if p.is_file())]
        for path in files:
            relative = path.relative_to(run_dir).as_posix()
            url = f"{self.base}/api/2.0/mlflow-artifacts/artifacts/{artifact_uri[len(PROXIED_ARTIFACTS):]}/model/{relative}"
            self._send(urllib.request.Request(url, data=path.read_bytes(), method="PUT"), f"PUT artifact {relative}")
        return f"{artifact_uri}/model"

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        if self.active:
            self._try("POST", "runs/update", {"run_id": self.run_id, "status": status, "end_time": _now_ms()})

    # -- the wire --------------------------------------------------------------------------------
    def _try(self, method: str, path: str, body: dict) -> None:
        try:
            self._call(method, path, body)
        except TrackingError as error:
            self._give_up(error)

    def _call(self, method: str, path: str, body: dict) -> dict:
        url = f"{self.base}/api/2.0/mlflow/{path}"
        data = None
        if method == "GET":
            url += "?" + urllib.parse.urlencode(body)
        else:
            data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        return self._send(request, f"{method} {path}")

    def _send(self, request: urllib.request.Request, what: str) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)
                detail = f"{parsed.get('error_code', '')}: {parsed.get('message', '')}"
            except ValueError:
                detail = detail[:200]
            raise TrackingError(f"{what} answered {error.code} {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"cannot reach {self.base}: {reason}") from None

    def _give_up(self, error: TrackingError) -> None:
        if not self.failed:
            print(f"warning: MLflow tracking at {self.base} stopped ({error}); training goes on", flush=True)
        self.failed = True


def _now_ms() -> int:
    return int(time.time() * 1000)


def model_name(model: str) -> str:
    return f"alexnet-job-{model}"
