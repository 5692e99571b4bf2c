"""Ray Train's private API the product uses (job/ray_internals.py), checked against the installed
Ray: an upgrade that moves or changes any of it fails here, by name, not in a user's run."""

import inspect
from importlib import metadata

from job import ray_internals


def test_the_installed_ray_is_the_one_the_internals_were_read_from():
    assert metadata.version("ray") == ray_internals.RAY_VERSION, (
        "Ray was upgraded: read every function of job/ray_internals.py against the new release, then "
        "update RAY_VERSION")


def test_the_failure_policy_can_be_subclassed_and_decides_retry_or_raise():
    from ray.train import FailureConfig, WorkerGroupError

    policy_class, decision, startup_failed, startup_timeout = ray_internals.failure_handling()
    assert {d.name for d in decision} >= {"RETRY", "RAISE"}
    assert issubclass(startup_failed, Exception) and issubclass(startup_timeout, Exception)
    policy = policy_class(FailureConfig(max_failures=1))
    lost = WorkerGroupError("lost", {1: RuntimeError("gone")})
    assert policy.make_decision(lost) == decision.RETRY
    assert policy.make_decision(lost) == decision.RAISE  # the budget of 1 is spent


def test_the_worker_group_callback_has_the_hooks_the_release_uses():
    callback = ray_internals.worker_group_callback()
    for hook in ("before_worker_group_start", "after_worker_group_start", "after_worker_group_training_start"):
        assert callable(getattr(callback, hook, None)), hook


def test_the_trainer_methods_overridden_exist_with_the_arguments_used():
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    factory = inspect.signature(getattr(DataParallelTrainer, ray_internals.CONTROLLER_FACTORY))
    assert any(p.kind is p.VAR_KEYWORD for p in factory.parameters.values()), factory
    # fit() passes the policy it made under this keyword, which the override replaces
    source = inspect.getsource(DataParallelTrainer)
    assert f"{ray_internals.FAILURE_POLICY_KEYWORD}=" in source
    assert list(inspect.signature(getattr(DataParallelTrainer, ray_internals.CONTROLLER_SEEN)).parameters) == [
        "self", "controller"]
    assert inspect.iscoroutinefunction(TrainController.abort)  # what abort() calls on the controller


def test_the_tensorflow_framework_and_the_report_logger_exist():
    import logging
    assert str(ray_internals.tensorflow_framework().value).lower() == "tensorflow"
    assert isinstance(ray_internals.worker_report_logger(), logging.Logger)


def test_the_health_check_errors_of_a_lost_worker_exist():
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from job import train
    failed, timed_out = ray_internals.worker_lost_errors()
    assert issubclass(failed, Exception) and issubclass(timed_out, Exception)
    # What a group whose rank 1 died reports: rank 0's collective failed because of it.
    group = WorkerGroupError("", {0: RuntimeError("Traceback ...\nUnavailableError: Collective ops is aborted"),
                                  1: failed("The actor is dead because its worker process has died.", ActorDiedError())})
    reasons = train.failure_reasons(group)
    assert reasons.startswith("rank 1: WorkerHealthCheckFailedError: ") and reasons.count("; ") == 1, reasons
    assert reasons.endswith("; rank 0: UnavailableError: Collective ops is aborted"), reasons
