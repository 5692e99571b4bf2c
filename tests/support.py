"""Paths and helpers shared by every test layer (imported as `support`)."""

import concurrent.futures
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MNIST = SHARED / "datasets" / "mnist"
TUTORIAL = SHARED / "reference" / "keras-alexnet-tutorial.md"
# The tutorial's recipe (batch 64, Adam at 0.001, float32): what the training tests' small MNIST
# subsets, step counts and accuracy bars were written for. The defaults are the full-MNIST recipe
# (batch 256, warm-up and cosine, bf16 where native), tested as the README runs it by
# tests/integration/test_default_run.py.
TUTORIAL_RECIPE = ["--batch-size", "64", "--learning-rate", "0.001", "--warmup-epochs", "0", "--lr-decay", "none"]
FLOAT32 = ["--mixed-precision", "off"]


def readme_train_command() -> list[str]:
    """The README set-up's first command, as it is written there (tests/integration/test_default_run.py
    runs it, bench/accuracy.py measures it)."""
    import shlex
    setup = (ROOT / "README.md").read_text().split("## Set-up: two commands", 1)[1]
    return shlex.split(next(line for line in setup.splitlines() if line.startswith("uv run alexnet-job train")),
                       comments=True)


def run_cli(*args, env=None, cwd=None, timeout=900):
    """Run the real `alexnet-job` command line in a fresh process."""
    return subprocess.run([sys.executable, "-m", "job.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)


def kill_env(moment, rank, marker, node=False):
    """Environment that arms tests/killpoints: the worker of `rank` kills itself (and with `node`
    its raylet) the first time the run reaches `moment`, leaving the file `marker`."""
    killpoints = ROOT / "tests" / "killpoints"
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(killpoints), os.environ.get("PYTHONPATH")])),
            "ALEXNET_JOB_TEST_KILL": moment, "ALEXNET_JOB_TEST_KILL_RANK": str(rank),
            "ALEXNET_JOB_TEST_KILL_MARKER": str(marker), "ALEXNET_JOB_TEST_KILL_NODE": "1" if node else "0"}


def error_line(result, *fragments):
    """The one line a user mistake prints through the CLI (exit 2, no traceback); checks that it
    holds every fragment and returns it."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet-job: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_digit_pngs(mnist_dir, folder, count=10):
    """The first `count` MNIST test digits as PNG files; returns (paths, true labels)."""
    from job import tfenv
    from job.data import mnist
    tf, _ = tfenv.tensorflow()
    _, (images, labels), _, _ = mnist.load(str(mnist_dir))
    paths = []
    for i in range(count):
        path = Path(folder) / f"digit-{i}.png"
        path.write_bytes(tf.io.encode_png(images[i]).numpy())
        paths.append(path)
    return paths, [int(y) for y in labels[:count]]


def layer_rows(model):
    """(layer type, output shape, parameters) of each layer, as Keras's summary lists them."""
    return [(layer.__class__.__name__, tuple(layer.output_shape[1:]), layer.count_params()) for layer in model.layers]


def make_run_folder(root, seed=0, big=300_000):
    """A run folder shaped like the trainer's: opaque files, some nested (storage tests)."""
    files = {
        "model.keras": os.urandom(big),
        "metrics.json": f'{{"seed": {seed}}}'.encode(),
        "config.yaml": f"seed: {seed}\n".encode(),
        "training_curves.png": os.urandom(2000),
        "saved_model/1/saved_model.pb": os.urandom(5000),
        "saved_model/1/variables/variables.data-00000-of-00001": os.urandom(40000),
        "tensorboard/train/events.out.tfevents.1": os.urandom(300),
    }
    root = Path(root)
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


@dataclass
class ImageFolder:
    """What write_image_folder made: files[split] holds (path relative to root, label), sorted,
    as job.data.sources.list_imagefolder lists them."""

    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(files) for split, files in self.files.items()}


def write_drawn_mnist(folder, train=1200, test=400, seed=0):
    """MNIST's four IDX .gz files in `folder`, of digits drawn with PIL's built-in font (each its
    own size, place and stroke; the labels cycle 0-9): what the unit tier loads, so it needs
    nothing outside the repository (../shared's real MNIST is not to be copied into it)."""
    import gzip

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = np.zeros((count, 28, 28), np.uint8)
        for n, label in enumerate(labels):
            size = int(rng.integers(14, 23))
            font = ImageFont.load_default(size=size)
            canvas = Image.new("L", (28, 28))
            ImageDraw.Draw(canvas).text((int(rng.integers(4, 28 - size * 0.6)), int(rng.integers(-2, 28 - size))),
                                        str(label), fill=255, font=font, stroke_width=int(rng.integers(0, 2)),
                                        stroke_fill=255)
            images[n] = np.asarray(canvas)
        header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (count, 28, 28))
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes(), mtime=0))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress((2049).to_bytes(4, "big") + count.to_bytes(4, "big") + labels.tobytes(), mtime=0))
    return folder


IMAGE_FORMATS = ((".jpg", "JPEG"), (".png", "PNG"), (".jpeg", "JPEG"), (".png", "PNG"))  # half JPEG, half PNG


@functools.lru_cache(maxsize=2)
def _mnist_digits(mnist_dir: str):
    """MNIST test images (N, 28, 28) and labels."""
    from job.data import mnist
    _, (images, labels), _, _ = mnist.load(mnist_dir)
    return images[..., 0], labels


def write_image_folder(mnist_dir, root, per_class=20, classes=10, val_per_class=5, seed=0, sizes=(40, 300)):
    """An imagefolder dataset: root/{train,val}/<digit>/<digit>-<n>.{jpg,jpeg,png}, MNIST test digits
    drawn in a random colour on a random background (every channel apart by 96 or more), each
    image its own width and height in `sizes`, JPEG (.jpg and .jpeg) and PNG alternating.
    Classes are the digits 0 .. classes-1; no MNIST image is used twice."""
    import numpy as np
    from PIL import Image

    images, labels = _mnist_digits(str(mnist_dir))
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = [str(digit) for digit in range(classes)]
    files = {"train": [], "val": []}
    for label, name in enumerate(names):
        chosen = rng.permutation(np.flatnonzero(labels == label))[:per_class + val_per_class]
        for n, index in enumerate(chosen):
            split = "train" if n < per_class else "val"
            extension, kind = IMAGE_FORMATS[n % len(IMAGE_FORMATS)]
            size = tuple(int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            foreground = rng.integers(0, 256, 3)
            background = (foreground + rng.integers(96, 161, 3)) % 256
            mask = Image.fromarray(images[index]).resize(size, Image.BILINEAR)
            image = Image.composite(Image.new("RGB", size, tuple(map(int, foreground))),
                                    Image.new("RGB", size, tuple(map(int, background))), mask)
            relative = f"{split}/{name}/{name}-{n:04d}{extension}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / relative, kind)
            files[split].append((relative, label))
    return ImageFolder(root, names, {split: sorted(items) for split, items in files.items()})


def upload_folder(client, folder, bucket, prefix=""):
    """Every file under a local folder to s3://bucket/prefix/<relative path> (a boto3 client, e.g.
    the test server's `client()`); returns that URI."""
    folder = Path(folder)
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    key = (lambda path: f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}".lstrip("/"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda path: client.put_object(Bucket=bucket, Key=key(path), Body=path.read_bytes()), paths))
    return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
