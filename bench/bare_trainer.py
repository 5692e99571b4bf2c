"""The reference for bench/overhead.py: Ray Train starting a run that does nothing.

A bare `TensorflowTrainer` on a Ray cluster this script starts, as a user would write it: the
workers' loop only records when it begins, in a file (TensorFlow is already imported there
by Ray's TensorFlow backend). Prints one JSON line: {"start_to_loop": seconds from process start}.
Usage: python bench/bare_trainer.py WORKERS
"""

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# As alexnet-job does: under `uv run`, Ray would otherwise build a fresh virtualenv for the
# workers, which is not Ray Train's own cost.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.tensorflow import TensorflowTrainer  # noqa: E402


def loop(config):
    with open(os.path.join(config["folder"], "begun", f"{os.getpid()}"), "w") as out:
        out.write(str(time.time()))


def main(workers: int) -> None:
    ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=True, log_to_driver=False)
    folder = tempfile.mkdtemp(prefix="bare-trainer-")
    os.mkdir(os.path.join(folder, "begun"))
    trainer = TensorflowTrainer(loop, train_loop_config={"folder": folder},
                                scaling_config=ScalingConfig(num_workers=workers),
                                run_config=RunConfig(storage_path=folder))
    trainer.fit()
    ray.shutdown()
    # The last worker to begin, as a training step waits for all of them.
    begun = max(float(open(entry.path).read()) for entry in os.scandir(os.path.join(folder, "begun")))
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"start_to_loop": begun - STARTED}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
