"""The command line: help everywhere, and one clear line (exit 2) for every user mistake."""

import gzip
import shutil

import pytest

from support import error_line, run_cli


def every_command() -> list[list[str]]:
    """Every command and sub-command the parser knows, found by walking it (so none is missed)."""
    import argparse

    from job.cli import build_parser

    def walk(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
    return list(walk(build_parser(), []))


def test_the_walk_finds_every_command():
    found = {" ".join(command) for command in every_command()}
    assert {"train", "submit", "status", "logs", "runs list", "runs download", "dataset pack", "prune"} <= found
    assert len(found) >= 17, sorted(found)


@pytest.mark.parametrize("command", every_command(), ids=lambda command: " ".join(command) or "alexnet-job")
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and result.stdout.startswith(" ".join(["usage: alexnet-job", *command])), result.stdout
    assert result.stderr == ""


def test_train_help_lists_the_required_options():
    text = run_cli("train", "--help").stdout
    for flag in ("--config", "--print-config", "--model", "--dataset", "--data", "--workers", "--gpus-per-worker",
                 "--epochs", "--batch-size", "--learning-rate", "--train-limit", "--output", "--run-name", "--address"):
        assert flag in text


def test_print_config_merges_file_and_flags(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 9\nbatch_size: 128\n")
    result = run_cli("train", "--config", path, "--batch-size", "256", "--print-config")
    assert result.returncode == 0
    assert "epochs: 9\n" in result.stdout and "batch_size: 256\n" in result.stdout


@pytest.fixture
def corrupt_mnist(tmp_path, mnist_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(mnist_dir, folder)
    (folder / "train-images-idx3-ubyte.gz").chmod(0o644)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 64))
    return folder


def bad_inputs(tmp_path, mnist_dir, corrupt):
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("epochz: 3\n")
    return {
        "unknown model": (["--model", "resnet"], "unknown model 'resnet'"),
        "unknown dataset": (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        "zero workers": (["--workers", "0"], "workers must be a positive number, not 0"),
        "negative epochs": (["--epochs", "-2"], "epochs must be a positive number, not -2"),
        "zero batch": (["--batch-size", "0"], "batch_size must be a positive number, not 0"),
        "indivisible batch": (["--batch-size", "99"], "batch_size 99 does not divide across 2 replicas"),
        "missing data": (["--data", tmp_path / "nowhere"], "MNIST file not found"),
        "corrupt data": (["--data", corrupt], "is truncated or corrupt"),
        "unreadable config": (["--config", tmp_path / "absent.yaml"], "cannot read config file"),
        "unknown config key": (["--config", unknown_key], "unknown key 'epochz'"),
        "malformed output URI": (["--output", "s3://"], "s3://"),
    }


@pytest.mark.parametrize("case", ["unknown model", "unknown dataset", "zero workers", "negative epochs", "zero batch",
                                  "indivisible batch", "missing data", "corrupt data", "unreadable config",
                                  "unknown config key", "malformed output URI"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, mnist_dir, corrupt_mnist):
    args, message = bad_inputs(tmp_path, mnist_dir, corrupt_mnist)[case]
    output = tmp_path / "out"
    defaults = ["--data", mnist_dir, "--output", output]
    result = run_cli("train", *defaults, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet-job: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists() or not any(output.rglob("*"))  # nothing written, and Ray never started


def test_summary_prints_the_tutorial_total():
    result = run_cli("summary", "alexnet")
    assert result.returncode == 0
    assert "Total params: 25678184" in result.stdout and "conv2d" in result.stdout


def test_summary_of_an_unknown_model_is_one_line():
    result = run_cli("summary", "lenet")
    assert result.returncode == 2 and result.stderr.strip().startswith("alexnet-job: error: unknown model 'lenet'")


def test_predict_without_a_model_is_one_line(tmp_path):
    result = run_cli("predict", tmp_path, tmp_path / "x.png")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"alexnet-job: error: '{tmp_path}' is not a run: "
                                     "expected <output>/runs/<run-name> or <output>/latest")


@pytest.mark.parametrize("flag", ["-f", "--manifest"])
def test_a_missing_file_of_the_users_is_named_before_a_missing_cluster(flag, tmp_path):
    missing = tmp_path / "missing.yaml"
    line = error_line(run_cli("submit", flag, missing, env={"KUBECONFIG": str(tmp_path / "no-kubeconfig")}, timeout=60))
    assert str(missing) in line and "Kubernetes" not in line, line


def test_submit_without_helm_says_how_to_get_it_before_looking_for_a_cluster(tmp_path):
    """The product never fetches helm itself (that is the tests' scripts/fetch-tools)."""
    line = error_line(run_cli("submit", env={"PATH": str(tmp_path), "KUBECONFIG": str(tmp_path / "no-kubeconfig")},
                              timeout=60))
    assert line == ("alexnet-job: error: helm is not installed: `alexnet-job submit` renders the chart with helm 3; "
                    "install it (https://helm.sh/docs/intro/install/, e.g. `brew install helm`) or put it on PATH")
