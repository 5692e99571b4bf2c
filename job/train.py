"""Data-parallel training with Ray Train's TensorflowTrainer and MultiWorkerMirroredStrategy.

`run(config, splits)` is the driver: it joins (or starts) a Ray cluster, hands the validated
arrays to the workers through the object store, and trains. `train_worker` is what every Ray
Train worker runs, top to bottom: threads, strategy, data, model, fit, and on the chief
(rank 0) only: the final evaluation, the artifacts and their publication.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
from importlib import metadata

from job import storage, tfenv
from job.data import InputSettings
from job.errors import ConfigError, DataError, TrainingFailed
from job.watchdog import StepWatchdog

EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Exit|Interrupt)): (.+)$")
PACKAGES = ("tensorflow", "tf-keras", "ray", "numpy", "boto3", "alexnet-job")
WORKER_ENV = {
    # Workers import TensorFlow themselves; this must be set before they do.
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Ray Train V2 echoes worker print() through its logger as well: every line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Ray starts worker processes at nice 15, below its own daemons; training is this cluster's
# whole purpose, so it runs at normal priority (the chart sets it on its Ray pods too).
RAY_NODE_ENV = {"RAY_worker_niceness": "0"}
LOCAL_RAY_ENV = {
    # Ray's single-machine mode: every Ray server binds to and advertises 127.0.0.1 only
    # (otherwise they listen on all interfaces and advertise the machine's address).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Under `uv run`, Ray would build a fresh virtualenv for the workers (~25 s); the local
    # workers use this very interpreter instead.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    **RAY_NODE_ENV,
}


# ----------------------------------------------------------------------------- driver

def run(config, splits, *, started_at: float) -> dict:
    """Train as `config` says on `splits`; return the published run's metrics."""
    if not config.address or is_loopback_address(config.address):
        # Ray reads these when it is imported. A loopback --address needs them as well: Ray
        # would otherwise rewrite 127.0.0.1 to the machine's external address and dial that.
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    tfenv.tensorflow()  # quietly, before Ray's TensorFlow integration imports it
    _connect(ray, config)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    checkpoints_fs, checkpoints_path = storage.arrow_filesystem(storage.checkpoints_uri(config.output))
    trainer = abortable(TensorflowTrainer)(
        train_loop_per_worker=train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "data": ray.put(splits),
            "started_at": started_at,
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker={"CPU": config.cpus_per_worker,
                                  **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=checkpoints_path,
            storage_filesystem=checkpoints_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[failure_recorder(config)],
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    # The deadline: past it, the workers are stopped and the run's checkpoints stay for the next
    # attempt, unless training is over and only the publishing is left.
    run_checkpoints = f"{checkpoints_path}/{config.run_name}"

    def at_deadline():
        reached = last_checkpoint(checkpoints_fs, run_checkpoints)
        if not reached or reached["epoch"] < config.epochs:
            trainer.abort()

    deadline = None
    if config.deadline_seconds:
        deadline = threading.Timer(max(0.0, started_at + config.deadline_seconds - time.time()), at_deadline)
        deadline.daemon = True
        deadline.start()
    try:
        trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayActorError) as error:
        # Ray has already printed the workers' tracebacks; end with the one line that matters,
        # after them (shutting down stops the log lines Ray still forwards from the workers).
        ray.shutdown()
        if trainer.aborted:  # the deadline; the controller has shut the workers down and exited
            message = deadline_reached(config, last_checkpoint(checkpoints_fs, run_checkpoints))
            append_record(config, "failures", {"failed_at": time.time(), "error": message})
            raise TrainingFailed(message) from None
        if not isinstance(error, ray.train.TrainingFailedError):
            raise
        raise TrainingFailed(f"training failed: {_last_line(error)}") from None
    finally:
        if deadline:
            deadline.cancel()
    return json.loads(storage.read_bytes(storage.run_uri(config.output, config.run_name) + "/metrics.json"))


def abortable(trainer_class):
    """`trainer_class` plus abort(), which ends its run from another thread of the driver."""
    import ray

    class AbortableTrainer(trainer_class):
        controller, aborted = None, False

        def _register_sigint_handler(self, controller):
            # fit() shows the driver its Train controller only here, for Ray's own Ctrl-C abort
            # (fit runs on the main thread); abort() makes the same call.
            super()._register_sigint_handler(controller)
            self.controller = controller
            if self.aborted:  # asked before the controller existed
                self.abort()

        def abort(self):
            self.aborted = True
            if self.controller is not None:
                try:  # the controller stops the worker group (their processes end), then itself
                    ray.get(self.controller.abort.remote())
                except ray.exceptions.RayActorError:
                    pass  # it exits as it aborts

    return AbortableTrainer


def last_checkpoint(filesystem, run_path: str) -> dict | None:
    """{"epoch", "step"} of the newest checkpoint Ray Train has registered for a run, or None."""
    from ray.train import Result
    ray_train_log = logging.getLogger("ray.train")
    level = ray_train_log.level
    ray_train_log.setLevel(logging.WARNING)  # not "A run snapshot was found..." (3 lines) here
    try:
        metrics = Result.from_path(run_path, storage_filesystem=filesystem).metrics
    except RuntimeError:  # no run folder or no checkpoint yet
        return None
    finally:
        ray_train_log.setLevel(level)
    return {"epoch": metrics["epoch"], "step": metrics.get("step", 0)} if metrics else None


def deadline_reached(config, reached: dict | None) -> str:
    if reached is None:
        return (f"deadline of {config.deadline_seconds:g} s reached before the first checkpoint; "
                "run the same command again to start over")
    return (f"deadline of {config.deadline_seconds:g} s reached at epoch {min(reached['epoch'] + 1, config.epochs)}; "
            "the last checkpoint is kept; run the same command again to resume")


def _connect(ray, config) -> None:
    """Join the cluster at config.address, or start a local one sized for the job."""
    runtime_env = {"env_vars": WORKER_ENV}
    if config.address:
        ray.init(address=config.address, runtime_env=runtime_env, log_to_driver=True)
        return
    # Logical CPUs: two 1-CPU workers may share one core on a small laptop (slower, not stuck).
    needed_cpus = config.workers * config.cpus_per_worker
    # The dashboard serves the State API that Ray Train's controller polls; it listens on
    # 127.0.0.1 only.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed_cpus), include_dashboard=True,
             dashboard_port=free_loopback_port(),  # 8265 may belong to another run on this machine
             runtime_env=runtime_env, log_to_driver=True)
    have_gpus = ray.cluster_resources().get("GPU", 0)
    if config.workers * config.gpus_per_worker > have_gpus:
        ray.shutdown()
        raise ConfigError(f"{config.workers} workers x {config.gpus_per_worker} GPUs need "
                          f"{config.workers * config.gpus_per_worker} GPUs but this machine has "
                          f"{int(have_gpus)}; use --gpus-per-worker 0 here, or --address a GPU cluster")


