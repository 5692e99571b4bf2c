"""The driver of a training run: Ray Train's TensorflowTrainer over the workers of `job.worker`.

`run(config, splits)` joins (or starts) a Ray cluster, hands the validated arrays (or the image
listing) to the workers through the object store, trains, and returns the published metrics.
The Train controller, a process that never runs TensorFlow, imports this module for the
failure recorder below, so it imports neither TensorFlow nor Ray at the top.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time

from job import ray_internals, records, storage, tfenv
from job.errors import ConfigError, DataError, TrainingFailed

# The "rank" the failure policy files a worker lost while its group starts under: which rank it
# would have had is not known then.
STARTING = -1
EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Exit|Interrupt)): (.+)$")
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
# Ray Train's preemption watcher waits for a worker's node to be drained, which the one-node
# cluster the command starts itself (no --address) never is; starting it also puts a Ray
# core_worker error line ("constructor arguments in the object store") into every local run.
OWN_CLUSTER_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray 2.60 turns token authentication on for a new local cluster anyway, and says so in a
    # warning on every run; asking for it explicitly keeps it on and the warning off.
    "RAY_AUTH_MODE": "token",
}
# Read by the Train controller, which Ray Train gives the driver's values of these.
CONTROLLER_ENV = {
    # The controller polls its workers this often (Ray's default is 2 s); a finished run is
    # noticed at the next poll, so the default adds up to 2 s to every run's end. A poll is a
    # cheap actor call.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


# ----------------------------------------------------------------------------- driver

def run(config, splits, *, started_at: float) -> dict:
    """Train as `config` says on `splits`; return the published run's metrics."""
    if not config.address or is_loopback_address(config.address):
        # Ray reads these when it is imported. A loopback --address needs them as well: Ray
        # would otherwise rewrite 127.0.0.1 to the machine's external address and dial that.
        os.environ.update(LOCAL_RAY_ENV)
    for name, value in {**CONTROLLER_ENV, **({} if config.address else OWN_CLUSTER_ENV)}.items():
        os.environ.setdefault(name, value)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours the workers' prefixes even in a log file
    import ray

    # Ray's TensorflowTrainer module imports TensorFlow, which the driver never runs: it loads
    # (quietly) in a thread while ray.init waits for the cluster's processes to come up.
    tensorflow_import = threading.Thread(target=tfenv.tensorflow, name="import-tensorflow")
    tensorflow_import.start()
    try:
        _connect(ray, config)
    finally:
        tensorflow_import.join()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from job import tf_config, tracking, worker

    # One MLflow run per run name, found or made here (the driver runs once per attempt of the
    # command); the chief logs into it.
    tracker = tracking.Tracker(config.mlflow_tracking_uri)
    mlflow_run_id = tracker.start(config.mlflow_experiment, config.run_name, config.to_dict())

    checkpoints_fs, checkpoints_path = storage.arrow_filesystem(storage.checkpoints_uri(config.output))
    trainer = for_this_run(TensorflowTrainer, config)(
        train_loop_per_worker=worker.train_worker,
        # TF_CONFIG for each worker, set without importing TensorFlow into the Train controller.
        tensorflow_config=tf_config.TFConfig(),
        train_loop_config={
            "config": config.to_dict(),
            "data": ray.put(splits),
            "started_at": started_at,
            "mlflow_run_id": mlflow_run_id,
            # On a terminal the chief draws a progress bar in each epoch (Ray's tqdm, drawn here).
            "progress_bar": sys.stdout.isatty(),
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
            callbacks=[abandoned_group_release()],
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            # The controller's INFO lines (resources requested, each worker's rank and pid) tell a
            # user nothing the progress lines do not; its warnings and errors stay, and a retry
            # prints its own line (failure_policy).
            logging_config=LoggingConfig(log_level="WARNING"),
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
        tracker.end("FAILED")
        if trainer.aborted:  # the deadline; the controller has shut the workers down and exited
            message = deadline_reached(config, last_checkpoint(checkpoints_fs, run_checkpoints))
            records.append_record(config, "failures", {"failed_at": time.time(), "error": message})
            raise TrainingFailed(message) from None
        if not isinstance(error, ray.train.TrainingFailedError):
            raise
        raise TrainingFailed(failed_for_good(config, error, started_at,
                                             last_checkpoint(checkpoints_fs, run_checkpoints))) from None
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    finally:
        if deadline:
            deadline.cancel()
    tracker.end("FINISHED")
    # Now rather than at exit, where Ray first sleeps half a second for late log lines: the
    # workers' last lines came before their group was shut down.
    ray.shutdown()
    return json.loads(storage.read_bytes(storage.run_uri(config.output, config.run_name) + "/metrics.json"))


def for_this_run(trainer_class, config):
    """`trainer_class` with the run's failure policy, plus abort(), which ends its run from
    another thread of the driver."""
    import ray

    class RunTrainer(trainer_class):
        controller, aborted = None, False

        # Both methods are Ray's private ones (job/ray_internals.py names them).
        def _initialize_and_run_controller(self, **controller_arguments):
            # Ray Train takes no failure policy of the user's: the one fit() made is swapped here.
            controller_arguments[ray_internals.FAILURE_POLICY_KEYWORD] = failure_policy(
                config, self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_arguments)

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

    return RunTrainer


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


def failed_for_good(config, error, started_at: float, reached: dict | None) -> str:
    """The line that ends a run Ray Train gave up on: a user's error as it is, a spent failure
    budget with how many failures spent it and the checkpoint kept."""
    from ray.train import WorkerGroupError

    failures = [f for f in records.read_records(config, "failures") if "retried" in f and f["failed_at"] >= started_at]
    last = failures[-1]["error"] if failures else failure_reasons(error)
    # Ray Train raises a worker group's error only once the budget is spent; the policy also
    # raises a user's error at once, and a controller error is never the budget's.
    if not isinstance(error, WorkerGroupError) or any(map(users_error, worker_failures(error))):
        return f"training failed: {last}"
    kept = (f"the checkpoint of epoch {reached['epoch']} step {reached['step']} is kept: run the same command "
            "again to resume from it" if reached else "no checkpoint was reached")
    times = f"{len(failures)} time{'s' if len(failures) != 1 else ''}"
    return (f"training failed {times}, more than --max-failures {config.max_failures} allows; "
            f"the last time: {last}; {kept}")


def worker_failures(error) -> list:
    from ray.train import WorkerGroupError
    return list(error.worker_failures.values()) if isinstance(error, WorkerGroupError) else []


def users_error(worker_failure) -> bool:
    """True for a worker's error in the user's config or data, which every retry would raise
    again. Told by its text: one raised inside a tf.data pipeline (a bad image) reaches Ray as
    TensorFlow's error, with ours as its last exception line."""
    return _last_exception(worker_failure)[0] in (f"job.errors.{kind.__name__}" for kind in (ConfigError, DataError))


def deadline_reached(config, reached: dict | None) -> str:
    if reached is None:
        return (f"deadline of {config.deadline_seconds:g} s reached before the first checkpoint; "
                "run the same command again to start over")
    return (f"deadline of {config.deadline_seconds:g} s reached at epoch {min(reached['epoch'] + 1, config.epochs)}; "
            "the last checkpoint is kept; run the same command again to resume")


def _connect(ray, config) -> None:
    """Join the cluster at config.address, or start a local one sized for the job."""
    # Ray's own INFO lines are start-up chatter; the dashboard's address, the one worth
    # knowing, is printed once below. Warnings and errors stay.
    runtime_env = {"env_vars": WORKER_ENV}
    if config.address:
        context = ray.init(address=config.address, runtime_env=runtime_env, log_to_driver=True,
                           logging_level=logging.WARNING)
        print_dashboard(context)
        return
    # Logical CPUs: two 1-CPU workers may share one core on a small laptop (slower, not stuck).
    needed_cpus = config.workers * config.cpus_per_worker
    # The dashboard serves the State API that Ray Train's controller polls; it listens on
    # 127.0.0.1 only. Its port is left to Ray: 8265, or the next free one of 50 if another run
    # holds it, found at bind time. A port probed free beforehand can be taken by one of the
    # node's own processes before the dashboard binds it.
    context = ray.init(num_cpus=max(os.cpu_count() or 1, needed_cpus), include_dashboard=True,
                       runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    have_gpus = ray.cluster_resources().get("GPU", 0)
    if config.workers * config.gpus_per_worker > have_gpus:
        ray.shutdown()
        raise ConfigError(f"{config.workers} workers x {config.gpus_per_worker} GPUs need "
                          f"{config.workers * config.gpus_per_worker} GPUs but this machine has "
                          f"{int(have_gpus)}; use --gpus-per-worker 0 here, or --address a GPU cluster")
    print_dashboard(context)


def print_dashboard(context) -> None:
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def is_loopback_address(address: str) -> bool:
    """True for host:port addresses on this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _last_line(error: Exception) -> str:
    """The line of a (worker's) traceback that says what went wrong: the last `SomeError: text`
    line, since TensorFlow appends op context (`[[node ...]]`) after it; our own errors
    without their class name."""
    kind, line = _last_exception(error)
    return line.split(": ", 1)[1] if kind.startswith("job.errors.") else line


def _last_exception(error: Exception) -> tuple[str, str]:
    """(class name, line) of the last `SomeError: text` line of an error's text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        match = EXCEPTION_LINE.match(line)
        if match:
            return match.group(1), line
    return "", f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def failure_policy(config, failure_config):
    """Ray Train's failure policy for this run, run by the Train controller, with two changes,
    and every failure it decides on recorded (why the attempt ended, retried or not).

    A worker lost while its group starts is a worker failure, retried within --max-failures:
    Ray 2.60 raises the loss of a worker before its train function is launched as a controller
    error it does not retry, and ends the run with budget left ("The actor is dead ..."); the
    losses it does report as startup failures it retries without counting, forever.
    A worker that raised an error in the user's config or data (a bad image with --bad-images
    fail) would raise it again: the run ends at once rather than retrying it --max-failures
    times. A storage error may pass (S3 back from an outage) and is retried.
    """
    from ray.exceptions import RayActorError
    from ray.train import ControllerError, WorkerGroupError
    DefaultFailurePolicy, FailureDecision, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError = (
        ray_internals.failure_handling())

    class RunFailurePolicy(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            error = training_failed_error
            if isinstance(error, ControllerError) and isinstance(
                    error.controller_failure, (RayActorError, WorkerGroupStartupFailedError)):
                lost = error.controller_failure
                error = WorkerGroupError(f"a worker was lost while the worker group started: {lost}",
                                         {STARTING: lost})
            if any(map(users_error, worker_failures(error))):
                decision = FailureDecision.RAISE
            else:
                decision = super().make_decision(error)
            waited = isinstance(error, ControllerError) and isinstance(
                error.controller_failure, WorkerGroupStartupTimeoutError)
            if not (waited and decision == FailureDecision.RETRY):  # waiting for nodes is no failure
                reasons = failure_reasons(error)
                records.append_record(config, "failures", {
                    "failed_at": time.time(), "error": reasons, "retried": decision == FailureDecision.RETRY})
                if decision == FailureDecision.RETRY:
                    # The one line a user sees of a retry (Ray's own are INFO lines, not shown).
                    print(f"{reasons}; restarting the workers from the last checkpoint", flush=True)
            return decision

    return RunFailurePolicy(failure_config)


def abandoned_group_release():
    """A Ray Train callback, run by the Train controller, that shuts down a worker group whose
    start failed after its workers were up: Ray 2.60 abandons it, its placement group keeps the
    CPUs and GPUs the next group needs, and the retry waits for them forever (a local run) or
    runs beside a stray worker (a cluster). Released as the next group starts."""
    class AbandonedGroupRelease(ray_internals.worker_group_callback()):
        starting = None  # a group between its workers' start and its training's

        def after_worker_group_start(self, worker_group):
            self.starting = worker_group

        def after_worker_group_training_start(self, worker_group):
            self.starting = None

        def before_worker_group_start(self, worker_group_context):
            abandoned, self.starting = self.starting, None
            if abandoned is not None and abandoned.has_started():
                abandoned.shutdown()

    return AbandonedGroupRelease()


def failure_reasons(error) -> str:
    """One line per lost or failed worker (a Ray Train TrainingFailedError), joined by '; '.
    Workers whose process was lost come first: the others' errors (a collective aborted, say)
    are usually what losing it did to them."""
    from ray.train import ControllerError, WorkerGroupError
    if isinstance(error, WorkerGroupError):
        lost = ray_internals.worker_lost_errors()
        failures = sorted(error.worker_failures.items(), key=lambda item: (not isinstance(item[1], lost), item[0]))
        return "; ".join(f"rank {rank}: {_last_line(failure)}" if rank != STARTING else
                         f"while the worker group started: {_last_line(failure)}"
                         for rank, failure in failures)
    return _last_line(error.controller_failure if isinstance(error, ControllerError) else error)
