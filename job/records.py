"""What a run records beside its checkpoints, in <output>/checkpoints/<run>/: its attempts,
their failures and the bad images its workers skipped.

Each attempt of a run (a worker-group restart, or the same command run again) appends a record to
attempts/ when its chief starts, and the Train controller's failure policy one to failures/ when
it fails (a step watchdog adds its own first). Each process writes a file of its own in those
folders (<host>-<pid>.jsonl); readers merge them in time order. The chief gathers them all
into metrics.json. The driver, the controller and the workers all write here, so this module
imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time

from job import storage
from job.errors import DataError


def append_record(config, name: str, entry: dict) -> None:
    """Add `entry` as the last line of this process's part of the run's `name` records."""
    filesystem, root = _filesystem(config.output)
    folder = f"{root}/{config.run_name}/{name}"
    path = f"{folder}/{WRITER}.jsonl"
    with _lock:
        # Object stores cannot append: this process rewrites its own file, which no other process
        # writes (the driver, the controller and each worker have one each), so no line is lost
        # to two writers at once. Through a temporary file and a rename: a reader sees it whole.
        lines = _written.setdefault(path, [])
        lines.append(json.dumps(entry).encode() + b"\n")
        storage.replace_file(filesystem, path, b"".join(lines))


def read_records(config, name: str) -> list[dict]:
    """Every process's `name` records of the run, in time order ([] before the first)."""
    import pyarrow.fs as pafs

    filesystem, root = _filesystem(config.output)
    found = filesystem.get_file_info(pafs.FileSelector(f"{root}/{config.run_name}/{name}", allow_not_found=True))
    records = []
    for info in found:
        if info.type == pafs.FileType.File and info.base_name.endswith(".jsonl"):
            with filesystem.open_input_stream(info.path) as handle:
                records += [json.loads(line) for line in handle.read().splitlines() if line.strip()]
    return sorted(records, key=lambda r: next((r[k] for k in TIME_KEYS if r.get(k) is not None), 0))


# Which field says when a record happened: attempts, failures, bad images.
TIME_KEYS = ("started_at", "failed_at", "at")
# This process's records file: one per process, named after its host and pid.
WRITER = f"{socket.gethostname()}-{os.getpid()}"
_written: dict[str, list[bytes]] = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _filesystem(output: str):
    """(filesystem, path) of the output's checkpoints folder: one client per process and output."""
    return storage.arrow_filesystem(storage.checkpoints_uri(output))


def bad_image_reporter(config, rank: int):
    """What a worker does with an image it cannot read or decode: name it, record it beside
    the checkpoints (the chief gathers every worker's into metrics.json), and go on, or stop
    the run if config.bad_images says fail."""
    def report(image: str, reason: str) -> None:
        if config.bad_images == "fail":
            raise DataError(f"bad image {image}: {reason} (--bad-images skip would skip it)")
        print(f"skipped bad image {image}: {reason}", flush=True)
        append_record(config, f"bad-images-{rank}", {"image": image, "reason": reason, "at": time.time()})

    return report


def bad_images(config) -> dict:
    """Every bad image any worker of any attempt of this run skipped, each once."""
    found = {}
    for rank in range(config.workers):
        for record in read_records(config, f"bad-images-{rank}"):
            found.setdefault(record["image"], record["reason"])
    return {"count": len(found), "images": [{"image": image, "reason": reason} for image, reason in sorted(found.items())]}


def attempt_history(config) -> list[dict]:
    """Every attempt: when it started, where it resumed from, and when and why it ended.

    An attempt starts when its chief does (attempts/) and ends at a failure Ray Train
    decided on (failures/); a step watchdog's reason (`ends_attempt` false) joins the
    failure that follows it. A failure with no attempt started since the one before it lost a
    worker before the chief began: an attempt of its own, with no start or checkpoint.
    """
    events = sorted([(a["started_at"], 1, a) for a in read_records(config, "attempts")]
                    + [(f["failed_at"], 0, f) for f in read_records(config, "failures")], key=lambda e: e[:2])
    history, current, reasons = [], None, []
    for _, is_start, record in events:
        if is_start:
            current = dict(record)
            history.append(current)
        elif record.get("ends_attempt", True):
            if current is None:
                current = {"started_at": None, "resumed_from": None}
                history.append(current)
            current.update({k: v for k, v in record.items() if k != "ends_attempt"},
                           error="; ".join([*reasons, record["error"]]))
            current, reasons = None, []
        else:
            reasons.append(record["error"])
    for attempt in history[:-1]:
        attempt.setdefault("error", "stopped without a recorded failure (driver or cluster gone)")
    return history
