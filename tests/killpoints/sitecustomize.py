"""Kill points for tests: SIGKILL a Ray Train worker of a real run at an exact moment.

On PYTHONPATH, Python imports this file into every process of a run (driver, Train controller,
workers). It does nothing unless ALEXNET_JOB_TEST_KILL names a moment (KILL_POINTS); then, in the
Ray Train worker of rank ALEXNET_JOB_TEST_KILL_RANK (default 1), the first time that moment comes,
it creates the file ALEXNET_JOB_TEST_KILL_MARKER (so a restarted worker is not killed again)
and kills its own process, as the OOM killer would (with ALEXNET_JOB_TEST_KILL_NODE=1, its
node's raylet as well, as a lost node would). The product holds no trace of
this: the moments are found by wrapping its functions (and Ray's) as their modules load.
"""

import functools
import importlib.abc
import importlib.util
import os
import signal
import sys

MOMENT = os.environ.get("ALEXNET_JOB_TEST_KILL")


def _rank():
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        return get_train_context().get_world_rank()
    except Exception:  # not a Ray Train worker, or its context is not set up yet
        return None


def die_here(moment: str) -> None:
    """Kill this process if it is the chosen worker at the chosen moment, the first time."""
    if moment != MOMENT or _rank() != int(os.environ.get("ALEXNET_JOB_TEST_KILL_RANK", "1")):
        return
    try:
        os.close(os.open(os.environ["ALEXNET_JOB_TEST_KILL_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    sys.stdout.flush()
    if os.environ.get("ALEXNET_JOB_TEST_KILL_NODE") == "1":
        # The node is lost: its raylet (this worker's parent) and this worker with it (a worker
        # outliving its raylet trains on until the node is declared dead, ~30 s later).
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _before(function, moment):
    @functools.wraps(function)  # Ray checks an actor method's calls against its signature
    def wrapper(*args, **kwargs):
        die_here(moment)
        return function(*args, **kwargs)
    return wrapper


def _after(function, moment):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        die_here(moment)
        return result
    return wrapper


def _patch_worker_group(module):
    # Launching the train function: the moment Ray 2.60 raised as a controller error.
    module.RayTrainWorker.run_train_fn = _before(module.RayTrainWorker.run_train_fn, "group-start")


def _patch_tfenv(module):
    module.tensorflow = _before(module.tensorflow, "tensorflow-import")


def _patch_models(module):
    # After the strategy (its collective) is set up, before the first step's all-reduce.
    module.build = _before(module.build, "before-first-all-reduce")
    module.export_for_serving = _before(module.export_for_serving, "export")


def _patch_worker(module):
    reporter = module.EpochReporter
    on_batch_end, on_test_batch_end = reporter.on_train_batch_end, reporter.on_test_batch_end

    def on_train_batch_end(self, batch, logs=None):
        if batch == 5:
            die_here("mid-epoch")
        return on_batch_end(self, batch, logs)

    def on_validation_batch_end(self, batch, logs=None):
        die_here("validation")
        return on_test_batch_end(self, batch, logs)

    reporter.on_train_batch_end, reporter.on_test_batch_end = on_train_batch_end, on_validation_batch_end
    write_run = module.write_run

    def write_run_then_publish(*args, **kwargs):
        import job.storage
        publish = job.storage.publish

        def publish_killed_after_one_file(*p_args, **p_kwargs):
            def progress(key, done, total):
                if done == 1:
                    die_here("publish")
            result = publish(*p_args, **p_kwargs, progress=progress)
            die_here("published")  # the run complete and latest.json moved, MLflow not told yet
            return result

        job.storage.publish = publish_killed_after_one_file
        try:
            return write_run(*args, **kwargs)
        finally:
            job.storage.publish = publish

    module.write_run = write_run_then_publish


def _patch_keras(module):
    # The chief's final evaluation: Model.evaluate called by write_run (fit's validation is not).
    evaluate = module.Model.evaluate

    def evaluate_(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_name == "write_run":
            die_here("final-evaluation")
        return evaluate(self, *args, **kwargs)

    module.Model.evaluate = evaluate_


def _patch_ray_storage(module):
    # A checkpoint's files copied to storage, not yet registered by Ray Train.
    copy_files = module._pyarrow_fs_copy_files

    @functools.wraps(copy_files)
    def copy_then_die_if_uploading(*args, **kwargs):
        result = copy_files(*args, **kwargs)
        if kwargs.get("destination_filesystem") is not None:
            die_here("checkpoint-upload")
        return result

    module._pyarrow_fs_copy_files = copy_then_die_if_uploading


PATCHES = {
    "ray.train.v2._internal.execution.worker_group.worker": _patch_worker_group,
    "job.tfenv": _patch_tfenv,
    "job.models": _patch_models,
    "job.worker": _patch_worker,
    "tf_keras.src.engine.training": _patch_keras,
    "ray.train.v2._internal.execution.storage": _patch_ray_storage,
}
KILL_POINTS = ("group-start", "tensorflow-import", "before-first-all-reduce", "mid-epoch", "validation",
               "checkpoint-upload", "final-evaluation", "export", "publish", "published")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs a module's patch right after the module itself has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_then_patch
        return spec


if MOMENT:
    if MOMENT not in KILL_POINTS:
        raise SystemExit(f"ALEXNET_JOB_TEST_KILL={MOMENT}: not one of {', '.join(KILL_POINTS)}")
    sys.meta_path.insert(0, _PatchOnImport())
