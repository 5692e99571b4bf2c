"""The promotion gate and latest.json: does latest.json move to a new run, and moving it safely.

latest.json names the newest complete run. It only moves forward in publish time, with a gate
(`--promote-if-better METRIC[:TOLERANCE]`) only if the metric holds up, and always by a
conditional write, deciding again whenever another publisher got there first. The decision is
recorded in the new run's manifest (docs/storage.md: latest.json, the promotion gate).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from job.storage.errors import StorageError
from job.storage.layout import LATEST, is_run_name, manifest_key
from job.storage.manifest import dump_json, load_json, metric_value, utc_now
from job.storage.stores import Store

LATEST_RACE_ATTEMPTS = 20  # re-reads of latest.json after losing a conditional write
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass(frozen=True)
class Gate:
    """`METRIC[:TOLERANCE]`: latest moves only if new METRIC >= latest's METRIC - TOLERANCE
    (higher is better)."""

    metric: str
    tolerance: float = 0.0

    def __str__(self) -> str:
        return f"{self.metric}:{self.tolerance:g}"


def parse_gate(spec: str) -> Gate:
    metric, _, tolerance = spec.strip().partition(":")
    try:
        value = float(tolerance) if tolerance else 0.0
    except ValueError:
        value = -1.0
    if not _METRIC.fullmatch(metric) or not (value >= 0 and math.isfinite(value)):
        raise StorageError(
            f"invalid promotion gate {spec!r}: expected METRIC[:TOLERANCE] with TOLERANCE >= 0, e.g. test_accuracy:0.002"
        )
    return Gate(metric, value)


@dataclass(frozen=True)
class Latest:
    """What latest.json names now, read with the tag a conditional write needs."""

    tag: str | None
    run: str | None = None
    manifest: dict | None = None  # None when latest.json is absent or its run has no manifest


def decide(run: str, manifest: dict, gate: Gate | None, current: Latest) -> dict:
    """The promotion record: does latest.json move to `run`? Latest only moves forward in publish
    time, and with a gate only if the metric holds up."""
    record: dict[str, Any] = {"gate": str(gate) if gate else None, "latest_run": current.run}
    if gate:
        record.update(metric=gate.metric, tolerance=gate.tolerance, value=metric_value(manifest.get("metrics"), gate.metric))
    if current.run is None or current.manifest is None:
        note = "no latest run yet" if current.run is None else f"latest run '{current.run}' has no manifest"
        return {**record, "promoted": True, "reason": note}
    theirs = metric_value(current.manifest.get("metrics"), gate.metric) if gate else None
    if gate:
        record["latest_value"] = theirs
    if current.run == run:
        return {**record, "promoted": True, "reason": "already the latest run"}
    if (current.manifest.get("published_at", ""), current.run) > (manifest["published_at"], run):
        return {**record, "promoted": False, "reason": f"latest run '{current.run}' is newer"}
    if not gate:
        return {**record, "promoted": True, "reason": f"newer than latest run '{current.run}'"}
    if theirs is None:
        return {**record, "promoted": True, "reason": f"latest run '{current.run}' has no {gate.metric}"}
    ok = record["value"] >= theirs - gate.tolerance - 1e-12  # inclusive, forgiving float rounding
    sign = ">=" if ok else "<"
    reason = f"{gate.metric} {record['value']:.6g} {sign} {theirs:.6g} - {gate.tolerance:g} of latest run '{current.run}'"
    return {**record, "promoted": ok, "reason": reason}


def read_latest(store: Store) -> Latest:
    data, tag = store.read_tagged(LATEST)
    if data is None:
        return Latest(tag=None)
    name = load_json(data, store.uri(LATEST)).get("run")
    if not is_run_name(name):
        raise StorageError(f"{store.uri(LATEST)} does not name a run: delete or repair it")
    manifest = store.read(manifest_key(name))
    return Latest(tag=tag, run=name, manifest=load_json(manifest, store.uri(manifest_key(name))) if manifest else None)


def move_latest(store: Store, run: str, manifest: dict, gate: Gate | None, sealed: bool) -> tuple[dict, str | None]:
    """Seal the manifest (first publish) with the promotion decision, then move latest.json with a
    conditional write, deciding again whenever another publisher got there first.

    A re-publish of a complete run keeps its recorded decision, unless that decision was to
    promote and latest.json still names an older run (the first publish stopped before moving it)."""
    owns_record = not sealed  # this call made (or now remakes) the decision in the manifest
    for _ in range(LATEST_RACE_ATTEMPTS):
        current = read_latest(store)
        decision = decide(run, manifest, gate, current)
        recorded = manifest.get("promotion")
        if not owns_record:
            unfinished = recorded is None or (recorded.get("promoted") and decision["promoted"] and current.run != run)
            if not unfinished:
                return recorded, current.run
        if not sealed or recorded != decision:
            manifest["promotion"] = decision
            if sealed:
                store.write(manifest_key(run), dump_json(manifest))
            else:
                store.seal_run(run, dump_json(manifest))
                sealed = True
            owns_record = True
        if current.run == run or not decision["promoted"]:
            return decision, current.run
        pointer = {"run": run, "manifest": manifest_key(run),
                   "published_at": manifest["published_at"], "updated_at": utc_now()}
        if store.write_if(LATEST, dump_json(pointer), current.tag):
            return decision, run
        time.sleep(random.uniform(0.05, 0.3))  # lost the race: read the new latest.json and decide again
    raise StorageError(
        f"{store.uri(LATEST)} kept changing while publishing run {run}: the run is complete but latest.json was "
        "not moved; publish it again"
    )
