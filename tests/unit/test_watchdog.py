"""The step watchdog, in this process: its thread, its clock, and an exit that only records."""

import threading
import time

from job.watchdog import EXIT_CODE, StepWatchdog


def watchdog(timeout, on_expiry=None):
    exited = threading.Event()
    dog = StepWatchdog(timeout, on_expiry, exit=lambda code: exited.set() if code == EXIT_CODE else None)
    return dog, exited


def test_it_fires_once_steps_stop_after_the_first_and_records_why(capsys):
    recorded = []
    dog, exited = watchdog(0.3, recorded.append)
    assert not exited.wait(0.8), "it timed the time before the first step"
    dog.beat()
    assert exited.wait(3)
    line = ("no training step finished for 0.3 s: a peer is silent or stuck; "
            "failing this worker so Ray restarts the group from the last checkpoint")
    assert recorded == [line]
    assert capsys.readouterr().err == line + "\n"


def test_beats_keep_it_quiet_and_leaving_the_block_disarms_it():
    dog, exited = watchdog(0.3)
    with dog:
        for _ in range(8):
            dog.beat()
            time.sleep(0.1)
    assert not exited.wait(0.8), "it fired after the block ended"
    dog.beat()  # the next fit's first step arms it again
    assert exited.wait(3)


def test_a_recorder_that_hangs_does_not_keep_the_process_alive():
    dog, exited = watchdog(0.2, lambda line: time.sleep(60))
    dog.grace = 0.3
    dog.beat()
    assert exited.wait(3)


def test_no_timeout_means_no_thread():
    before = threading.active_count()
    dog = StepWatchdog(None)
    dog.beat()
    assert threading.active_count() == before
