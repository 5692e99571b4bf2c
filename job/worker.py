"""What every Ray Train worker runs, top to bottom: threads, strategy, data, model, fit, and on
the chief (rank 0) only: the final evaluation, the run's artifacts and their publication.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from job import precision, progress, ray_internals, records, runlogs, storage, tfenv, tracking
from job.data import InputSettings
from job.watchdog import StepWatchdog

PACKAGES = ("tensorflow", "tf-keras", "ray", "numpy", "boto3", "alexnet-job")


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: every worker runs this; rank 0 also writes the run."""
    import ray
    import ray.train
    from job.config import Config

    config = Config(**loop_config["config"])
    context = ray.train.get_context()
    # What this worker prints is saved with the run too; its first line says where it ran.
    with runlogs.Keeper(config.output, config.run_name,
                        f"worker-{runlogs.stamp(time.time())}-rank-{context.get_world_rank()}",
                        first_line=f"rank {context.get_world_rank()} of {context.get_world_size()} on node "
                                   f"{ray.util.get_node_ip_address()}, pid {os.getpid()}"):
        train(config, context, loop_config)


def train(config, context, loop_config: dict) -> None:
    import ray
    import ray.train
    is_chief = context.get_world_rank() == 0

    # Threads and devices before TensorFlow starts its runtime.
    tfenv.limit_threads(config.cpus_per_worker)
    tf, keras = tfenv.tensorflow()
    tf.get_logger().setLevel("ERROR")  # per-step collective INFO lines would drown the progress
    # INFO lines of libraries that Ray Train's worker logging (the root logger at INFO) would
    # print: absl's carry TensorFlow's SavedModel notes (a renamed input of `serve`, assets
    # written); matplotlib's the font cache it builds the first time (a warning, too).
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    # Ray Train's worker-side INFO lines repeat, per report and per worker, what the progress
    # line says (the metrics dict, the checkpoint's path): 3 lines an epoch for 2 workers. The
    # report line comes from a logger Ray 2.60 names after its file, outside "ray.train".
    for worker_log in (logging.getLogger("ray.train"), ray_internals.worker_report_logger()):
        worker_log.setLevel(logging.WARNING)
    gpus, cuda_error = tfenv.visible_gpus()
    if config.gpus_per_worker and not gpus:
        print(f"warning: this worker was given {config.gpus_per_worker} GPU(s) but TensorFlow sees none "
              f"({cuda_error or 'no CUDA device'}); it trains on its CPU", flush=True)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # share the GPU with the input pipeline
    mixed_precision, why, warning = precision.choose(
        config.mixed_precision, gpus if config.gpus_per_worker else [], precision.cpu_flags())
    if is_chief:
        print(f"precision: {precision.describe(mixed_precision)}; {why}", flush=True)
        if warning:
            print(warning, flush=True)
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
    watchdog = StepWatchdog(config.step_timeout, on_expiry=lambda line: records.append_record(
        config, "failures", {"failed_at": time.time(), "error": f"rank {context.get_world_rank()}: {line}",
                             "ends_attempt": False}))  # Ray Train's failure that follows does
    tf.keras.utils.set_random_seed(config.seed)  # same initial weights on every worker

    # Where the last attempt stopped: a checkpoint of a previous attempt of this run, if any.
    resume = load_checkpoint(ray.train.get_checkpoint())
    if is_chief:
        records.append_record(config, "attempts", {"started_at": time.time(), "resumed_from":
                                           {"epoch": resume["epoch"], "step": resume["step"]} if resume else None})

    # Data: this worker's share of what the driver loaded (arrays) or listed (image files).
    splits = ray.get(loop_config["data"])
    input_shape = config.model_input_shape()
    steps_per_epoch = config.steps_per_epoch or splits.counts["train"] // config.batch_size
    validation_steps = splits.counts["validation"] // config.batch_size
    skipped_before = frozenset(bad["image"] for bad in records.bad_images(config)["images"]) if resume else frozenset()
    settings = InputSettings(global_batch=config.batch_size, steps_per_epoch=steps_per_epoch,
                             seed=config.seed, augment=config.augment, input_shape=input_shape,
                             cpus=config.cpus_per_worker, on_bad=records.bad_image_reporter(config, context.get_world_rank()),
                             skipped_before=skipped_before)

    def training_data(first_epoch, skip_steps=0):
        return strategy.distribute_datasets_from_function(
            lambda ctx: splits.training(ctx, settings, first_epoch=first_epoch, skip_steps=skip_steps))

    val_data = strategy.distribute_datasets_from_function(
        lambda ctx: splits.validation(ctx, settings)) if validation_steps else None

    # Model and optimiser, created under the strategy so their variables are mirrored.
    with strategy.scope():
        model = models.build(config.model, input_shape, len(splits.class_names), mixed_precision)
        models.compile_for_training(
            model, learning_rate_schedule(config, strategy.num_replicas_in_sync, steps_per_epoch, keras),
            mixed_precision)
        if resume:
            restore(model, resume)

    # Train from where the run stands; a callback reports and checkpoints to Ray Train.
    staging = tempfile.mkdtemp(prefix=f"{config.run_name}-") if is_chief else None  # the chief publishes
    reporter = EpochReporter(config, steps_per_epoch, loop_config["started_at"], is_chief, resume, watchdog,
                             progress_bar=loop_config.get("progress_bar", False),
                             tracker=tracking.Tracker(config.mlflow_tracking_uri if is_chief else None,
                                                      loop_config.get("mlflow_run_id")))
    callbacks = [reporter]
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
            write_run(staging, config, splits, settings, model, reporter, strategy.num_replicas_in_sync,
                      steps_per_epoch, loop_config["started_at"], finished_training)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            reporter.close()


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

    def __init__(self, config, steps_per_epoch, started_at, is_chief, resume, watchdog, progress_bar=False,
                 tracker=None):
        super().__init__()
        # Take Keras' logs as tensors: with batch hooks, numpy logs would cost a device sync on
        # every step. They are read (as floats) at epoch ends, and on the chief at most once a
        # second for the progress bar and every 10 s for the progress record.
        self._supports_tf_logs = True
        self.config, self.steps, self.started_at, self.is_chief = config, steps_per_epoch, started_at, is_chief
        self.watchdog = watchdog
        self.history: list[dict] = list(resume["history"]) if resume else []
        self.first_step_at = None
        self.skipped = resume["step"] if resume else 0  # steps of the first epoch done before
        self.preemption_seen = None
        # The chief shows how far the run is: a progress bar within each epoch where the command
        # runs on a terminal (Ray's tqdm, drawn by the driver), and a record in the run's storage.
        self.show_bar = is_chief and progress_bar
        self.bar, self.bar_described_at = None, 0.0
        self.epoch = min(resume["epoch"], config.epochs - 1) if resume else 0  # resumed after the last: finishing
        self.record = progress.Writer(config.output, config.run_name) if is_chief else None
        self.timed_from = None  # (time, steps done) the record's rate is measured from
        self.tracker = tracker or tracking.Tracker(None)  # MLflow, on the chief when asked for

    def on_train_batch_begin(self, batch, logs=None):
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_test_batch_end(self, batch, logs=None):
        self.watchdog.beat()

    def on_train_batch_end(self, batch, logs=None):
        self.watchdog.beat()
        every, step = self.config.checkpoint_every_steps, self.skipped + batch + 1
        if self.bar is not None:
            self.bar.update(1)
            if time.time() - self.bar_described_at >= 1 and logs and "loss" in logs:  # a float() waits for the step
                self.bar.set_description(f"epoch {self.epoch + 1}/{self.config.epochs} loss {float(logs['loss']):.4f}")
                self.bar_described_at = time.time()
        if self.record is not None:
            if self.timed_from is None:  # the first step traces the model: ETA counts from its end
                self.timed_from = (time.time(), self.epoch * self.steps + step)
            elif self.record.due():
                self.record.put(self.progress("training", step, logs))
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
            # Tell the pod's preStop hook (the chart names the file) that the run is safe, so the
            # drained pod can go now rather than at the end of its grace period. Only the chief
            # uploads, and the others' report returns before that upload ends: wait for it.
            import ray.train.collective
            ray.train.collective.barrier()
            self.watchdog.beat()
            if marker := os.environ.get("ALEXNET_JOB_PREEMPTION_MARKER"):
                Path(marker).touch()

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
        if self.show_bar:
            from ray.experimental.tqdm_ray import tqdm
            self.bar = tqdm(desc=f"epoch {epoch + 1}/{self.config.epochs}", total=self.steps, unit="step")
            self.bar.n = self.skipped

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
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.record is not None:
            self.record.put(self.progress("training", self.steps, logs))
        self._report(record, epoch=epoch + 1, step=0)
        if self.is_chief:
            print(format_epoch(record, self.config.epochs), flush=True)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)

    def progress(self, state: str, step: int, logs=None) -> dict:
        """The progress record: where the run is, its latest figures, and when it should end."""
        now = time.time()
        done = self.epoch * self.steps + step
        rate = None
        if self.timed_from and done > self.timed_from[1] and now > self.timed_from[0]:
            rate = (done - self.timed_from[1]) / (now - self.timed_from[0])  # steps a second, this attempt
        figures = {key: float(logs[key]) for key in ("loss", "accuracy", "val_loss", "val_accuracy") if logs and key in logs}
        return {"run": self.config.run_name, "state": state, "epoch": self.epoch + 1, "epochs": self.config.epochs,
                "step": step, "steps_per_epoch": self.steps, **figures,
                "images_per_second": rate * self.config.batch_size if rate else None,
                "elapsed_seconds": now - self.started_at,
                "eta_seconds": (self.config.epochs * self.steps - done) / rate if rate else None}

    def phase(self, state: str) -> None:
        """The chief's steps after training: evaluating, publishing, published."""
        if self.record is not None:
            self.record.put({**self.progress(state, self.steps), "eta_seconds": None})

    def close(self) -> None:
        if self.record is not None:
            self.record.close()

    def _report(self, metrics, *, epoch, step):
        import ray.train
        checkpoint = None
        if self.is_chief:
            checkpoint = save_checkpoint(self.model, {"epoch": epoch, "step": step, "history": self.history})
        self.watchdog.beat()
        ray.train.report(metrics, checkpoint=checkpoint)  # waits for every worker; the chief also for its upload
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

