"""records.attempt_history: the attempts metrics.json lists, from what the run recorded."""

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
