"""Benchmark 4: kill scenarios, K times each: survived/total, work lost, time to resume; and a
soak: N runs, each losing a random worker at a uniformly random moment.

Scenarios (2 workers, MNIST subset, 3 epochs):
  worker        SIGKILL one Ray Train worker a few seconds after a checkpoint (epoch ends only)
  worker-steps  the same with --checkpoint-every-steps 20
  driver        SIGKILL the driver's whole process tree, then run the same command again
Work lost = training time between the last registered checkpoint and the kill (and the steps
that time holds at the measured rate); time to resume = kill -> the next attempt's start.

Soak (--trials N): one run without a kill measures the command's length T; then each run
draws a moment uniformly in [0, T) after the command's start and SIGKILLs a random Ray Train
worker then (the first to appear if none is up yet: the group is starting), until N runs have
lost a worker (a run that ends before its moment is listed and replaced). Survived = exit 0,
one complete run published, latest.json on it. Prints survived/killed, time lost per kill
(the run's length - T) and attempts used. Target: N/N survived.
Usage: uv run python bench/faults.py [--repeats 2] [--scenarios worker,worker-steps,driver]
       uv run python bench/faults.py --trials 20
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import MNIST, ROOT, table

RUN = ["--data", str(MNIST), "--workers", "2", "--epochs", "3", "--train-limit", "6000", "--test-limit", "1000"]


def registered(run_dir: Path):
    """(epoch, step) of the newest checkpoint Ray Train has registered, or None."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # caught mid-write
        return None
    return latest and (latest["metrics"]["epoch"], latest["metrics"].get("step", 0))


