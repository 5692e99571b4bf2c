"""The layout of an output location, and the one rule for run names.

    <output>/runs/<run>/...             the run's files, uploaded first
    <output>/runs/<run>/manifest.json   written last: every file's key, size and sha256, plus
                                        what the trainer adds (versions, data, times, metrics)
                                        and the promotion decision. No manifest = incomplete.
    <output>/latest.json                names the newest complete run; moved by a conditional
                                        write (If-Match / If-None-Match, a lock file locally)
    <output>/checkpoints/<run>/         Ray Train checkpoints (see checkpoints_uri)

Keys are '/'-separated paths under the output, as a store (job.storage.stores) takes them.
"""

from __future__ import annotations

import re

from job.storage.errors import StorageError
from job.storage.locations import parse_location

RUNS = "runs"  # <output>/runs/<run>/: the published runs
CHECKPOINTS = "checkpoints"  # <output>/checkpoints/<run>/: Ray Train's storage, and what a run keeps beside it
MANIFEST = "manifest.json"  # last object of a run; its presence means "complete"
LATEST = "latest.json"  # at the output root: names the newest complete run

# A run's name is a DNS label: a scheduled RayJob names its run after itself, and the chart's
# release names its run, so one name must suit both. `train` (job.config) and storage check this
# rule; scripts/chart-docs copies it into the chart's values.schema.json.
RUN_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
RUN_NAME_RULE = "lowercase letters, digits, '-' and '.', at most 63 characters, starting and ending with a letter or digit"


def is_run_name(name: object) -> bool:
    return isinstance(name, str) and RUN_NAME.fullmatch(name) is not None


def check_run_name(run_name: str) -> None:
    if not is_run_name(run_name):
        raise StorageError(f"invalid run name {run_name!r}: use {RUN_NAME_RULE}")


def run_key(run: str, key: str = "") -> str:
    """`runs/<run>`, or `runs/<run>/<key>` for a file of the run."""
    return f"{RUNS}/{run}/{key}" if key else f"{RUNS}/{run}"


def manifest_key(run: str) -> str:
    return run_key(run, MANIFEST)


def run_uri(output: str, run_name: str) -> str:
    """Where a run lives: `<output>/runs/<run_name>`."""
    check_run_name(run_name)
    return parse_location(output).child(RUNS, run_name).uri


def checkpoints_uri(output: str) -> str:
    """Ray Train's storage_path for an output: `<output>/checkpoints` (RunConfig name = run name)."""
    return parse_location(output).child(CHECKPOINTS).uri
