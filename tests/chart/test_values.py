"""values.yaml, values.schema.json and the chart README agree with each other and with the CLI.

- every file in bad-values/ is refused by `helm template`, with the messages its `# expect:` lines name
- the README's value table and the schema's descriptions are generated from values.yaml (current)
- the `training:` options are exactly the CLI's config keys, less the ones the chart derives
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

from chartlib import CHART, HERE, ROOT, merge_values

pytestmark = pytest.mark.chart

BAD_VALUES = sorted((HERE / "bad-values").glob("*.yaml"))
# config.yaml keys the chart writes itself, from the values that size the pods and storage;
# `address` and the run name are the entrypoint's flags.
DERIVED = {"workers", "gpus_per_worker", "cpus_per_worker", "output"}
FLAGS = {"address", "run_name"}


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("path", BAD_VALUES, ids=lambda path: path.stem)
def test_bad_values_are_refused_with_a_clear_message(helm, path):
    header = [line for line in path.read_text().splitlines() if line.startswith("# ")]
    expected = [line.removeprefix("# expect: ") for line in header if line.startswith("# expect: ")]
    release = next((line.removeprefix("# release: ") for line in header if line.startswith("# release: ")), "bad")
    assert expected, f"{path.name} has no '# expect:' line"
    result = helm("template", release, str(CHART), "-f", str(path))
    assert result.returncode != 0, f"{path.name} was accepted"
    for message in expected:
        assert message in result.stderr, f"{path.name}: {message!r} not in:\n{result.stderr}"


def test_there_is_a_bad_values_file_for_plain_credentials():
    names = {path.stem for path in BAD_VALUES}
    assert {"plain-s3-keys", "plain-credential-env", "plain-token-env-lowercase"} <= names


def test_defaults_and_examples_pass_the_schema_in_python_too():
    """Helm's validator and Python's jsonschema agree on the schema (regex dialect included)."""
    validator = jsonschema.Draft202012Validator(schema())
    validator.check_schema(schema())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    validator.validate(defaults)
    for path in sorted((CHART / "examples").glob("*.yaml")):
        merged = merge_values(defaults, yaml.safe_load(path.read_text()))
        validator.validate(merged)
    bad = merge_values(defaults, {"extraEnv": [{"name": "db_Password", "value": "x"}]})
    assert not validator.is_valid(bad), "the credential-name rule must ignore case in Python as in helm"


def test_every_object_in_the_schema_is_closed():
    """additionalProperties is false (or typed, for free maps) wherever the schema describes an object."""
    open_objects = []

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                allowed = node.get("additionalProperties")
                free_map = isinstance(allowed, dict)  # e.g. labels: string -> string
                described_elsewhere = where.rsplit("/", 1)[-1] in {"nodeAffinity", "podAffinity", "podAntiAffinity"}
                if allowed is not False and not free_map and not described_elsewhere:
                    open_objects.append(where)
            for key, value in node.items():
                if key not in ("if", "then"):  # conditions refining the enclosing object
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(schema(), "")
    assert not open_objects, f"objects without additionalProperties: {open_objects}"


def test_readme_table_and_schema_descriptions_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart-docs"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_chart_docs_refuses_an_undocumented_value():
    docs = _chart_docs_module()
    with pytest.raises(docs.DocsError, match=r"line 4: head.memory has no `# --` comment"):
        docs.documented_values("head:\n  # -- CPUs.\n  cpu: 1\n  memory: 8Gi\n")
    found = docs.documented_values("head:\n  # -- CPUs.\n  cpu: 1\n  # -- Params.\n  params:\n    a: b\n")
    assert found == {"head.cpu": "CPUs.", "head.params": "Params."}


def test_training_options_are_the_clis_config_keys():
    from job import config
    training = schema()["properties"]["training"]["properties"]
    cli_keys = set(config.FIELDS)
    assert set(training) == cli_keys - DERIVED - FLAGS, (
        f"chart lacks {sorted(cli_keys - DERIVED - FLAGS - set(training))}, "
        f"CLI lacks {sorted(set(training) - cli_keys)}")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["training"]
    assert set(defaults) == set(training), "values.yaml lists every training option (null = the CLI's default)"
    assert DERIVED | FLAGS <= cli_keys, "the keys the chart derives must exist in the CLI"
    assert training["model"]["enum"] == list(config.MODELS)
    assert training["dataset"]["enum"] == list(config.DATASETS)
    assert [v for v in training["mixed_precision"]["enum"] if v is not None] == list(config.MIXED_PRECISION)
    assert [v for v in training["lr_decay"]["enum"] if v is not None] == list(config.LR_DECAYS)
    # the seed's range, as the CLI's validation checks it
    for seed, accepted in ((-1, False), (0, True), (2**32 - 1, True), (2**32, False)):
        in_schema = training["seed"]["minimum"] <= seed <= training["seed"]["maximum"]
        try:
            config.Config(seed=seed).validate()
            in_cli = True
        except config.ConfigError:
            in_cli = False
        assert in_schema == in_cli == accepted, seed


def test_run_name_rule_is_the_clis():
    from job.storage.layout import is_run_name
    pattern = re.compile(schema()["properties"]["runName"]["pattern"])
    for name in ("nightly", "run-1.2", "a", "x" * 63, "My_Run", "-run", "run-", "x" * 64, "run/1"):
        assert bool(pattern.match(name)) == is_run_name(name), name


def _chart_docs_module():
    loader = importlib.machinery.SourceFileLoader("chart_docs", str(ROOT / "scripts" / "chart-docs"))
    spec = importlib.util.spec_from_loader("chart_docs", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
