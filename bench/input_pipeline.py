"""Can the input pipeline keep a GPU fed? Images/s of one worker's training input, from S3 vs disk.

Makes an ImageNet-like dataset (JPEGs of random smooth content, 300-500 px a side, ~100 KB,
ImageNet's typical size), puts it on a local SeaweedFS server (127.0.0.1, tests/s3server.py)
and on local disk, packs both into TFRecord shards, and times, interleaved round after round
(every other round in reverse order), one worker's real training input (job.data.image_pipeline:
read ahead, decode, resize to 256, random 224 crop, flip, scale) for each source:

    imagefolder-disk   imagefolder-s3   tfrecord-disk   tfrecord-s3

It reports images/s, the CPU seconds each image costs (user + system time of this process,
reader threads included; and the S3 server's own, which on this machine shares the same
cores), images/s per core from those, the ratios S3 / disk (wall clock and per core: of the
medians, and the median of each round's pair), what fetching alone (the pipeline's Reader over
the class folders, no decoding) costs per image from disk and from S3, to set the GET's own cost
beside what the S3 source costs more inside the pipeline, the rate at which the 224 AlexNet
consumes images on this machine (a training step on one CPU worker), and from the CPU cost per
image the cores needed to feed an H100-class GPU at AlexNet speed (--gpu-rate).

With --store-core the S3 server runs on the last core and the reader on the others, as when the
store is on other machines: the server's work then neither slows the reader nor inflates its CPU
time (cache and scheduler effects of sharing cores), and the model rate is still measured on all.

    uv run python bench/input_pipeline.py [--images 1500] [--repeats 10] [--threads 2] [--gpu-rate 20000] [--store-core]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from s3server import S3Server  # noqa: E402
from support import upload_folder  # noqa: E402

CLASSES = 10
BATCH = 32


def make_dataset(root: Path, images: int) -> int:
    """JPEGs of smooth random content, so they compress like photographs, not like flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for n in range(images):
        split = "val" if n % 10 == 9 else "train"
        width, height = (int(v) for v in rng.integers(300, 501, 2))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.integers(-24, 25, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        path = root / split / f"c{(n // 10) % CLASSES}" / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


def input_rate(data: str, layout: str, threads: int, batches: int, server) -> tuple[float, float, float]:
    """(images/s, CPU seconds per image here, and in the S3 server) of one worker's training
    input over `batches` batches."""
    from job.config import Config
    from job.data import InputSettings, image_pipeline, load

    tf = image_pipeline.tf
    config = Config(dataset=layout, data=data, model="alexnet", workers=1, batch_size=BATCH,
                    cpus_per_worker=threads).validate()
    splits = load(config)
    settings = InputSettings(global_batch=BATCH, steps_per_epoch=splits.counts["train"] // BATCH,
                             seed=0, augment=True, input_shape=(224, 224, 3), cpus=threads,
                             on_bad=lambda image, reason: None)
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=1)
    iterator = iter(splits.training(context, settings))
    for _ in range(3):  # warm-up: the first batches pay for tracing and the first fetches
        next(iterator)
    cpu, server_cpu, started = _cpu_seconds(), _server_seconds(server), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds, cpu, server_cpu = (time.perf_counter() - started, _cpu_seconds() - cpu,
                                _server_seconds(server) - server_cpu)
    images = batches * BATCH
    return images / seconds, cpu / images, server_cpu / images


def fetch_cost(data: str) -> float:
    """CPU seconds per image of fetching alone, without decoding: the pipeline's own Reader (its
    thread pool, its readahead) over every train image once."""
    from job.config import Config
    from job.data import load, sources

    splits = load(Config(dataset="imagefolder", data=data, model="alexnet", workers=1).validate())
    reader = sources.Reader(splits.dataset.root, readahead=splits.readahead)
    files = splits.dataset.files["train"]
    try:
        for _ in reader.read_ahead(files[:splits.readahead]):  # warm-up: threads and connections
            pass
        cpu = _cpu_seconds()
        for *_, data_read in reader.read_ahead(files):
            if isinstance(data_read, str):
                raise SystemExit(f"reading {data}: {data_read}")
        return (_cpu_seconds() - cpu) / len(files)
    finally:
        reader.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_seconds(server) -> float:
    import psutil
    process = psutil.Process(server.process.pid)
    return sum(p.cpu_times().user + p.cpu_times().system for p in [process, *process.children(recursive=True)])


