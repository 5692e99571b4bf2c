"""The Dockerfile: linted by the real hadolint, its pins agree with pyproject.toml, uv.lock and the
chart, and its build context holds exactly what it copies. (tests/e2e/test_built_image.py builds and runs it.)
"""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from chartlib import CHART, ROOT

pytestmark = pytest.mark.chart

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_lines() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current:
                joined.append(current)
            current = ""
    return joined


def build_args() -> dict[str, set[str]]:
    """Every ARG default, per name (an ARG redeclared in a later stage must keep its value)."""
    found: dict[str, set[str]] = {}
    for line in dockerfile_lines():
        match = re.fullmatch(r"ARG (\w+)=(\S+)", line)
        if match:
            found.setdefault(match[1], set()).add(match[2])
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"]}


def requirement(name: str) -> Requirement:
    for text in pyproject()["project"]["dependencies"]:
        req = Requirement(text)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


def test_hadolint_finds_nothing(tools_bin):
    result = subprocess.run([str(tools_bin / "hadolint"), "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_real(tools_bin, tmp_path):
    """The linter does reject a bad Dockerfile (so a clean report above means something)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install wget\n")
    result = subprocess.run([str(tools_bin / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True,
                            check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("arg, package", [("RAY_VERSION", "ray"), ("TENSORFLOW_VERSION", "tensorflow"),
                                          ("TF_KERAS_VERSION", "tf-keras")])
def test_pinned_versions_agree_with_pyproject_and_the_lock(arg, package):
    (pinned,) = build_args()[arg]  # one value, in every stage that declares it
    assert requirement(package).specifier.contains(pinned), f"{arg}={pinned} is outside pyproject's {requirement(package)}"
    assert locked_versions()[package] == pinned, f"{arg}={pinned} but uv.lock has {package} {locked_versions()[package]}"


def test_chart_ray_version_and_image_tag_agree_with_the_image():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = pyproject()["project"]["version"]
    (ray,) = build_args()["RAY_VERSION"]
    assert values["rayVersion"] == ray
    assert chart["appVersion"] == version
    assert values["image"]["tag"] == f"{version}-gpu", "the default image is the GPU variant of this version"
    assert build_args()["VARIANT"] == {"gpu"}
    for example in sorted((CHART / "examples").glob("*.yaml")):
        tag = (yaml.safe_load(example.read_text()).get("image") or {}).get("tag")
        assert tag in (None, f"{version}-gpu", f"{version}-cpu"), f"{example.name}: image.tag {tag}"
    smoke = yaml.safe_load((CHART / "examples" / "cpu-smoke.yaml").read_text())
    assert smoke["image"]["tag"] == f"{version}-cpu" and smoke["workers"]["gpus"] == 0


def test_base_image_is_pinned_and_supported():
    (image,) = build_args()["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-(bookworm|trixie)", image)
    assert match, f"base image {image} is not pinned to an exact Python release"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(match[1]), "requires-python"
    froms = [line for line in dockerfile_lines() if line.startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]


def test_runtime_user_environment_and_gpu_extra():
    lines = dockerfile_lines()
    runtime = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["securityContext"]
    assert f"USER {values['runAsUser']}:{values['runAsGroup']}" in runtime, "the chart's runAsUser is the image's user"
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "TF_USE_LEGACY_KERAS=1" in env.split(), "Keras 2 in every process Ray starts"
    assert any("useradd --uid 1000 --gid 1000" in line for line in runtime)
    gpu_extra = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert any(Requirement(r).name == "tensorflow" and "and-cuda" in Requirement(r).extras for r in gpu_extra)
    syncs = [line for line in lines if "uv sync" in line]
    assert len(syncs) == 2 and all("--frozen" in line and "--no-dev" in line for line in syncs)
    assert all("--extra gpu" in line for line in syncs), "VARIANT=gpu installs the [gpu] extra"


def test_build_context_holds_exactly_what_the_dockerfile_copies():
    copies = [line.split()[1:-1] for line in dockerfile_lines()
              if line.startswith("COPY ") and "--from=" not in line]
    sources = [source for sources in copies for source in sources]
    assert sources == ["pyproject.toml", "uv.lock", "README.md", "job"]
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for package_file in (ROOT / "job").rglob("*.py"):
        assert not _ignored(str(package_file.relative_to(ROOT)), patterns), package_file
    for kept_out in (".git", ".venv", "tests", "charts", "k8s", "job/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the Docker daemon"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob(pattern.lstrip("!").rstrip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def _glob(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)
