"""The step watchdog: a worker whose training steps stop finishing ends its own process.

A peer that is alive but stuck (a hung GPU, a kernel or collective that never returns) holds
every worker inside an all-reduce, in C++, where no Python exception can reach the training
thread, and TensorFlow's heartbeats still say it is healthy. A thread that notices the steps
have stopped can only end the process; Ray Train then sees a worker die and restarts the whole
group (the stuck peer too) from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_CODE = 70  # EX_SOFTWARE


class StepWatchdog:
    """Ends this process once no step has finished for `timeout` seconds (None: never).

    `beat()` marks a finished step (or report) and arms it: nothing is timed before the first
    step, which traces the model. Leaving `with watchdog:` disarms it until the next beat, so a
    fit's end (the chief then evaluates and publishes) and a failed step are not timed. On expiry
    it prints one line to stderr, gives `on_expiry(line)` up to `grace` seconds to record it,
    and exits at once.
    """

    def __init__(self, timeout: float | None, on_expiry=None, *, grace: float = 30, exit=os._exit):
        self.timeout, self.on_expiry, self.grace, self.exit = timeout, on_expiry, grace, exit
        self.last_beat: float | None = None
        if timeout is not None:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def __enter__(self) -> "StepWatchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.last_beat = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 10))
            last = self.last_beat  # once: the training thread may disarm meanwhile
            if last is not None and time.monotonic() - last > self.timeout:
                break
        line = (f"no training step finished for {self.timeout:g} s: a peer is silent or stuck; "
                "failing this worker so Ray restarts the group from the last checkpoint")
        print(line, file=sys.stderr, flush=True)
        if self.on_expiry:  # best effort, and bounded: storage may be what hangs
            recorder = threading.Thread(target=self.on_expiry, args=(line,), daemon=True)
            recorder.start()
            recorder.join(self.grace)
        self.exit(EXIT_CODE)