def _pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of process `pid`; threads it makes later inherit it."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def model_rate(threads: int, steps: int = 6) -> float:
    """Images/s the 224 AlexNet trains at on `threads` cores of this machine (synthetic input)."""
    from job import models, tfenv
    tf, _ = tfenv.tensorflow()
    model = models.compile_for_training(models.build("alexnet", (224, 224, 3), CLASSES), 0.001)
    images = tf.random.uniform((BATCH, 224, 224, 3))
    labels = tf.random.uniform((BATCH,), maxval=CLASSES, dtype=tf.int32)
    model.train_on_batch(images, labels)  # tracing
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return steps * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1500, help="images in the dataset (a tenth are val)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed rounds of each source (fewer leave the ratios to this machine's noise)")
    parser.add_argument("--batches", type=int, default=20, help=f"batches of {BATCH} timed per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="tf.data threads (cores) for the input")
    parser.add_argument("--gpu-rate", type=float, default=20000,
                        help="images/s an H100-class GPU trains AlexNet at (for the cores-per-GPU estimate)")
    parser.add_argument("--store-core", action="store_true",
                        help="run the S3 server on the last core and the reader on the others")
    args = parser.parse_args()
    all_cpus = os.sched_getaffinity(0)
    if args.store_core and len(all_cpus) < 2:
        parser.error("--store-core needs at least 2 cores")
    store_cpus = {max(all_cpus)} if args.store_core else all_cpus

    from job import tfenv
    tfenv.limit_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-input-"))
    try:
        size = make_dataset(work / "images", args.images)
        with S3Server(workdir=work / "server") as server:
            os.environ.update(server.env)
            _pin(server.process.pid, store_cpus)
            _pin(os.getpid(), all_cpus - store_cpus or all_cpus)
            bucket = server.create_bucket("bench")
            folder_s3 = upload_folder(server.client(), work / "images", bucket, "images")
            from job.data import pack
            shards = max(2, args.images // 250)
            pack.pack(str(work / "images"), str(work / "packed"), shards=shards, seed=0)
            pack.pack(folder_s3, f"s3://{bucket}/packed", shards=shards, seed=0)
            sources = {"imagefolder-disk": (str(work / "images"), "imagefolder"),
                       "imagefolder-s3": (folder_s3, "imagefolder"),
                       "tfrecord-disk": (str(work / "packed"), "tfrecord"),
                       "tfrecord-s3": (f"s3://{bucket}/packed", "tfrecord")}
            rates: dict[str, list[float]] = {name: [] for name in sources}
            costs: dict[str, list[float]] = {name: [] for name in sources}
            server_costs: dict[str, list[float]] = {name: [] for name in sources}
            fetch_costs: dict[str, list[float]] = {"imagefolder-disk": [], "imagefolder-s3": []}
            for round_number in range(args.repeats):
                # Every other round in reverse order, so that a machine slowing down or speeding
                # up during a round does not favour the sources timed first.
                names = list(sources)[::-1 if round_number % 2 else 1]
                for name in names:
                    data, layout = sources[name]
                    rate, cost, server_cost = input_rate(data, layout, args.threads, args.batches, server)
                    rates[name].append(rate)
                    costs[name].append(cost)
                    server_costs[name].append(server_cost)
                    if name in fetch_costs:
                        fetch_costs[name].append(fetch_cost(data))
        _pin(os.getpid(), all_cpus)
        consumed = model_rate(args.threads)

        print(f"\n{args.images} JPEGs, {size / args.images / 1e3:.0f} KB each on average; {args.repeats} rounds of "
              f"{args.batches} batches of {BATCH}; {args.threads} tf.data threads; {os.cpu_count()} CPUs; "
              f"SeaweedFS on 127.0.0.1{' on a core of its own' if args.store_core else ''}\n")
        print(f"{'source':<18}{'images/s':>10}{'min':>8}{'max':>8}{'CPU ms/img':>12}{'server ms/img':>15}"
              f"{'img/s/core':>12}{'incl. server':>14}")
        median = {name: statistics.median(rates[name]) for name in sources}
        cost = {name: statistics.median(costs[name]) for name in sources}
        server_cost = {name: statistics.median(server_costs[name]) for name in sources}
        for name in sources:
            print(f"{name:<18}{median[name]:>10.0f}{min(rates[name]):>8.0f}{max(rates[name]):>8.0f}"
                  f"{cost[name] * 1e3:>12.2f}{server_cost[name] * 1e3:>15.2f}{1 / cost[name]:>12.0f}"
                  f"{1 / (cost[name] + server_cost[name]):>14.0f}")
        for layout in ("imagefolder", "tfrecord"):
            s3, disk = f"{layout}-s3", f"{layout}-disk"
            # Each round times the two sources within seconds of each other: the ratio of a pair
            # leaves out the drift between rounds that the ratio of the medians still carries.
            paired = [d / c for d, c in zip(costs[disk], costs[s3])]
            print(f"{layout}: S3 / disk = {median[s3] / median[disk]:.2f} wall clock, "
                  f"{cost[disk] / cost[s3]:.2f} per core of the reader (target >= 0.9); per core, "
                  f"round by round: median {statistics.median(paired):.2f}, {min(paired):.2f}-{max(paired):.2f}; "
                  f"the server took {server_cost[s3] * 1e3:.2f} CPU ms per image "
                  f"{'on its own core' if args.store_core else f'of the same {len(all_cpus)} cores'}")
        # Where the imagefolder gap comes from: what one GET costs the reader more than a local
        # read when fetching alone, against what the S3 source costs more inside the pipeline.
        fetch = {name: statistics.median(values) for name, values in fetch_costs.items()}
        alone = fetch["imagefolder-s3"] - fetch["imagefolder-disk"]
        inside = cost["imagefolder-s3"] - cost["imagefolder-disk"]
        print(f"fetching alone (the Reader, no decoding), CPU ms per image: disk {fetch['imagefolder-disk'] * 1e3:.3f}, "
              f"S3 {fetch['imagefolder-s3'] * 1e3:.3f}: a GET costs the reader {alone * 1e3:.3f} ms more than a "
              f"local read; inside the pipeline the S3 source costs {inside * 1e3:.3f} ms more per image; at the "
              f"cost alone the ratio per core would be {cost['imagefolder-disk'] / (cost['imagefolder-disk'] + alone):.2f}")
        for name in ("imagefolder-s3", "tfrecord-s3"):
            print(f"AlexNet 224 training consumes {consumed:.1f} images/s on {args.threads} cores here: "
                  f"{name} supplies {median[name] / consumed:.1f}x that")
        for name in ("imagefolder-s3", "tfrecord-s3"):
            print(f"cores to feed {args.gpu_rate:.0f} images/s from {name}: {args.gpu_rate * cost[name]:.0f} "
                  f"({cost[name] * 1e3:.2f} CPU ms per image, the store's CPU not included)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