def write_run(staging, config, splits, settings, trained, reporter, replicas, steps_per_epoch, started_at,
              finished_training) -> None:
    """Evaluate on the test set and publish model, metrics, curves and config (chief only)."""
    if storage.run_state(config.output, config.run_name) == "complete":
        # A restart after the publish (exactly once: the published run is never replaced), which
        # may have been stopped before it moved latest.json.
        result = storage.finish_publish(config.output, config.run_name, promote_if_better=config.promote_if_better)
        print(result.message, flush=True)
        reporter.phase("published")
        tell_tracker(reporter.tracker, config, result, storage.show_run(result.run_uri)["metrics"])
        return
    from job import models

    reporter.phase("evaluating")

    # A plain copy of the trained weights, outside the strategy: evaluating and saving it needs
    # no collective with the other workers, and it is exactly what users will load.
    model = models.build(config.model, config.model_input_shape(), len(splits.class_names))
    model.set_weights(trained.get_weights())
    # Saved uncompiled: an inference artifact without optimizer state (that lives in the
    # checkpoints), so loading it warns about nothing and it is a third of Adam's size.
    model.save(os.path.join(staging, "model.keras"))
    models.export_for_serving(model, os.path.join(staging, "saved_model", "1"))  # TF Serving's layout

    models.compile_for_training(model, config.learning_rate)
    test, finish_test = splits.test(settings)
    test_metrics = model.evaluate(test, verbose=0, return_dict=True)
    finish_test()
    history = reporter.history
    plot_history(history, os.path.join(staging, "training_curves.png"))
    with open(os.path.join(staging, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write(config.to_yaml())
    trained_epochs = history[1:] or history  # the first epoch pays for tracing and warm-up
    metrics = {
        "run_name": config.run_name,
        "model": config.model,
        "dataset": config.dataset,
        **{f"test_{name}": float(value) for name, value in test_metrics.items()},
        "images_per_second": sum(r["images_per_second"] for r in trained_epochs) / len(trained_epochs),
        "wall_time_seconds": time.time() - started_at,
        # command start -> first step; none when this attempt resumed after the last epoch
        "startup_seconds": reporter.first_step_at - started_at if reporter.first_step_at else None,
        "workers": config.workers,
        "replicas": replicas,
        "global_batch": config.batch_size,
        "per_replica_batch": config.batch_size // replicas,
        "compute_dtype": trained.layers[0].compute_dtype,  # what --mixed-precision made of it
        "steps_per_epoch": steps_per_epoch,
        "history": history,
        "attempts": records.attempt_history(config),
        "class_names": splits.class_names,
        "data": {"location": splits.location, "fingerprint": splits.fingerprint, "counts": splits.counts,
                 "bad_images": records.bad_images(config)},
        "started_at": started_at,
        "training_finished_at": finished_training,
        "config": config.to_dict(),
        "packages": package_versions(),
    }
    with open(os.path.join(staging, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    reporter.phase("publishing")
    result = storage.publish(staging, config.output, config.run_name, promote_if_better=config.promote_if_better,
                             manifest_extra={
                                 "metrics": {k: v for k, v in metrics.items() if k.startswith("test_")},
                                 **{k: metrics[k] for k in ("data", "packages", "started_at", "class_names", "model")}})
    reporter.phase("published")
    print(result.message, flush=True)
    tell_tracker(reporter.tracker, config, result, {k: v for k, v in metrics.items() if k.startswith("test_")})


def tell_tracker(tracker, config, result, test_metrics: dict) -> None:
    """MLflow's part of a published run: its test metrics, where it is stored, and, if it became
    `latest`, a model version (once per run, however many times a restart gets here)."""
    tracker.log_metrics(test_metrics, step=config.epochs)
    tracker.set_tags({"alexnet-job.storage": result.run_uri})
    if result.promoted and (version := tracker.register_model(tracking.model_name(config.model), result.run_uri)):
        print(f"registered in MLflow as version {version} of model {tracking.model_name(config.model)}", flush=True)


def plot_history(history: list[dict], path: str) -> None:
    # The Figure API without pyplot: no global figure state, so it can draw on any thread.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(10, 4))
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        for prefix, label in (("", "training"), ("val_", "validation")):
            if prefix + metric in history[0]:
                axis.plot(epochs, [r[prefix + metric] for r in history], marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