def one(scenario: str) -> dict:
    output = Path(tempfile.mkdtemp(prefix="alexnet-faults-"))
    args = [sys.executable, "-m", "job.cli", "train", *RUN, "--output", str(output), "--run-name", "faults"]
    if scenario == "worker-steps":
        args += ["--checkpoint-every-steps", "20"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    run_dir = output / "checkpoints" / "faults"
    resumable, last_checkpoint_at = None, None
    while resumable is None:
        resumable, last_checkpoint_at = registered(run_dir), time.time()
        time.sleep(0.1)
    # Kill 5 s after the first checkpoint, tracking any newer one that lands meanwhile: the
    # work lost is the training time since the newest checkpoint registered before the kill.
    until = time.time() + 5
    while time.time() < until:
        seen = registered(run_dir)
        if seen != resumable:
            resumable, last_checkpoint_at = seen, time.time()
        time.sleep(0.1)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    killed_at = time.time()
    if scenario == "driver":
        for member in tree:
            member.kill()
        psutil.wait_procs(tree, timeout=30)
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        next(p for p in tree if p.name().startswith("ray::RayTrainWorker")).kill()
    survived = process.wait(900) == 0 and (output / "runs" / "faults" / "manifest.json").is_file()
    if not survived:
        return {"survived": False}
    metrics = json.loads((output / "runs" / "faults" / "metrics.json").read_text())
    steps_per_second = statistics.median(r["images_per_second"] for r in metrics["history"]) / 64
    lost_seconds = killed_at - last_checkpoint_at
    resumed = metrics["attempts"][1]
    return {"survived": True, "lost_seconds": lost_seconds, "lost_steps": lost_seconds * steps_per_second,
            "resume_seconds": resumed["started_at"] - killed_at, "resumed_from": resumed["resumed_from"],
            "checkpoint_seen": resumable}


SOAK_RUN = ["--data", str(MNIST), "--workers", "2", "--epochs", "2", "--train-limit", "3000", "--test-limit", "500"]


def train_workers(process: subprocess.Popen) -> list:
    found = []
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                if child.name().startswith("ray::RayTrainWorker"):
                    found.append(child)
            except psutil.Error:  # gone meanwhile
                pass
    except psutil.NoSuchProcess:
        pass
    return found


def soak_trial(kill_after: float | None) -> dict:
    """One soak run; kill_after None runs it without a kill."""
    output = Path(tempfile.mkdtemp(prefix="alexnet-soak-"))
    log = open(output / "log.txt", "w")
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "job.cli", "train", *SOAK_RUN, "--output", str(output),
                                "--run-name", "soak"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    killed_at = None
    while process.poll() is None:
        if kill_after is not None and killed_at is None and time.time() - started >= kill_after:
            workers = train_workers(process)
            if workers:
                victim = random.choice(workers)
                try:
                    victim.kill()
                    killed_at = time.time() - started
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.02)
    seconds = time.time() - started
    log.close()
    runs = sorted(p.name for p in (output / "runs").iterdir()) if (output / "runs").is_dir() else []
    latest = output / "latest.json"
    survived = (process.returncode == 0 and runs == ["soak"] and (output / "runs" / "soak" / "manifest.json").is_file()
                and latest.is_file() and json.loads(latest.read_text())["run"] == "soak")
    attempts = len(json.loads((output / "runs" / "soak" / "metrics.json").read_text())["attempts"]) if survived else None
    last_line = (output / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {"kill_after": kill_after, "killed_at": killed_at, "seconds": seconds, "survived": survived,
            "attempts": attempts, "last_line": last_line[0][:300], "output": str(output)}


def soak(trials: int, seed: int) -> None:
    random.seed(seed)
    reference = soak_trial(None)
    if not reference["survived"]:
        sys.exit(f"the run without a kill failed: {reference['last_line']} ({reference['output']})")
    length = reference["seconds"]
    print(f"run without a kill: {length:.1f} s", flush=True)
    results = []
    # A run that ends before its drawn moment (runs vary by a few seconds) loses nothing: it is
    # listed and another is drawn, until `trials` runs have lost a worker.
    while sum(r["killed_at"] is not None for r in results) < trials and len(results) < 2 * trials:
        result = soak_trial(random.uniform(0, length))
        results.append(result)
        outcome = f"survived, {result['attempts']} attempts" if result["survived"] else f"FAILED: {result['last_line']}"
        killed = f"killed at {result['killed_at']:.1f} s" if result["killed_at"] is not None else "ended before it"
        print(f"run {len(results)}: drawn {result['kill_after']:.1f} s, {killed}, {result['seconds']:.1f} s: {outcome}",
              flush=True)
    killed = [r for r in results if r["killed_at"] is not None]
    lost = [r["seconds"] - length for r in killed if r["survived"]]
    print(f"\n4b) soak: runs of {length:.0f} s, each losing a random worker at a uniform moment")
    print(table([(f"{sum(r['survived'] for r in killed)}/{len(killed)}", f"{len(results) - len(killed)}",
                  f"{statistics.median(lost):.1f}" if lost else "-", f"{max(lost):.1f}" if lost else "-",
                  ", ".join(f"{n}x{sum(r['attempts'] == n for r in results)}"
                            for n in sorted({r["attempts"] for r in killed if r["attempts"]})))],
                ("survived the kill", "runs ended before their moment", "time lost per kill, median (s)", "max (s)",
                 "attempts used (count x runs)")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scenarios", default="worker,worker-steps,driver")
    parser.add_argument("--trials", type=int, help="run the soak with this many runs instead of the scenarios")
    parser.add_argument("--seed", type=int, default=0, help="the soak's random moments and victims")
    options = parser.parse_args()
    if options.trials:
        soak(options.trials, options.seed)
        return
    rows = []
    for scenario in options.scenarios.split(","):
        results = [one(scenario) for _ in range(options.repeats)]
        ok = [r for r in results if r["survived"]]

        def median(key):
            return f"{statistics.median(r[key] for r in ok):.1f}" if ok else "-"

        rows.append((scenario, f"{len(ok)}/{len(results)}", median("lost_seconds"), median("lost_steps"),
                     median("resume_seconds"), "; ".join(str(r.get("resumed_from")) for r in ok)))
    print(f"\n4) kill scenarios, {options.repeats} each (2 workers, 84 steps an epoch, 3 epochs)")
    print(table(rows, ("scenario", "survived", "work lost (s)", "work lost (steps)", "kill -> resumed attempt (s)",
                       "resumed from")))


if __name__ == "__main__":
    main()
