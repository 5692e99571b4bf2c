"""What a run's driver and workers print, saved with the run in `<output>/checkpoints/<run>/logs/`:
`driver-<start>.log` (which holds the workers' lines too, as Ray forwards them) and
`worker-<start>-rank-<rank>.log` (one per worker and attempt). A RayJob's pods, and their logs, go
once it ends; these stay, so `alexnet-job logs` can show them afterwards.

Saved every SAVE_EVERY_SECONDS and when the process ends its run: a process that is killed loses
at most the lines of its last interval. Like job.records it imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import io
import sys
import threading
import time

from job import storage

SAVE_EVERY_SECONDS = 15.0
# Lines that only draw something on a terminal: Ray's progress-bar state updates (a worker's)
# and the bar itself (the driver's, redrawn in place with carriage returns).
NOT_LOGGED = ("__ray_tqdm_magic_token__", "\r")


def folder_uri(output: str, run_name: str) -> str:
    return f"{storage.checkpoints_uri(output)}/{run_name}/logs"


def stamp(at: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(at))


class Keeper:
    """Copies everything this process writes to sys.stdout and sys.stderr into the run's log
    file `name`.log, saved from a thread of its own."""

    def __init__(self, output: str, run_name: str, name: str, first_line: str | None = None):
        self.filesystem, folder = storage.arrow_filesystem(folder_uri(output, run_name))
        self.path = f"{folder}/{name}.log"
        self.chunks: list[str] = [first_line + "\n"] if first_line else []
        self.saved_length = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failed = False
        self.streams = None
        self.thread = threading.Thread(target=self._save_periodically, name="log-keeper", daemon=True)

    def __enter__(self) -> "Keeper":
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        self._save()  # the first line, if any, at once
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee):
                tee.end()
        sys.stdout, sys.stderr = self.streams
        self.stop.set()
        self.thread.join(timeout=30)
        self._save()

    def add(self, line: str) -> None:
        """Log one line (with its newline)."""
        if not any(mark in line.rstrip("\n") for mark in NOT_LOGGED):
            with self.lock:
                self.chunks.append(line)

    def _save_periodically(self) -> None:
        while not self.stop.wait(SAVE_EVERY_SECONDS):
            self._save()

    def _save(self) -> None:
        with self.lock:
            text = "".join(self.chunks)
        if len(text) == self.saved_length or self.failed:
            return
        try:
            storage.replace_file(self.filesystem, self.path, text.encode())
            self.saved_length = len(text)
        except OSError as error:  # the run goes on without its saved log; said once
            self.failed = True
            print(f"warning: cannot save this process's log to {self.path}: {error}", file=self.streams[1], flush=True)


class _Tee(io.TextIOBase):
    """A text stream that writes through to `stream` and hands a copy to the keeper."""

    def __init__(self, stream, keeper: Keeper):
        self.stream, self.keeper = stream, keeper
        self.partial = ""  # print() writes a line's text and its newline separately

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.keeper.add(line + "\n")
        return self.stream.write(text)

    def end(self) -> None:
        if self.partial:
            self.keeper.add(self.partial + "\n")
            self.partial = ""

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return self.stream.encoding


def saved(output: str, run_name: str) -> tuple[str, list[tuple[str, str]]]:
    """(the run's log folder, [(file name, text)] of its saved logs, drivers first, oldest first)."""
    import pyarrow.fs as pafs
    uri = folder_uri(output, run_name)
    filesystem, folder = storage.arrow_filesystem(uri)
    found = [info for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
             if info.type == pafs.FileType.File and info.base_name.endswith(".log")]
    logs = []
    for info in sorted(found, key=lambda i: (not i.base_name.startswith("driver-"), i.base_name)):
        with filesystem.open_input_stream(info.path) as handle:
            logs.append((info.base_name, handle.read().decode(errors="replace")))
    return uri, logs
