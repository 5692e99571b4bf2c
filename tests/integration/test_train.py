"""A real 2-worker Ray Train run of the MNIST AlexNet, and what it leaves behind."""

import contextlib
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from support import FLOAT32, ROOT, TUTORIAL_RECIPE, run_cli, write_digit_pngs
from netwatch import LoopbackWatch
from job import config as configuration
from job.data import mnist

pytestmark = pytest.mark.integration

TRAIN_LIMIT, TEST_LIMIT, EPOCHS = 6000, 2000, 2
# TensorFlow's collective-ops gRPC server (MultiWorkerMirroredStrategy) binds the wildcard
# address ("0.0.0.0" or "::"), a literal in its grpc_server_lib with no setting to change it. It
# runs inside the Ray Train worker processes; every other server and every connection must be
# loopback.
TF_COLLECTIVE_SERVERS = ("ray::RayTrainWorker",)


@contextlib.contextmanager
def listener_on(port: int):
    """A loopback listener on `port` for the duration, as another program's would be."""
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", port))
            holder.listen()
        except OSError:  # something on this machine holds it already: the same conflict
            pass
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """Train once through the real CLI: 2 workers, 2 epochs, 5,400 training images."""
    output = tmp_path_factory.mktemp("output")
    command = [sys.executable, "-m", "job.cli", "train", "--data", str(mnist_dir), "--workers", "2",
               "--epochs", str(EPOCHS), "--train-limit", str(TRAIN_LIMIT), "--test-limit", str(TEST_LIMIT),
               *TUTORIAL_RECIPE, *FLOAT32, "--output", str(output), "--run-name", "it-mnist"]
    # Ray's default dashboard port held, as by another run on the machine: this one moves on.
    with listener_on(8265):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with LoopbackWatch(process.pid, wildcard_listeners_allowed=TF_COLLECTIVE_SERVERS) as watch:
            stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    run_dir = output / "runs" / "it-mnist"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"output": output, "run_dir": run_dir, "metrics": metrics, "stdout": stdout, "stderr": stderr,
            "watch": watch}


def test_two_workers_learn_mnist_well_above_chance(trained):
    metrics = trained["metrics"]
    assert metrics["workers"] == 2 and metrics["replicas"] == 2 and metrics["per_replica_batch"] == 32
    # Chance is 0.10; this run reaches ~0.96. 0.90 leaves margin for seeds and thread timing.
    assert metrics["test_accuracy"] > 0.90, metrics["test_accuracy"]
    assert metrics["data"]["counts"] == {"train": 5400, "validation": 600, "test": TEST_LIMIT}
    assert metrics["steps_per_epoch"] == 5400 // 64


