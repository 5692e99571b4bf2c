"""What a run makes of its failures: the failure policy's decisions and records, the attempts
metrics.json lists, and the line a spent budget ends with."""

from job import records
from job.config import Config


def test_every_attempt_is_listed_with_why_it_ended(tmp_path):
    config = Config(output=str(tmp_path), run_name="r")
    add = records.append_record
    add(config, "failures", {"failed_at": 10, "error": "while the worker group started: actor died", "retried": True})
    add(config, "attempts", {"started_at": 20, "resumed_from": None})
    add(config, "failures", {"failed_at": 30, "error": "rank 1: no training step finished", "ends_attempt": False})
    add(config, "failures", {"failed_at": 31, "error": "rank 1: actor died", "retried": True})
    add(config, "attempts", {"started_at": 40, "resumed_from": {"epoch": 1, "step": 0}})
    add(config, "attempts", {"started_at": 50, "resumed_from": {"epoch": 2, "step": 0}})
    assert records.attempt_history(config) == [
        # lost before its chief started: an attempt of its own
        {"started_at": None, "resumed_from": None, "failed_at": 10, "retried": True,
         "error": "while the worker group started: actor died"},
        # the watchdog's reason joins the failure Ray Train acted on
        {"started_at": 20, "resumed_from": None, "failed_at": 31, "retried": True,
         "error": "rank 1: no training step finished; rank 1: actor died"},
        {"started_at": 40, "resumed_from": {"epoch": 1, "step": 0},
         "error": "stopped without a recorded failure (driver or cluster gone)"},
        {"started_at": 50, "resumed_from": {"epoch": 2, "step": 0}},
    ]


def test_a_spent_budget_says_how_many_failures_and_which_checkpoint_is_kept(tmp_path):
    from ray.train import ControllerError, WorkerGroupError

    from job import train
    config = Config(output=str(tmp_path), run_name="r", max_failures=1)
    records.append_record(config, "failures", {"failed_at": 5, "error": "from an earlier command", "retried": True})
    records.append_record(config, "failures", {"failed_at": 11, "error": "rank 1: actor died", "retried": True})
    records.append_record(config, "failures", {"failed_at": 12, "error": "rank 0: actor died", "retried": False})
    lost = WorkerGroupError("rank 0 died", {0: RuntimeError("The actor died")})
    assert train.failed_for_good(config, lost, 10, {"epoch": 2, "step": 40}) == (
        "training failed 2 times, more than --max-failures 1 allows; the last time: rank 0: actor died; "
        "the checkpoint of epoch 2 step 40 is kept: run the same command again to resume from it")
    bad_image = WorkerGroupError("", {1: RuntimeError("Traceback ...\njob.errors.DataError: bad image x.jpg: truncated")})
    assert train.failed_for_good(config, bad_image, 10, None) == "training failed: rank 0: actor died"
    assert train.failed_for_good(config, ControllerError(ValueError("bug")), 13, None) == "training failed: ValueError: bug"


def test_the_policy_counts_a_worker_lost_at_start_and_never_retries_a_users_error(tmp_path):
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError, FailureConfig, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from job import train
    config = Config(output=str(tmp_path), run_name="r", max_failures=2)
    policy = train.failure_policy(config, FailureConfig(max_failures=2))
    lost_at_start = ControllerError(ActorDiedError())  # what Ray 2.60 raises: not retried by its own policy
    waited = ControllerError(WorkerGroupStartupTimeoutError(2))  # nodes still coming: retried, not a failure
    decisions = [policy.make_decision(training_failed_error=error) for error in
                 (lost_at_start, waited, WorkerGroupError("", {1: RuntimeError("died")}), lost_at_start)]
    assert decisions == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
    failures = records.read_records(config, "failures")
    assert [(f["retried"], f["error"].split(":")[0]) for f in failures] == [
        (True, "while the worker group started"), (True, "rank 1"), (False, "while the worker group started")]

    fresh = train.failure_policy(config, FailureConfig(max_failures=2))
    bad_image = WorkerGroupError("", {0: RuntimeError("Traceback ...\njob.errors.DataError: bad image x.jpg")})
    assert fresh.make_decision(training_failed_error=bad_image) == FailureDecision.RAISE


def test_two_processes_writing_at_once_lose_no_record(tmp_path):
    """Each process appends to a file of its own; before, both rewrote one file and a line could go."""
    import multiprocessing

    config = Config(output=str(tmp_path), run_name="r")
    context = multiprocessing.get_context("spawn")  # fresh processes: each its own records file
    writers = [context.Process(target=_write_failures, args=(str(tmp_path), rank)) for rank in (0, 1)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    failures = records.read_records(config, "failures")
    assert sorted((f["rank"], f["n"]) for f in failures) == [(rank, n) for rank in (0, 1) for n in range(20)]
    assert [f["failed_at"] for f in failures] == sorted(f["failed_at"] for f in failures)  # in time order
    assert len(list((tmp_path / "checkpoints" / "r" / "failures").glob("*.jsonl"))) == 2


def _write_failures(output, rank):
    import time
    config = Config(output=output, run_name="r")
    for n in range(20):
        records.append_record(config, "failures", {"failed_at": time.time(), "error": "x", "rank": rank, "n": n})
