"""How far a running run is: a small record the chief keeps in the run's storage while it trains,
`<output>/checkpoints/<run>/progress.json`, read back by `status` and `runs list`.

The chief writes it from a thread of its own (an object store write takes tens of milliseconds;
a step must not wait for it), at most every WRITE_EVERY_SECONDS and at each epoch's end. Like
job.records it imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import json
import threading
import time

from job import storage

FILE = "progress.json"
WRITE_EVERY_SECONDS = 10.0
# A record not rewritten for this long belongs to a run whose workers are gone (stopped,
# failed for good, or its cluster deleted): shown as stopped, not as running.
STALE_AFTER_SECONDS = 120.0


def uri(output: str, run_name: str) -> str:
    return f"{storage.checkpoints_uri(output)}/{run_name}/{FILE}"


class Writer:
    """The chief's progress record: `put` the newest state, a thread writes it (the newest only)."""

    def __init__(self, output: str, run_name: str):
        self.filesystem, self.path = storage.arrow_filesystem(uri(output, run_name))
        self.pending: dict | None = None
        self.closed = False
        self.failed = False
        self.written_at = 0.0
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._write_pending, name="progress-writer", daemon=True)
        self.thread.start()

    def due(self) -> bool:
        return time.time() - self.written_at >= WRITE_EVERY_SECONDS

    def put(self, record: dict) -> None:
        self.written_at = time.time()
        with self.changed:
            self.pending = {**record, "updated_at": self.written_at}
            self.changed.notify()

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.thread.join(timeout=30)

    def _write_pending(self) -> None:
        while True:
            with self.changed:
                while self.pending is None and not self.closed:
                    self.changed.wait()
                record, self.pending = self.pending, None
                if record is None:
                    return
            try:
                storage.replace_file(self.filesystem, self.path, json.dumps(record).encode())
            except OSError as error:
                if not self.failed:  # training goes on without it; said once
                    print(f"warning: cannot write the progress record {self.path}: {error}", flush=True)
                self.failed = True


def read(output: str, run_name: str) -> dict | None:
    """The run's progress record, or None before its chief wrote one (or if it cannot be read)."""
    try:
        filesystem, path = storage.arrow_filesystem(uri(output, run_name))
        with filesystem.open_input_stream(path) as handle:
            return json.loads(handle.read())
    except (OSError, ValueError, storage.StorageError):
        return None


def unfinished(output: str, published: set[str]) -> list[dict]:
    """Progress records of runs under `output` not (yet) published, newest first."""
    import pyarrow.fs as pafs
    try:
        filesystem, root = storage.arrow_filesystem(storage.checkpoints_uri(output))
        folders = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, storage.StorageError):
        return []
    records = []
    for folder in folders:
        name = folder.base_name
        if folder.type == pafs.FileType.Directory and name not in published:
            record = read(output, name)
            if record:
                records.append({**record, "run": name})
    return sorted(records, key=lambda r: -r.get("updated_at", 0))


def state(record: dict, now: float | None = None) -> str:
    """training, evaluating, publishing or published; `stopped` when no worker updates it any more."""
    if record["state"] != "published" and (now or time.time()) - record["updated_at"] > STALE_AFTER_SECONDS:
        return "stopped"
    return record["state"]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def describe(record: dict, now: float | None = None) -> str:
    """One line: `training: epoch 2/5, step 120/210, loss 0.1234, accuracy 0.9612, 1180 img/s,
    elapsed 1m40s, ETA 2m05s (updated 3s ago)`."""
    now = now or time.time()
    parts = [f"epoch {record['epoch']}/{record['epochs']}", f"step {record['step']}/{record['steps_per_epoch']}"]
    for key in ("loss", "accuracy"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("images_per_second"):
        parts.append(f"{record['images_per_second']:.0f} img/s")
    parts.append(f"elapsed {duration(record.get('elapsed_seconds'))}")
    current = state(record, now)
    if current in ("training", "evaluating"):
        parts.append(f"ETA {duration(record.get('eta_seconds'))}")
    return f"{current}: {', '.join(parts)} (updated {duration(now - record['updated_at'])} ago)"
