"""What publishing a model costs: job.storage.publish() vs one plain boto3 upload_file of the same bytes.

Starts a local SeaweedFS server (127.0.0.1, tests/s3server.py), builds a run folder
of random bytes shaped like a trained AlexNet run (~100 MB: Keras file, SavedModel variables,
small files), and times, interleaved, repeat after repeat:

    upload_file     boto3's upload_file of one file holding all of the run's bytes (the baseline)
    publish         publish() to s3:// (hash, multipart upload, read-back verification, manifest,
                    conditional latest.json)
    publish-no-rb   the same without the read-back verification (to show what it costs)
    publish-local   publish() to a local folder (copy, verify, rename)

    uv run python bench/publish.py [--size-mb 100] [--repeats 3]

Ratios are what to compare: every variant runs side by side on the same machine and server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from s3server import S3Server  # noqa: E402

from job import storage  # noqa: E402
from job.storage.stores import S3Store  # noqa: E402


def make_run(root: Path, total_mb: float) -> int:
    """A run folder of random bytes; the two weight files carry almost all of it."""
    big = int(total_mb * 1e6 / 2)
    sizes = {
        "model.keras": big,
        "saved_model/1/variables/variables.data-00000-of-00001": big,
        "saved_model/1/variables/variables.index": 4_000,
        "saved_model/1/saved_model.pb": 400_000,
        "saved_model/1/fingerprint.pb": 60,
        "metrics.json": 2_000,
        "config.yaml": 1_500,
        "training_curves.png": 60_000,
        "tensorboard/train/events.out.tfevents.1.host": 150_000,
        "tensorboard/validation/events.out.tfevents.1.host": 40_000,
    }
    for key, size in sizes.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        with open(root / key, "wb") as f:
            for offset in range(0, size, 1 << 24):
                f.write(os.urandom(min(1 << 24, size - offset)))
    return sum(sizes.values())


def concatenate(root: Path, target: Path) -> None:
    with open(target, "wb") as out:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the run folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        run_dir, blob = work / "run", work / "model.bin"
        total = make_run(run_dir, args.size_mb)
        concatenate(run_dir, blob)
        with S3Server(workdir=work / "server") as server:
            os.environ.update(server.env)
            bucket = server.create_bucket("bench")
            client = server.client()
            real_verify = S3Store.verify
            counter = iter(range(10**6))

            def upload_file() -> None:
                client.upload_file(str(blob), bucket, f"plain/{next(counter)}.bin")

            def publish() -> None:
                storage.publish(run_dir, f"s3://{bucket}/exp", f"run-{next(counter)}", manifest_extra={"metrics": {}})

            def publish_no_readback() -> None:
                S3Store.verify = lambda self, key, f: None
                try:
                    publish()
                finally:
                    S3Store.verify = real_verify

            def publish_local() -> None:
                storage.publish(run_dir, str(work / "local-out"), f"run-{next(counter)}", manifest_extra={"metrics": {}})

            variants = {"upload_file": upload_file, "publish": publish, "publish-no-rb": publish_no_readback,
                        "publish-local": publish_local}
            times: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.repeats + 1):  # round 0 warms caches and connections
                for name, fn in variants.items():
                    started = time.perf_counter()
                    fn()
                    if round_:
                        times[name].append(time.perf_counter() - started)

        base = statistics.median(times["upload_file"])
        print(f"\n{total / 1e6:.1f} MB run folder ({len(list(run_dir.rglob('*.*')))} files), "
              f"{args.repeats} rounds, SeaweedFS on 127.0.0.1, {os.cpu_count()} CPUs\n")
        print(f"{'variant':<16}{'median s':>10}{'min s':>8}{'max s':>8}{'MB/s':>8}{'x upload_file':>15}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<16}{median:>10.2f}{min(values):>8.2f}{max(values):>8.2f}{total / 1e6 / median:>8.0f}"
                  f"{median / base:>15.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