def is_loopback_address(address: str) -> bool:
    """True for host:port addresses on this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _last_line(error: Exception) -> str:
    """The line of a (worker's) traceback that says what went wrong: the last `SomeError: text`
    line, since TensorFlow appends op context (`[[node ...]]`) after it; our own errors
    without their class name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        match = EXCEPTION_LINE.match(line)
        if match:
            return match.group(2) if match.group(1).startswith("job.errors.") else line
    return lines[-1] if lines else type(error).__name__


def failure_recorder(config):
    """A Ray Train callback, run by the Train controller, that records why an attempt failed."""
    from ray.train import UserCallback

    class FailureRecorder(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            reasons = "; ".join(f"rank {rank}: {_last_line(error)}" for rank, error in sorted(worker_exceptions.items()))
            append_record(config, "failures", {"failed_at": time.time(), "error": reasons})

    return FailureRecorder()


# Each attempt of a run (a worker-group restart, or the same command run again) appends a line
# to attempts.jsonl when it starts, and the controller one to failures.jsonl when it fails (a
# step watchdog adds its own first); both live beside Ray's checkpoints in <output>/checkpoints/<run>/.

def append_record(config, name: str, entry: dict) -> None:
    filesystem, path = storage.arrow_filesystem(f"{storage.checkpoints_uri(config.output)}/{config.run_name}/{name}.jsonl")
    previous = b"".join(json.dumps(record).encode() + b"\n" for record in read_records(config, name))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # Object stores cannot append: rewrite. Through a file of its own and a rename, so that two
    # writers at once (two workers' watchdogs) leave one whole file, never a mix of both.
    temporary = f"{path}.{socket.gethostname()}-{os.getpid()}"
    with filesystem.open_output_stream(temporary) as out:
        out.write(previous + json.dumps(entry).encode() + b"\n")
    filesystem.move(temporary, path)


def read_records(config, name: str) -> list[dict]:
    filesystem, path = storage.arrow_filesystem(f"{storage.checkpoints_uri(config.output)}/{config.run_name}/{name}.jsonl")
    try:
        with filesystem.open_input_stream(path) as handle:
            return [json.loads(line) for line in handle.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def bad_image_reporter(config, rank: int):
    """What a worker does with an image it cannot read or decode: name it, record it beside
    the checkpoints (the chief gathers every worker's into metrics.json), and go on, or stop
    the run if config.bad_images says fail."""
    def report(image: str, reason: str) -> None:
        if config.bad_images == "fail":
            raise DataError(f"bad image {image}: {reason} (--bad-images skip would skip it)")
        print(f"skipped bad image {image}: {reason}", flush=True)
        append_record(config, f"bad-images-{rank}", {"image": image, "reason": reason, "at": time.time()})

    return report


def bad_images(config) -> dict:
    """Every bad image any worker of any attempt of this run skipped, each once."""
    found = {}
    for rank in range(config.workers):
        for record in read_records(config, f"bad-images-{rank}"):
            found.setdefault(record["image"], record["reason"])
    return {"count": len(found), "images": [{"image": image, "reason": reason} for image, reason in sorted(found.items())]}


def attempt_history(config) -> list[dict]:
    """Every attempt: when it started, where it resumed from, and when and why it failed."""
    attempts = read_records(config, "attempts")
    for failure in read_records(config, "failures"):
        failed = [a for a in attempts if a["started_at"] <= failure["failed_at"]]
        if failed:  # one attempt may have several reasons (the watchdog's, then Ray's): keep all
            reasons = [reason for reason in (failed[-1].get("error"), failure["error"]) if reason]
            failed[-1].update(failure, error="; ".join(reasons))
    for attempt in attempts[:-1]:
        attempt.setdefault("error", "stopped without a recorded failure (driver or cluster gone)")
    return attempts


# ----------------------------------------------------------------------------- worker

def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: every worker runs this; rank 0 also writes the run."""
    import ray
    import ray.train
    from job.config import Config

    config = Config(**loop_config["config"])
    context = ray.train.get_context()
    is_chief = context.get_world_rank() == 0

    # Threads and devices before TensorFlow starts its runtime.
    tfenv.limit_threads(config.cpus_per_worker)
    tf, keras = tfenv.tensorflow()
    tf.get_logger().setLevel("ERROR")  # per-step collective INFO lines would drown the progress
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # share the GPU with the input pipeline
    from job import models

    # One strategy for one or many workers; each worker mirrors across its local GPUs, and
    # gradients are all-reduced with NCCL between GPUs, or ring all-reduce over gRPC on CPUs.
    # No collective timeout: TensorFlow would hold a thread per all-reduce for its whole length
    # (4,000+ per worker at 600 s, measured). A stuck peer is the step watchdog's, below.
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL
                      if config.gpus_per_worker else tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
    # A peer that is alive but stuck holds every worker in an all-reduce; TensorFlow's heartbeats
    # only catch one that is dead or frozen whole. A worker whose steps stop finishing for
    # step_timeout ends its own process and Ray restarts the group from the last checkpoint.
    watchdog = StepWatchdog(config.step_timeout, on_expiry=lambda line: append_record(
        config, "failures", {"failed_at": time.time(), "error": f"rank {context.get_world_rank()}: {line}"}))
    tf.keras.utils.set_random_seed(config.seed)  # same initial weights on every worker

    # Where the last attempt stopped: a checkpoint of a previous attempt of this run, if any.
    resume = load_checkpoint(ray.train.get_checkpoint())
    if is_chief:
        append_record(config, "attempts", {"started_at": time.time(), "resumed_from":
                                           {"epoch": resume["epoch"], "step": resume["step"]} if resume else None})

    # Data: this worker's share of what the driver loaded (arrays) or listed (image files).
    splits = ray.get(loop_config["data"])
    input_shape = model_input_shape(config)
    steps_per_epoch = config.steps_per_epoch or splits.counts["train"] // config.batch_size
    validation_steps = splits.counts["validation"] // config.batch_size
    settings = InputSettings(global_batch=config.batch_size, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                             seed=config.seed, augment=config.augment, input_shape=input_shape,
                             cpus=config.cpus_per_worker, on_bad=bad_image_reporter(config, context.get_world_rank()))

    def training_data(first_epoch, skip_steps=0):
        return strategy.distribute_datasets_from_function(
            lambda ctx: splits.training(ctx, settings, first_epoch=first_epoch, skip_steps=skip_steps))

    val_data = strategy.distribute_datasets_from_function(
        lambda ctx: splits.validation(ctx, settings)) if validation_steps else None

    # Model and optimiser, created under the strategy so their variables are mirrored.
    with strategy.scope():
        model = models.build(config.model, input_shape, len(splits.class_names), config.mixed_precision)
        models.compile_for_training(
            model, learning_rate_schedule(config, strategy.num_replicas_in_sync, steps_per_epoch, keras),
            config.mixed_precision)
        if resume:
            restore(model, resume)

    # Train from where the run stands; a callback reports and checkpoints to Ray Train.
    staging = tempfile.mkdtemp(prefix=f"{config.run_name}-")
    progress = EpochReporter(config, steps_per_epoch, loop_config["started_at"], is_chief, resume, watchdog)
    callbacks = [progress]
    if is_chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(staging, "tensorboard"),
                                                     write_graph=False, update_freq="epoch"))
    fit = dict(validation_data=val_data, validation_steps=validation_steps or None, callbacks=callbacks, verbose=0)
    epoch, step = (resume["epoch"], resume["step"]) if resume else (0, 0)
    if step:  # the rest of an epoch interrupted after a mid-epoch checkpoint
        with watchdog:  # timed from its first step until fit returns (or fails: that is Ray's to handle)
            model.fit(training_data(epoch, skip_steps=step), initial_epoch=epoch, epochs=epoch + 1,
                      steps_per_epoch=steps_per_epoch - step, **fit)
        epoch += 1
    if epoch < config.epochs:
        with watchdog:
            model.fit(training_data(epoch), initial_epoch=epoch, epochs=config.epochs,
                      steps_per_epoch=steps_per_epoch, **fit)
    finished_training = time.time()

    if is_chief:
        try:
            write_run(staging, config, splits, settings, model, progress, strategy.num_replicas_in_sync,
                      steps_per_epoch, loop_config["started_at"], finished_training)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(model, state: dict):
    """A Ray checkpoint of the weights, the optimiser's slots and step, and `state` (chief only).

    Read from the local copies of the mirrored variables: no collective, so the other workers
    never wait on it.
    """
    import numpy as np
    from ray.train import Checkpoint

    folder = tempfile.mkdtemp(prefix="checkpoint-")
    np.savez(os.path.join(folder, "weights.npz"), *model.get_weights())
    np.savez(os.path.join(folder, "optimizer.npz"), *[v.numpy() for v in model.optimizer.variables])
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    return Checkpoint.from_directory(folder)


def load_checkpoint(checkpoint) -> dict | None:
    """{"weights", "optimizer", "epoch", "step", "history"} of a checkpoint, or None."""
    if checkpoint is None:
        return None
    import numpy as np

    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        for name in ("weights", "optimizer"):
            with np.load(os.path.join(folder, f"{name}.npz")) as arrays:
                state[name] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return state


def restore(model, state: dict) -> None:
    """Put a checkpoint's weights and optimiser state into a freshly built, compiled model."""
    model.set_weights(state["weights"])
    model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    if len(variables) != len(state["optimizer"]):
        raise RuntimeError(f"checkpoint has {len(state['optimizer'])} optimizer variables, model {len(variables)}")
    for variable, value in zip(variables, state["optimizer"]):
        variable.assign(value)


def model_input_shape(config) -> tuple:
    from job.config import MODEL_DEFAULTS
    return tuple(config.input_shape or MODEL_DEFAULTS[config.model][0])


def learning_rate_schedule(config, replicas: int, steps_per_epoch: int, keras):
    """The configured rate, optionally scaled by replicas, warmed up linearly, decayed by cosine."""
    peak = config.learning_rate * (replicas if config.scale_lr else 1)
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    if not warmup_steps and config.lr_decay == "none":
        return peak
    tf = tfenv.tensorflow()[0]

    class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            rate = tf.constant(peak, tf.float32)
            if config.lr_decay == "cosine":
                progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
                rate = rate * 0.5 * (1 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
            if warmup_steps:
                rate = rate * tf.minimum(1.0, (step + 1) / warmup_steps)
            return rate

        def get_config(self):
            return {"peak": peak, "warmup_steps": warmup_steps, "total_steps": total_steps,
                    "decay": config.lr_decay}

    return WarmupThenDecay()


class EpochReporter(tfenv.tensorflow()[1].callbacks.Callback):
    """Times each epoch's steps, reports it to Ray Train with a checkpoint, prints on the chief.

    Every worker calls ray.train.report equally often (Ray's rule); only the chief attaches the
    checkpoint. With checkpoint_every_steps, mid-epoch checkpoints are reported too. Every
    finished training or validation batch, and every report, feeds the step watchdog.
    """

    def __init__(self, config, steps_per_epoch, started_at, is_chief, resume, watchdog):
        super().__init__()
        # Take Keras' logs as tensors: with batch hooks, numpy logs would cost a device sync on
        # every step. They are read (as floats) at epoch ends only.
        self._supports_tf_logs = True
        self.config, self.steps, self.started_at, self.is_chief = config, steps_per_epoch, started_at, is_chief
        self.watchdog = watchdog
        self.history: list[dict] = list(resume["history"]) if resume else []
        self.first_step_at = None
        self.skipped = resume["step"] if resume else 0  # steps of the first epoch done before
        self.preemption_seen = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_test_batch_end(self, batch, logs=None):
        self.watchdog.beat()

    def on_train_batch_end(self, batch, logs=None):
        self.watchdog.beat()
        every, step = self.config.checkpoint_every_steps, self.skipped + batch + 1
        if step >= self.steps:
            return  # the epoch's own checkpoint follows
        if every and step % every == 0:
            self._report({"epoch": self.epoch, "step": step}, epoch=self.epoch, step=step)
        elif step % self.config.preemption_check_steps == 0 and self._preempted():
            # A node of this run is being drained (the pod's preStop hook on a Kubernetes
            # eviction): checkpoint now, while every worker is still here, and keep training.
            self._report({"epoch": self.epoch, "step": step, "preemption": True}, epoch=self.epoch, step=step)
            if self.is_chief:
                print(f"preemption notice: checkpoint saved at epoch {self.epoch + 1} step {step}", flush=True)

    def _preempted(self) -> bool:
        """True once per preemption notice; a barrier every worker reaches at the same step."""
        import ray.train
        notice = ray.train.get_preemption_info()
        if notice is None or notice == self.preemption_seen:
            return False
        self.preemption_seen = notice
        return True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_started = self.train_ended = time.time()

    def on_test_begin(self, logs=None):
        self.train_ended = time.time()  # validation is not training throughput

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        train_seconds = (self.train_ended if self.train_ended > self.epoch_started else now) - self.epoch_started
        steps_run = self.steps - self.skipped
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                  "images_per_second": steps_run * self.config.batch_size / train_seconds,
                  "seconds": now - self.epoch_started}
        self.skipped = 0
        self.history.append(record)
        self._report(record, epoch=epoch + 1, step=0)
        if self.is_chief:
            print(format_epoch(record, self.config.epochs), flush=True)

    def _report(self, metrics, *, epoch, step):
        import ray.train
        checkpoint = None
        if self.is_chief:
            checkpoint = save_checkpoint(self.model, {"epoch": epoch, "step": step, "history": self.history})
        self.watchdog.beat()
        ray.train.report(metrics, checkpoint=checkpoint)  # waits for every worker and the upload
        self.watchdog.beat()
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)  # Ray has persisted its copy


def format_epoch(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"{record['images_per_second']:.0f} img/s")
    parts.append(f"{record['seconds']:.1f}s")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- the run's artifacts

def write_run(staging, config, splits, settings, trained, progress, replicas, steps_per_epoch, started_at,
              finished_training) -> None:
    """Evaluate on the test set and publish model, metrics, curves and config (chief only)."""
    if storage.run_state(config.output, config.run_name) == "complete":
        # A restart after the publish (exactly once: the published run is never replaced), which
        # may have been stopped before it moved latest.json.
        result = storage.finish_publish(config.output, config.run_name, promote_if_better=config.promote_if_better)
        print(result.message, flush=True)
        return
    from job import models
    tf, _ = tfenv.tensorflow()

    # A plain copy of the trained weights, outside the strategy: evaluating and saving it needs
    # no collective with the other workers, and it is exactly what users will load.
    model = models.build(config.model, model_input_shape(config), len(splits.class_names))
    model.set_weights(trained.get_weights())
    # Saved uncompiled: an inference artifact without optimizer state (that lives in the
    # checkpoints), so loading it warns about nothing and it is a third of Adam's size.
    model.save(os.path.join(staging, "model.keras"))
    tf.saved_model.save(model, os.path.join(staging, "saved_model", "1"))  # TF Serving layout

    models.compile_for_training(model, config.learning_rate)
    test, finish_test = splits.test(settings)
    test_metrics = model.evaluate(test, verbose=0, return_dict=True)
    finish_test()
    with open(os.path.join(staging, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write(config.to_yaml())
    history = progress.history
    plot_history(history, os.path.join(staging, "training_curves.png"))
    trained_epochs = history[1:] or history  # the first epoch pays for tracing and warm-up
    metrics = {
        "run_name": config.run_name,
        "model": config.model,
        "dataset": config.dataset,
        **{f"test_{name}": float(value) for name, value in test_metrics.items()},
        "images_per_second": sum(r["images_per_second"] for r in trained_epochs) / len(trained_epochs),
        "wall_time_seconds": time.time() - started_at,
        # command start -> first step; none when this attempt resumed after the last epoch
        "startup_seconds": progress.first_step_at - started_at if progress.first_step_at else None,
        "workers": config.workers,
        "replicas": replicas,
        "global_batch": config.batch_size,
        "per_replica_batch": config.batch_size // replicas,
        "steps_per_epoch": steps_per_epoch,
        "history": history,
        "attempts": attempt_history(config),
        "class_names": splits.class_names,
        "data": {"location": splits.location, "fingerprint": splits.fingerprint, "counts": splits.counts,
                 "bad_images": bad_images(config)},
        "started_at": started_at,
        "training_finished_at": finished_training,
        "config": config.to_dict(),
        "packages": package_versions(),
    }
    with open(os.path.join(staging, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    result = storage.publish(staging, config.output, config.run_name, promote_if_better=config.promote_if_better,
                             manifest_extra={
                                 "metrics": {k: v for k, v in metrics.items() if k.startswith("test_")},
                                 **{k: metrics[k] for k in ("data", "packages", "started_at", "class_names", "model")}})
    print(result.message, flush=True)


def plot_history(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for prefix, label in (("", "training"), ("val_", "validation")):
            if prefix + metric in history[0]:
                axis.plot(epochs, [r[prefix + metric] for r in history], marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
