"""The README's first command as a user runs it: every line it prints is one we expect, a run in
progress shows in `runs list`, the run keeps a progress record and its logs, and on a terminal
each epoch has a progress bar.

The command is read from the README and run with `uv run`, as written, plus a smaller MNIST
subset (two cores); the full run is bench/accuracy.py's.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest

from support import ROOT, readme_train_command, run_cli

pytestmark = pytest.mark.integration

SMALLER = ["--train-limit", "8192", "--test-limit", "512", "--epochs", "2"]
# Every line the default run prints (stdout); stderr stays empty. Anything else fails the test.
EXPECTED = [
    r"training alexnet-mnist on mnist \(7373 examples\) with 2 workers x 1 replicas, run quiet",
    r"Ray dashboard: http://127\.0\.0\.1:\d+",
    r"\(RayTrainWorker pid=\d+\) precision: (float32|bf16 \(bfloat16 compute, float32 weights\)); auto: this CPU .*",
    r"\(RayTrainWorker pid=\d+\) epoch [12]/2  loss \S+  accuracy \S+  val_loss \S+  val_accuracy \S+  \d+ img/s  \S+s",
    r"\(RayTrainWorker pid=\d+\) run quiet published at \S+/runs/quiet \(\d+ files, [\d.]+ MB\); latest\.json -> quiet: .*",
    r"test accuracy \d\.\d{4}  test loss \d\.\d{4}  \d+ img/s  \d+s",
    r"run written to \S+/runs/quiet",
]


def test_the_readme_command_is_the_default_recipe():
    assert readme_train_command() == ["uv", "run", "alexnet-job", "train", "--data", "../shared/datasets/mnist"]


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory, mnist_dir):
    if not shutil.which("uv"):
        pytest.fail("uv is not on PATH: the README's command needs it (python3 -m pip install uv)")
    output = tmp_path_factory.mktemp("default")
    command = readme_train_command() + SMALLER + ["--output", str(output), "--run-name", "quiet"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # While it trains, `runs list` shows it in progress (from the chief's progress record).
    in_progress, deadline = None, time.time() + 300
    while process.poll() is None and time.time() < deadline:
        listed = run_cli("runs", "list", output)
        row = re.search(r"^quiet +- +- +training epoch [12]/2 step \d+/28 ETA \d+m\d\ds$", listed.stdout, re.M)
        if row:
            in_progress = row[0]
            break
        time.sleep(1)
    stdout, stderr = process.communicate(timeout=900)
    return {"output": output, "returncode": process.returncode, "stdout": stdout, "stderr": stderr,
            "in_progress": in_progress}


def test_the_default_run_prints_only_lines_a_user_needs(quiet_run):
    assert quiet_run["returncode"] == 0, quiet_run["stderr"][-3000:]
    assert quiet_run["stderr"] == ""
    lines = quiet_run["stdout"].splitlines()
    unexpected = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in EXPECTED)]
    assert not unexpected, unexpected
    for pattern in EXPECTED:  # and each says its part, once (the epoch line once an epoch)
        count = sum(bool(re.fullmatch(pattern, line)) for line in lines)
        assert count == (2 if "epoch [12]/2" in pattern else 1), (pattern, quiet_run["stdout"])


def test_runs_list_showed_the_run_in_progress_then_published(quiet_run):
    assert quiet_run["in_progress"], "runs list never showed the run training"
    listed = run_cli("runs", "list", quiet_run["output"], "--output", "json")
    assert [(run["run"], run["complete"]) for run in json.loads(listed.stdout)] == [("quiet", True)]
    record = json.loads((quiet_run["output"] / "checkpoints" / "quiet" / "progress.json").read_text())
    assert (record["state"], record["epoch"], record["step"], record["steps_per_epoch"]) == ("published", 2, 28, 28)
    assert record["images_per_second"] > 0 and record["elapsed_seconds"] > 0


def test_the_driver_and_each_worker_log_are_saved_with_the_run(quiet_run):
    logs = quiet_run["output"] / "checkpoints" / "quiet" / "logs"
    (driver,) = logs.glob("driver-*.log")
    assert driver.read_text() == quiet_run["stdout"]  # what the command printed, nothing else
    # Named worker-<start>-rank-<rank>: the two ranks may start in different seconds, either first.
    workers = sorted(logs.glob("worker-*-rank-*.log"), key=lambda w: int(w.stem.rsplit("-", 1)[1]))
    assert [w.read_text().splitlines()[0].split(", pid")[0] for w in workers] == [
        "rank 0 of 2 on node 127.0.0.1", "rank 1 of 2 on node 127.0.0.1"]
    assert "epoch 2/2  loss" in workers[0].read_text() and "epoch 2/2" not in workers[1].read_text()


def test_on_a_terminal_each_epoch_has_a_progress_bar(tmp_path, mnist_dir):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    command = [sys.executable, "-m", "job.cli", "train", "--data", str(mnist_dir), *SMALLER, "--output", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace")
    # tqdm's bar, drawn in place by the driver: "epoch 1/2 loss 0.4321:  57%|█████▋    | 16/28 [00:03<00:02, 5.1step/s]"
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2 loss \d\.\d{{4}}: +\d+%\|.*\| *[\d.]+/28\.0 \[[\d:]+<[\d:?]+, +[\d.?]+step/s\]",
                         text), text[-3000:]
