"""Benchmark 2c: fixed overhead of `alexnet-job train` on a tiny run.

Seconds from command start to the first training step, and from the last step to process
exit (evaluation, saving, publishing, Ray shutdown). Targets: <= 10 s and <= 5 s.
Alongside, runs alternating, the reference of Ray Train starting a run that does nothing
(bench/bare_trainer.py): the part of the start no code of this project can remove.
Usage: uv run python bench/overhead.py [--rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import sys

from common import MNIST, ROOT, run_train, table


def bare_trainer(workers: int) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bare_trainer.py"), str(workers)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench/bare_trainer.py failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["start_to_loop"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for workers in (1, 2):
        startup, shutdown, bare = [], [], []
        for _ in range(args.rounds):
            metrics, _ = run_train("--data", str(MNIST), "--workers", str(workers), "--epochs", "1",
                                   "--train-limit", "2048", "--test-limit", "1000", "--steps-per-epoch", "4")
            startup.append(metrics["startup_seconds"])
            shutdown.append(metrics["exited_at"] - metrics["training_finished_at"])
            bare.append(bare_trainer(workers))
        start, bare_start = statistics.median(startup), statistics.median(bare)
        rows.append((f"{workers} worker(s)", f"{start:.1f}", f"{statistics.median(shutdown):.1f}",
                     f"{bare_start:.1f}", f"{start / bare_start:.2f}",
                     " / ".join(f"{s:.1f}" for s in startup), " / ".join(f"{s:.1f}" for s in shutdown),
                     " / ".join(f"{s:.1f}" for s in bare)))
    print(f"\n2c) fixed overhead, median of {args.rounds} runs (targets: start <= 10 s, end <= 5 s)")
    print(table(rows, ("run", "start -> first step (s)", "last step -> exit (s)", "bare Ray Train start -> loop (s)",
                       "start / bare", "start, each", "end, each", "bare, each")))


if __name__ == "__main__":
    main()
