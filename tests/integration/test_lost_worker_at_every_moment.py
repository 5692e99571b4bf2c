"""A worker lost at any moment of a run is survived within --max-failures.

Each test arms one kill point (tests/killpoints: a worker kills its own process the first time it
reaches that moment, as the OOM killer or a lost node would) in a real 2-worker run, and checks
what the user sees: the command ends by itself with exit 0, exactly one complete run published,
and metrics.json lists both attempts, the first with why it ended.
"""

import json
import os
import subprocess
import sys

import pytest

from support import FLOAT32, ROOT, TUTORIAL_RECIPE, kill_env, run_cli

pytestmark = pytest.mark.integration
# (moment, rank): the chief's own moments kill rank 0, the others the worker of rank 1.
MOMENTS = [
    ("group-start", 1),  # Ray 2.60 ended the run here ("The actor is dead ...") with failures left
    ("tensorflow-import", 1),
    ("before-first-all-reduce", 1),
    ("mid-epoch", 1),
    ("mid-epoch", 0),
    ("validation", 1),
    ("checkpoint-upload", 0),
    ("final-evaluation", 0),
    ("export", 0),
    ("publish", 0),
]


def kill_marker(output, moment, rank):
    return output.parent / f"killed-{moment}-{rank}"


def run_killed_at(moment, rank, mnist_dir, output, *extra, env=None):
    marker = kill_marker(output, moment, rank)
    env = env if env is not None else kill_env(moment, rank, marker)
    result = run_cli("train", "--data", mnist_dir, "--workers", "2", "--epochs", "1", "--train-limit", "1600",
                     "--test-limit", "300", *TUTORIAL_RECIPE, *FLOAT32,
                     "--output", output, "--run-name", "r", *extra, env=env)
    return result, marker


def check_survived(result, marker, moment, output, lost=("died",)):
    assert marker.exists(), f"the kill point {moment} was never reached:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # No line of the command's own says it failed (Ray 2.60 ended such runs "training failed: The
    # actor is dead ..."). Ray's own report of the lost worker may well be stderr's last line now
    # that its INFO lines after it are not printed.
    assert not [line for line in result.stderr.splitlines() if line.startswith("alexnet-job:")], result.stderr[-3000:]
    runs = sorted(p.name for p in (output / "runs").iterdir())
    assert runs == ["r"], runs  # one run, nothing half-written beside it
    assert json.loads((output / "latest.json").read_text())["run"] == "r"
    manifest = json.loads((output / "runs" / "r" / "manifest.json").read_text())
    assert {f["key"] for f in manifest["files"]} >= {"model.keras", "metrics.json", "config.yaml"}
    attempts = json.loads((output / "runs" / "r" / "metrics.json").read_text())["attempts"]
    assert len(attempts) == 2, attempts
    assert attempts[0]["retried"] is True and any(word in attempts[0]["error"].lower() for word in lost), attempts[0]
    assert "error" not in attempts[1], attempts[1]


@pytest.mark.parametrize(("moment", "rank"), MOMENTS, ids=[f"{m}-rank{r}" for m, r in MOMENTS])
def test_a_worker_killed_at_this_moment_is_survived(moment, rank, mnist_dir, tmp_path):
    output = tmp_path / "out"
    result, marker = run_killed_at(moment, rank, mnist_dir, output)
    check_survived(result, marker, moment, output)


@pytest.mark.parametrize("moment", ["group-start", "mid-epoch"])
def test_a_node_lost_at_this_moment_is_survived(moment, mnist_dir, tmp_path):
    """A multi-node cluster (--address): a head and three 1-CPU nodes on loopback, each a real
    raylet; the raylet of the node running rank 1 is SIGKILLed, its workers go with it."""
    output = tmp_path / "out"
    cluster = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "raycluster.py"), "3"],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **kill_env(moment, 1, kill_marker(output, moment, 1), node=True)})
    try:
        address = json.loads(cluster.stdout.readline())["address"]
        result, marker = run_killed_at(moment, 1, mnist_dir, output, "--address", address, env={})
        # Ray names a worker lost with its node dead, or unavailable if asked before it knows;
        # or the survivor's all-reduce fails first: UnavailableError in CollectiveReduceV2.
        check_survived(result, marker, moment, output, lost=("died", "unavailable"))
    finally:
        cluster.stdin.write("shutdown\n")
        cluster.stdin.flush()
        cluster.wait(120)


def test_a_spent_failure_budget_is_one_line_and_the_checkpoint_is_kept(mnist_dir, tmp_path):
    output = tmp_path / "out"
    result, marker = run_killed_at("validation", 1, mnist_dir, output, "--max-failures", "0")
    assert marker.exists() and result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("alexnet-job: training failed 1 time, more than --max-failures 0 allows; the last time: "
                           "rank 1: "), last
    assert last.endswith("; no checkpoint was reached"), last  # the first validation comes before the first checkpoint
    assert not (output / "runs").exists()
