"""Benchmarks 2a and 2d: training throughput and achieved FLOP/s, side by side in one run.

a) images/s of `alexnet-job train` with one worker (all the machine's CPUs) vs a plain
   single-process tf_keras `model.fit` of the same model, data, batch and augmentation
   (bench/plain_fit.py). Target ratio >= 0.98.
d) alexnet-job's achieved training FLOP/s (130 MFLOP per MNIST image, counted from the layers)
   as a fraction of a measured fp32 matmul FLOP/s on the same machine. Target >= 0.75.
   Measured twice, at the 2b recipe's global batch (--flops-batch): in float32, and with
   `--mixed-precision bf16`, which CPUs with AVX512_BF16 or AMX run on bf16 dot-product
   instructions; that run is also set against a bf16 matmul, the yardstick of its own dtype.

Runs alternate (plain, job, plain, job) so drift on a shared machine hits both alike.
Usage: uv run python bench/throughput.py [--train-limit 20000] [--epochs 3] [--batch 64] [--rounds 2]
                                         [--flops-batch 256]
"""

import argparse
import json
import os
import subprocess
import sys

from common import MNIST, ROOT, run_train, table, training_flops_per_example

CPUS = os.cpu_count() or 1


def plain_fit(train_limit: int, epochs: int, batch: int) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plain_fit.py"), str(train_limit), str(epochs),
                          str(batch)], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "bench")})
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"]


def matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 30) -> float:
    """matmul FLOP/s of `dtype` with TensorFlow on all CPUs, in a fresh process."""
    code = f"""
import time
from job import tfenv
tf, _ = tfenv.tensorflow()
a = tf.cast(tf.random.normal(({size}, {size})), tf.{dtype}); b = tf.cast(tf.random.normal(({size}, {size})), tf.{dtype})
tf.linalg.matmul(a, b).numpy()
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    for _ in range({repeats}):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    best = max(best, {repeats} * 2 * {size} ** 3 / (time.perf_counter() - start))
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flops-batch", type=int, default=256)
    args = parser.parse_args()

    def job_rate(batch: int, precision: str = "off") -> float:
        metrics, _ = run_train("--data", str(MNIST), "--workers", "1", "--cpus-per-worker", str(CPUS),
                               "--epochs", str(args.epochs), "--batch-size", str(batch),
                               "--train-limit", str(args.train_limit), "--validation-fraction", "0",
                               "--test-limit", "1000", "--mixed-precision", precision)
        return metrics["images_per_second"]

    plain, job, fp32, bf16 = [], [], [], []
    for _ in range(args.rounds):
        plain.append(plain_fit(args.train_limit, args.epochs, args.batch))
        job.append(job_rate(args.batch))
        fp32.append(job_rate(args.flops_batch))
        bf16.append(job_rate(args.flops_batch, "bf16"))
    matmul = {dtype: matmul_flops(dtype) for dtype in ("float32", "bfloat16")}

    from job import models
    flops_per_image = training_flops_per_example(models.build("alexnet-mnist"))
    best_plain, best_job = max(plain), max(job)
    print(f"\n2a) training throughput, alexnet-mnist, batch {args.batch}, {args.train_limit} images x "
          f"{args.epochs} epochs (first epoch excluded), {CPUS} CPUs, {args.rounds} alternating rounds")
    print(table([("plain tf_keras model.fit", " / ".join(f"{r:.0f}" for r in plain), f"{best_plain:.0f}"),
                 ("alexnet-job train, 1 worker", " / ".join(f"{r:.0f}" for r in job), f"{best_job:.0f}")],
                ("run", "images/s per round", "best")))
    print(f"ratio alexnet-job / plain fit (best of each): {best_job / best_plain:.3f}   (target >= 0.98)")

    print(f"\n2d) achieved FLOP/s ({flops_per_image / 1e6:.1f} MFLOP per training image), alexnet-job, "
          f"1 worker, batch {args.flops_batch}, best of {args.rounds} rounds")
    rows = [(f"matmul 2048x2048 {dtype} (TensorFlow, all CPUs)", "", f"{flops / 1e9:.1f}", "", "")
            for dtype, flops in matmul.items()]
    for name, rates, own in (("training, float32", fp32, matmul["float32"]),
                             ("training, --mixed-precision bf16", bf16, matmul["bfloat16"])):
        achieved = max(rates) * flops_per_image
        rows.append((name, " / ".join(f"{r:.0f}" for r in rates), f"{achieved / 1e9:.1f}",
                     f"{achieved / matmul['float32']:.3f}", f"{achieved / own:.3f}"))
    print(table(rows, ("measure", "images/s per round", "GFLOP/s", "/ fp32 matmul", "/ own dtype's matmul")))
    print("target: training FLOP/s / fp32 matmul >= 0.75")


if __name__ == "__main__":
    main()
