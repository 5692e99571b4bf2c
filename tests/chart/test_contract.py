"""The contract between the chart and the CLI, checked with the real `alexnet-job`.

The Ray head runs the RayJob's entrypoint with the ConfigMap's config.yaml. Here the rendered
entrypoint is run with --print-config against the rendered config.yaml: the CLI must accept it
(unknown keys are an error there), and what it prints must carry the worker gang's size, the S3
output and the run name from the values that set them, once.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chartlib import CASES, CHART, kinds, rayjob_specs, scheduled_rayjobs, values_of

pytestmark = pytest.mark.chart

CONFIG_PATH = "/etc/alexnet-job/config.yaml"
TRAIN_PREFIX = ["alexnet-job", "train", "--config", CONFIG_PATH, "--address", "auto"]


def cli() -> Path:
    path = Path(sys.executable).with_name("alexnet-job")
    if not path.exists():
        pytest.fail(f"the alexnet-job console script is not installed beside {sys.executable} (uv sync)")
    return path


def print_config(args: list[str], config_text: str, tmp_path: Path) -> dict:
    """Run the real CLI as the Ray head would, with config.yaml where the chart mounts it (rewritten path)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    args = [str(config_file) if arg == CONFIG_PATH else arg for arg in args]
    # The head pod sets no ALEXNET_JOB_* variable; keep this machine's out of the way too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_JOB_") and k != "RAY_ADDRESS"}
    result = subprocess.run([str(cli()), *args[1:], "--print-config"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, f"alexnet-job {' '.join(args[1:])} refused the rendered config:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_cli_accepts_the_rendered_entrypoint_and_config(render, case, tmp_path):
    objects = render(case)
    values = values_of(case)
    (config_map,) = kinds(objects, "ConfigMap")
    ((where, spec),) = rayjob_specs(objects)
    args = shlex.split(spec["entrypoint"])
    assert args[:len(TRAIN_PREFIX)] == TRAIN_PREFIX, f"{where}: {spec['entrypoint']}"

    printed = print_config(args, config_map["data"]["config.yaml"], tmp_path)

    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits.get(values["workers"]["gpuResource"], 0))
    # One source of truth: the worker group's size and resources are what the CLI trains with.
    assert printed["workers"] == group["replicas"] == values["workers"]["replicas"]
    assert printed["gpus_per_worker"] == gpus == values["workers"]["gpus"]
    assert printed["cpus_per_worker"] == int(limits["cpu"]) == values["workers"]["cpu"]
    prefix = values["s3"]["prefix"]
    assert printed["output"] == f"s3://{values['s3']['bucket']}" + (f"/{prefix}" if prefix else "")
    assert printed["address"] == "auto"
    for key, value in values["training"].items():
        if value is not None:
            assert printed[key] == value, f"training.{key}: values {value!r}, CLI {printed[key]!r}"

    if values["schedule"]:
        assert "--run-name" not in args, "a scheduled template must not pin one run name for every night"
    else:
        expected = values.get("runName") or spec_name(objects)
        assert args[len(TRAIN_PREFIX):] == ["--run-name", expected]
        assert printed["run_name"] == expected


def printed_step_timeout(helm, training: str, tmp_path: Path):
    """The step_timeout the CLI reads from the config.yaml the chart renders for these training values."""
    values = tmp_path / "values.yaml"
    values.write_text(f"training:\n  {training}\n")
    result = helm("template", "alexnet", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (config_map,) = kinds(objects, "ConfigMap")
    ((_, spec),) = rayjob_specs(objects)
    return print_config(shlex.split(spec["entrypoint"]), config_map["data"]["config.yaml"], tmp_path)["step_timeout"]


@pytest.mark.parametrize("training, expected", [
    ("{}", 600), ("step_timeout: 900", 900),
    # YAML 1.1 reads a bare `off` as false: either way the CLI is told "off", no watchdog.
    ("step_timeout: off", None), ("step_timeout: 'off'", None), ("step_timeout: false", None)])
def test_the_step_watchdog_can_be_set_or_turned_off_from_the_values(helm, training, expected, tmp_path):
    assert printed_step_timeout(helm, training, tmp_path) == expected


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_helm_test_pod_checks_what_the_head_runs(render, case):
    objects = render(case)
    ((_, spec),) = rayjob_specs(objects)
    (pod,) = kinds(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"] + container["args"] == shlex.split(spec["entrypoint"]) + ["--print-config"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["items"] == [{"key": "config.yaml", "path": "config.yaml"}]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_one_image_and_the_storage_environment_everywhere(render, case):
    objects = render(case)
    values = values_of(case)
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    ((where, spec),) = rayjob_specs(objects)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == values["rayVersion"]
    storage_pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    storage_pods += [c["spec"]["jobTemplate"]["spec"]["template"] for c in kinds(objects, "CronJob")]
    for template in storage_pods:
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        if values["s3"]["endpoint"]:
            assert env["AWS_ENDPOINT_URL_S3"] == values["s3"]["endpoint"]
        else:
            assert "AWS_ENDPOINT_URL_S3" not in env
        secret = values["s3"]["existingSecret"]
        assert container.get("envFrom", []) == ([{"secretRef": {"name": secret}}] if secret else [])
    every_container = [t["spec"]["containers"][0] for t in storage_pods]
    every_container += [spec["submitterPodTemplate"]["spec"]["containers"][0]]
    every_container += [c for pod in kinds(objects, "Pod") for c in pod["spec"]["containers"]]
    assert {c["image"] for c in every_container} == {image}


def test_the_schedule_runs_submit_then_prune(render):
    objects = render(next(case for case in CASES if case.name == "example-nightly"))
    values = values_of(next(case for case in CASES if case.name == "example-nightly"))
    (cron,) = kinds(objects, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"] == "Europe/Berlin"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retried schedule pod would submit a second RayJob"
    (container,) = job["template"]["spec"]["containers"]
    (template,) = scheduled_rayjobs(objects)
    selector = f"alexnet-job/schedule={template['metadata']['name']}"
    assert template["metadata"]["labels"]["alexnet-job/schedule"] == template["metadata"]["name"]
    script = container["command"][-1].splitlines()
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert script[0] == ("alexnet-job submit --manifest /etc/alexnet-job/rayjob.yaml --generate-name "
                         f"--promote-if-better {values['cron']['promoteIfBetter']}")
    assert script[2] == f"alexnet-job prune --keep {values['cron']['keep']} --selector {selector} || exit $?"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (volume,) = [v for v in job["template"]["spec"]["volumes"] if v["name"] == mounts["/etc/alexnet-job"]]
    assert volume["configMap"]["items"] == [{"key": "rayjob.yaml", "path": "rayjob.yaml"}]


def test_the_schedule_script_prunes_after_a_failed_run_and_reports_the_failure(render, tmp_path):
    """Run the CronJob's shell script with stand-in submit/prune commands to pin its exit logic."""
    objects = render(next(case for case in CASES if case.name == "example-nightly"))
    (cron,) = kinds(objects, "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = container["command"][-1]
    stub = tmp_path / "alexnet-job"
    stub.write_text('#!/bin/sh\necho "$1" >> "$LOG"\n[ "$1" = submit ] && exit "$SUBMIT"\nexit "$PRUNE"\n')
    stub.chmod(0o755)
    for submit, prune, expected in ((0, 0, 0), (3, 0, 3), (0, 4, 4), (3, 4, 4)):
        log = tmp_path / f"log-{submit}-{prune}"
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(log), "SUBMIT": str(submit), "PRUNE": str(prune)}
        result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, check=False)
        assert result.returncode == expected, (submit, prune)
        assert log.read_text().split() == ["submit", "prune"], "prune runs after every submit"


def spec_name(objects: list[dict]) -> str:
    (job,) = kinds(objects, "RayJob")
    return job["metadata"]["name"]
