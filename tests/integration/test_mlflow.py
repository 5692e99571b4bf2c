"""Experiment tracking against a real MLflow server on 127.0.0.1 (tests/mlflowserver.py).

One run name is one MLflow run, whatever happens to it: a first command that loses a worker with
no restarts left (FAILED), then the same command again, which resumes, loses its chief right
after publishing and restarts it (FINISHED, one model version). A server that is down costs one warning line, not the run.
"""

from __future__ import annotations

import json
import socket

import pytest

from mlflowserver import MLflowServer
from support import FLOAT32, TUTORIAL_RECIPE, kill_env, run_cli

pytestmark = pytest.mark.integration

SMALL = ["--workers", "2", "--epochs", "2", "--train-limit", "1600", "--test-limit", "300", *TUTORIAL_RECIPE, *FLOAT32]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MLflowServer(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory, mnist_dir):
    output = tmp_path_factory.mktemp("output")
    train = ["train", "--data", mnist_dir, *SMALL, "--output", output, "--run-name", "tracked",
             "--mlflow-tracking-uri", server.uri]
    first = run_cli(*train, "--max-failures", "0", env=kill_env("mid-epoch", 1, output / "killed-first"))
    runs_after_first = server.runs()
    # The chief lost right after publishing: the restarted group finds the run complete, and
    # tells MLflow what the lost chief could not (test metrics, the model version).
    second = run_cli(*train, env=kill_env("published", 0, output / "killed-second"))
    return {"output": output, "first": first, "second": second, "runs_after_first": runs_after_first,
            "killed": [(output / name).exists() for name in ("killed-first", "killed-second")]}


def test_one_mlflow_run_across_a_failed_command_a_resume_and_a_restart(tracked, server):
    assert tracked["killed"] == [True, True]
    assert tracked["first"].returncode == 1, tracked["first"].stderr[-2000:]
    assert [r["info"]["status"] for r in tracked["runs_after_first"]] == ["FAILED"]
    assert tracked["second"].returncode == 0, tracked["second"].stderr[-3000:]
    (run,) = server.runs()
    assert run["info"]["run_id"] == tracked["runs_after_first"][0]["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tracked"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["alexnet-job.run"] == "tracked"
    assert tags["alexnet-job.storage"] == str(tracked["output"] / "runs" / "tracked")


def test_the_config_is_logged_as_params(tracked, server):
    (run,) = server.runs()
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["batch_size"] == "64" and params["epochs"] == "2" and params["model"] == "alexnet-mnist"
    assert params["mlflow_tracking_uri"] == server.uri and params["train_limit"] == "1600"


def test_every_epoch_and_the_test_set_are_logged(tracked, server):
    (run,) = server.runs()
    run_id = run["info"]["run_id"]
    epochs = sorted({m["step"] for m in server.metric_history(run_id, "val_accuracy")})
    assert epochs == [1, 2]  # epoch 1 by the first command or the resumed one, epoch 2 by the second
    metrics = json.loads((tracked["output"] / "runs" / "tracked" / "metrics.json").read_text())
    (test_accuracy,) = server.metric_history(run_id, "test_accuracy")
    assert test_accuracy["value"] == pytest.approx(metrics["test_accuracy"]) and test_accuracy["step"] == 2
    assert {"loss", "accuracy", "val_loss", "images_per_second"} <= {m["key"] for m in run["data"]["metrics"]}


def test_the_promoted_run_is_a_new_model_version(tracked, server):
    assert "registered in MLflow as version 1 of model alexnet-job-alexnet-mnist" in tracked["second"].stdout
    versions = server.call("GET", "registered-models/get-latest-versions", {"name": "alexnet-job-alexnet-mnist"})
    (version,) = versions["model_versions"]
    (run,) = server.runs()
    assert version["version"] == "1" and version["run_id"] == run["info"]["run_id"]
    # A local run's model is uploaded to the MLflow run's artifacts (the server refuses local paths as sources).
    assert version["source"] == run["info"]["artifact_uri"] + "/model"
    uploaded = server.workdir / "artifacts" / run["info"]["artifact_uri"].split(":/", 1)[1] / "model"
    published = tracked["output"] / "runs" / "tracked"
    assert (uploaded / "model.keras").read_bytes() == (published / "model.keras").read_bytes()
    assert sorted(p.relative_to(uploaded).as_posix() for p in uploaded.rglob("*") if p.is_file()) == sorted(
        p.relative_to(published).as_posix() for p in [published / "model.keras", *(published / "saved_model").rglob("*")]
        if p.is_file())


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_run(tmp_path, mnist_dir):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = run_cli("train", "--data", mnist_dir, *SMALL, "--epochs", "1", "--output", tmp_path, "--run-name", "untracked",
                     env={"MLFLOW_TRACKING_URI": down})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "MLflow" in line]
    assert warnings == [f"warning: MLflow tracking at {down} stopped (cannot reach {down}: [Errno 111] Connection refused); "
                        "training goes on"], warnings
    assert (tmp_path / "runs" / "untracked" / "manifest.json").exists()


def test_a_tracking_uri_that_is_no_server_is_refused_up_front(tmp_path):
    result = run_cli("train", "--mlflow-tracking-uri", "file:///tmp/mlruns", "--output", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("alexnet-job: error: mlflow_tracking_uri must be the http:// or https:// address "
                                     "of an MLflow tracking server, not 'file:///tmp/mlruns'")
