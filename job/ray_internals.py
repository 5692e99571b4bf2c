"""Every piece of Ray Train's private API the product uses, in one place (Ray 2.60).

Ray Train offers no public way to do these; each is named with what it does for us, and
tests/unit/test_ray_internals.py checks every one against the installed Ray, so an upgrade that
moves or changes one fails there, loudly, rather than in a user's run:

- the failure policy the Train controller consults (job/train.py: a worker lost while its group
  starts is retried and counted; a user's error is not retried);
- the worker-group callback that releases a group Ray abandoned (job/train.py);
- two methods of the trainer that fit() calls: where the controller is made (to hand it our
  policy) and where the driver first sees it (to abort it at the deadline);
- how Ray's state export names a TensorFlow backend (job/tf_config.py);
- the logger Ray Train's worker-side report line comes from (job/worker.py silences it);
- the errors Ray Train's health check reports for a worker whose process is gone or hangs
  (job/train.py names such a worker first when a group fails).

Imports are inside the functions: the driver and the controller import Ray lazily.
"""

from __future__ import annotations

# The Ray release these were read from (`pyproject.toml` pins it; the test compares).
RAY_VERSION = "2.60.0"
# DataParallelTrainer methods job/train.py overrides, and the keyword it sets in the first.
CONTROLLER_FACTORY = "_initialize_and_run_controller"
CONTROLLER_SEEN = "_register_sigint_handler"
FAILURE_POLICY_KEYWORD = "failure_policy"


def failure_handling():
    """(DefaultFailurePolicy, FailureDecision, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    return DefaultFailurePolicy, FailureDecision, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError


def worker_group_callback():
    """The base class of a callback the controller calls around each worker group's start."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    return WorkerGroupCallback


def tensorflow_framework():
    """What a backend config's `framework` returns for TensorFlow."""
    from ray.train.v2._internal.util import TrainingFramework
    return TrainingFramework.TENSORFLOW


def worker_report_logger():
    """The logger of Ray Train's per-report INFO line on each worker (named after its file)."""
    from ray.train.v2._internal.execution import context
    return context.logger


def worker_lost_errors() -> tuple[type, ...]:
    """What Ray Train's health check puts in a worker group's failures for a worker whose
    process died or stopped answering (not an error its training code raised)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
    return WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
