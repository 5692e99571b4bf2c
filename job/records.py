"""What a run records beside its checkpoints, in <output>/checkpoints/<run>/: its attempts,
their failures and the bad images its workers skipped.

Each attempt of a run (a worker-group restart, or the same command run again) appends a line to
attempts.jsonl when its chief starts, and the Train controller's failure policy one to
failures.jsonl when it fails (a step watchdog adds its own first). The chief gathers them all
into metrics.json. The driver, the controller and the workers all write here, so this module
imports neither TensorFlow nor Ray.
"""

from __future__ import annotations

import json
import os
import socket
import time

from job import storage
from job.errors import DataError


def append_record(config, name: str, entry: dict) -> None:
    """Add `entry` as the last line of the run's <name>.jsonl."""
    filesystem, path = storage.arrow_filesystem(f"{storage.checkpoints_uri(config.output)}/{config.run_name}/{name}.jsonl")
    previous = b"".join(json.dumps(record).encode() + b"\n" for record in read_records(config, name))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # Object stores cannot append: rewrite. Through a file of its own and a rename, so that two
    # writers at once (two workers' watchdogs) leave one whole file, never a mix of both.
    temporary = f"{path}.{socket.gethostname()}-{os.getpid()}"
    with filesystem.open_output_stream(temporary) as out:
        out.write(previous + json.dumps(entry).encode() + b"\n")
    filesystem.move(temporary, path)


def read_records(config, name: str) -> list[dict]:
    """Every entry of the run's <name>.jsonl, oldest first ([] before the first)."""
    filesystem, path = storage.arrow_filesystem(f"{storage.checkpoints_uri(config.output)}/{config.run_name}/{name}.jsonl")
    try:
        with filesystem.open_input_stream(path) as handle:
            return [json.loads(line) for line in handle.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


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

    An attempt starts when its chief does (attempts.jsonl) and ends at a failure Ray Train
    decided on (failures.jsonl); a step watchdog's reason (`ends_attempt` false) joins the
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