def test_history_has_every_epochs_metrics_and_throughput(trained):
    history = trained["metrics"]["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    for record in history:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "seconds"} <= set(record)
        assert record["images_per_second"] > 0
    assert history[1]["loss"] < history[0]["loss"]
    assert trained["metrics"]["images_per_second"] > 0 and trained["metrics"]["wall_time_seconds"] > 0


def test_progress_is_printed_once_per_epoch(trained):
    lines = [line for line in trained["stdout"].splitlines() if "epoch 1/2" in line or "epoch 2/2" in line]
    assert len(lines) == 2, trained["stdout"][-2000:]
    assert "val_accuracy" in lines[0] and "img/s" in lines[0]
    assert "test accuracy" in trained["stdout"] and str(trained["run_dir"]) in trained["stdout"]
    # Ray Train's own per-report echoes of the same figures are not printed as well, nor the
    # error line of a preemption watcher, which a one-node cluster of the command's own never needs.
    for noise in ("Reporting training result", "Checkpoint successfully created", "PreemptionWatcher"):
        assert noise not in trained["stdout"] + trained["stderr"], noise


def test_keras_file_loads_in_one_call_and_reproduces_the_test_accuracy(trained, mnist_dir):
    from job import tfenv
    tf, keras = tfenv.tensorflow()
    model = keras.models.load_model(trained["run_dir"] / "model.keras")
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, (test_x, test_y), _, _ = mnist.load(str(mnist_dir))
    _, accuracy = model.evaluate(test_x[:TEST_LIMIT] / 255.0, test_y[:TEST_LIMIT], verbose=0)
    assert accuracy == pytest.approx(trained["metrics"]["test_accuracy"], abs=1e-6)


def test_saved_model_is_in_serving_layout_and_agrees_with_the_keras_file(trained, mnist_dir):
    from job import tfenv
    tf, keras = tfenv.tensorflow()
    saved = tf.saved_model.load(str(trained["run_dir"] / "saved_model" / "1"))
    serve = saved.signatures["serving_default"]
    # The contract TF Serving clients code against: `images` in, `probabilities` out.
    assert list(serve.structured_input_signature[1]) == ["images"]
    assert list(serve.structured_outputs) == ["probabilities"]
    _, (test_x, _), _, _ = mnist.load(str(mnist_dir))
    batch = (test_x[:16] / 255.0).astype(np.float32)
    served = serve(images=tf.constant(batch))["probabilities"].numpy()
    keras_model = keras.models.load_model(trained["run_dir"] / "model.keras")
    assert np.allclose(served, keras_model.predict(batch, verbose=0), atol=1e-5)


def test_run_folder_has_curves_and_the_resolved_config(trained):
    run_dir = trained["run_dir"]
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = configuration.Config(**yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.run_name == "it-mnist" and saved.workers == 2 and saved.train_limit == TRAIN_LIMIT
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    packages = trained["metrics"]["packages"]
    assert packages["tensorflow"].startswith("2.21") and packages["ray"].startswith("2.60")


def test_every_process_of_the_run_stayed_on_loopback(trained):
    watch = trained["watch"]
    assert watch.sockets_seen > 0  # the watch did see the run's sockets
    assert not watch.violations, sorted(watch.violations)
    # The one known exception: one TensorFlow collective server per training worker, at most.
    assert len(watch.wildcard_listeners) <= 2, sorted(watch.wildcard_listeners.values())


def test_predict_names_the_digits(trained, mnist_dir, tmp_path):
    from job import tfenv
    tf, keras = tfenv.tensorflow()
    _, (test_x, test_y), _, _ = mnist.load(str(mnist_dir))
    paths, _ = write_digit_pngs(mnist_dir, tmp_path)
    result = run_cli("predict", trained["run_dir"], *paths, "--output", "json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    top = [p["top"][0]["index"] for p in predictions]
    # The CLI's image path (PNG decode, resize, scale) gives what the model gives on the arrays ...
    model = keras.models.load_model(trained["run_dir"] / "model.keras")
    assert top == list(model.predict(test_x[:10] / 255.0, verbose=0).argmax(axis=1))
    # ... and those are the right digits (test_y[:10] = 7 2 1 0 4 1 4 9 5 9).
    assert sum(t == y for t, y in zip(top, test_y[:10])) >= 9
    assert all(len(p["top"]) == 3 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predictions)


def test_predict_resizes_colour_jpegs_for_the_model(trained, mnist_dir, tmp_path):
    from job import tfenv
    tf, _ = tfenv.tensorflow()
    _, (test_x, test_y), _, _ = mnist.load(str(mnist_dir))
    big = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(test_x[0])), (112, 112)).numpy().astype(np.uint8)
    path = tmp_path / "seven.jpg"
    path.write_bytes(tf.io.encode_jpeg(big).numpy())
    result = run_cli("predict", trained["run_dir"], path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: {test_y[0]} (")


def test_predict_rejects_what_is_not_an_image(trained, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    result = run_cli("predict", trained["run_dir"], bogus)
    assert result.returncode == 2
    assert result.stderr.strip() == f"alexnet-job: error: cannot decode {bogus}; expected a PNG or JPEG image"


def test_a_finished_run_is_not_trained_again(trained, mnist_dir):
    before = (trained["run_dir"] / "metrics.json").stat().st_mtime_ns
    started = time.time()
    result = run_cli("train", "--data", mnist_dir, "--output", trained["output"], "--run-name", "it-mnist")
    assert result.returncode == 0, result.stderr
    assert "was already published" in result.stdout and "not training it again" in result.stdout
    assert time.time() - started < 30
    assert (trained["run_dir"] / "metrics.json").stat().st_mtime_ns == before
