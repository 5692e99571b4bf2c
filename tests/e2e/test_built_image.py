"""The image the Dockerfile builds (tests/e2e/image.py builds it unchanged, on a local stand-in
for the Python base image), run by a real Docker engine with no network."""

from __future__ import annotations

import json
import tomllib

import pytest
import yaml

from e2elib import CHART
from image import ROOT, context_files, project_version

pytestmark = pytest.mark.e2e


def test_it_runs_as_the_unprivileged_app_user(e2e):
    result = e2e.docker.run(e2e.image.tag, "sh", "-c", "echo $(id -u) $(id -g) $(id -un) $HOME")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "1000", "app", "/home/app"]


def test_its_default_command_is_the_cli_help(e2e):
    result = e2e.docker.run(e2e.image.tag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: alexnet-job") and "submit" in result.stdout


def test_its_packages_are_the_locked_versions_and_the_charts_ray(e2e):
    listing = e2e.docker.run(e2e.image.tag, "python", "-c",
                             "import json, importlib.metadata as m; "
                             "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    assert listing.returncode == 0, listing.stderr
    installed = {name.replace("_", "-"): version for name, version in json.loads(listing.stdout).items()}
    locked: dict[str, set] = {}  # a package may be locked at one version per Python range
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        locked.setdefault(package["name"], set()).add(package["version"])
    differ = {name: (version, sorted(locked[name])) for name, version in installed.items()
              if name in locked and name != "alexnet-job" and version not in locked[name]}
    assert not differ, f"installed vs uv.lock: {differ}"
    not_locked = sorted(set(installed) - set(locked) - {"pip", "setuptools", "wheel"})
    assert not not_locked, f"in the image but not in uv.lock: {not_locked}"
    assert installed["alexnet-job"] == project_version()
    for runtime in ("tensorflow", "tf-keras", "ray", "boto3", "kubernetes", "numpy"):
        assert runtime in installed, f"{runtime} missing from the image"
    assert "pytest" not in installed, "the image carries the dev dependencies"
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert installed["ray"] == chart["rayVersion"]
    labels = json.loads(e2e.docker.docker("image", "inspect", "--format", "{{json .Config.Labels}}",
                                          e2e.image.tag).stdout)
    assert labels["io.ray.version"] == installed["ray"] and labels["org.tensorflow.version"] == installed["tensorflow"]
    assert labels["alexnet-job.variant"] == "cpu"


def test_its_cache_key_covers_the_build_context():
    # The image is rebuilt when anything it copies changes: the key must see the package's files
    # and the lock, and nothing .dockerignore keeps out.
    names = {p.relative_to(ROOT).as_posix() for p in context_files()}
    assert {"pyproject.toml", "uv.lock", "README.md", "job/cli.py", "job/data/mnist.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", ".git", "charts/")) or "__pycache__" in n]


def test_a_two_worker_training_run_works_inside_it(e2e):
    # As the chart runs it: read-only root filesystem, HOME and everything written under /tmp.
    run = "/tmp/out/runs/image-smoke"
    script = ("alexnet-job train --workers 2 --dataset synthetic --synthetic-examples 512 --test-limit 64 "
              "--epochs 1 --batch-size 32 --no-augment --output /tmp/out --run-name image-smoke "
              f"> /tmp/train.log 2>&1 || {{ cat /tmp/train.log; exit 1; }}; test -f {run}/manifest.json && "
              f"cat {run}/metrics.json")
    result = e2e.docker.run(e2e.image.tag, "sh", "-c", script, timeout=600,
                            options=("--read-only", "--tmpfs", "/tmp:exec,size=2g", "--shm-size", "1g",
                                     "-e", "HOME=/tmp", "--cpus", "2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["workers"] == 2 and metrics["replicas"] == 2, metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0, metrics
