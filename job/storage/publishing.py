"""Publishing a finished run: its files, then manifest.json, then (maybe) latest.json.

A run without a manifest is incomplete and never used; publishing it again completes it,
sending only what is not already there. Publishing a complete run again changes nothing but a
latest.json left behind by an interrupted publish (job.storage.gate moves it).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from job.storage.errors import StorageError
from job.storage.gate import Gate, move_latest, parse_gate
from job.storage.layout import MANIFEST, check_run_name, manifest_key, run_key
from job.storage.manifest import RESERVED_KEYS, file_table, load_json, metric_value, new_manifest, scan
from job.storage.stores import Store, open_store


@dataclass(frozen=True)
class PublishResult:
    run: str
    run_uri: str
    files: int
    bytes: int
    uploaded: int  # files sent by this call (0 when the run was already complete)
    already_complete: bool  # the run had a manifest before this call
    promoted: bool  # latest.json names this run after this call
    latest: str | None  # the run latest.json names after this call
    promotion: dict = field(default_factory=dict)  # the decision recorded in the manifest

    @property
    def message(self) -> str:
        """One line for the command's output."""
        what = "was already published" if self.already_complete else "published"
        size = f"{self.files} files, {self.bytes / 1e6:.1f} MB"
        pointer = f"latest.json -> {self.run}" if self.promoted else f"latest.json unchanged ({self.latest})"
        return f"run {self.run} {what} at {self.run_uri} ({size}); {pointer}: {self.promotion.get('reason', '')}"


def publish(
    local_run_dir: str | os.PathLike,
    output: str,
    run_name: str,
    *,
    manifest_extra: dict,
    promote_if_better: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PublishResult:
    """Publish a finished run: its files, then manifest.json, then (maybe) latest.json.

    manifest_extra goes into the manifest as is (JSON-serialisable; its "metrics" dict is what
    list_runs and the promotion gate read). progress(key, done, total) is called after each file
    is stored and verified. Publishing a complete run again changes nothing but a latest.json
    left behind by an interrupted publish."""
    check_run_name(run_name)
    gate = parse_gate(promote_if_better) if promote_if_better else None
    clash = RESERVED_KEYS & set(manifest_extra)
    if clash:
        raise ValueError(f"manifest_extra must not set {sorted(clash)}")
    if gate and metric_value(manifest_extra.get("metrics"), gate.metric) is None:
        available = sorted(manifest_extra.get("metrics") or {})
        raise StorageError(f"promotion gate needs metric '{gate.metric}', which the run does not have (it has: {available})")
    files = scan(local_run_dir)

    with open_store(output, patient=True) as store:
        store.check(create=True)
        key = manifest_key(run_name)
        existing = store.read(key)
        if existing is not None:
            manifest = load_json(existing, store.uri(key))
            if file_table(manifest) != {f.key: (f.size, f.sha256) for f in files}:
                raise StorageError(
                    f"run {run_name} is already published at {store.uri(run_key(run_name))} with other files: "
                    "publish under a new run name"
                )
            uploaded = 0
        else:
            manifest = new_manifest(run_name, files, manifest_extra)
            _refuse_secrets(manifest, store)
            done, lock = [0], threading.Lock()

            def report(file_key: str) -> None:
                with lock:
                    done[0] += 1
                    if progress:
                        progress(file_key, done[0], len(files))

            uploaded = store.put_run(files, run_name, report)
        return _promote(store, run_name, manifest, gate, uploaded=uploaded, already_complete=existing is not None)


def finish_publish(output: str, run_name: str, *, promote_if_better: str | None = None) -> PublishResult:
    """For a run that is already complete: move latest.json if its publish decided to and was
    stopped before it could (a driver lost in between); otherwise change nothing."""
    gate = parse_gate(promote_if_better) if promote_if_better else None
    with open_store(output, patient=True) as store:
        key = manifest_key(run_name)
        existing = store.read(key)
        if existing is None:
            raise StorageError(f"run {run_name} has no {MANIFEST} at {store.uri(run_key(run_name))}: it is not complete")
        return _promote(store, run_name, load_json(existing, store.uri(key)), gate, uploaded=0, already_complete=True)


def _promote(store: Store, run_name: str, manifest: dict, gate: Gate | None, *, uploaded: int,
             already_complete: bool) -> PublishResult:
    promotion, latest = move_latest(store, run_name, manifest, gate, sealed=already_complete)
    return PublishResult(
        run=run_name, run_uri=store.uri(run_key(run_name)), files=len(manifest["files"]),
        bytes=manifest["total_bytes"], uploaded=uploaded, already_complete=already_complete,
        promoted=latest == run_name, latest=latest, promotion=promotion,
    )


def _refuse_secrets(manifest: dict, store: Store) -> None:
    """A credential must never end up in an artifact: refuse a manifest that contains one."""
    text = json.dumps(manifest)
    if any(len(secret) >= 8 and secret in text for secret in store.secrets()):
        raise StorageError("manifest_extra contains an AWS secret key or session token: refusing to publish it")
