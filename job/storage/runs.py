"""Reading runs back: list them, show a manifest, download a complete run, say what state a run
is in. A run without manifest.json is incomplete: listed as such, and refused everywhere else.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from job.storage.errors import StorageError
from job.storage.layout import LATEST, MANIFEST, RUNS, check_run_name, is_run_name, manifest_key, run_key
from job.storage.locations import Location, parse_location
from job.storage.manifest import FILE_WORKERS, dump_json, hash_file, load_json, metric_value
from job.storage.stores import Store, open_store


@dataclass(frozen=True)
class RunInfo:
    run: str
    uri: str
    complete: bool
    latest: bool
    time: str | None  # published_at (UTC, ISO 8601)
    test_accuracy: float | None


def list_runs(output: str) -> list[RunInfo]:
    """Every run under `<output>/runs/`, oldest first (incomplete ones last)."""
    with open_store(output) as store:
        store.check(create=False)
        latest_doc = store.read(LATEST)
        latest = load_json(latest_doc, store.uri(LATEST)).get("run") if latest_doc else None
        names = store.run_names()
        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS * 2) as pool:
            manifests = list(pool.map(lambda n: store.read(manifest_key(n)), names))
        rows = []
        for name, data in zip(names, manifests):
            manifest = load_json(data, store.uri(manifest_key(name))) if data else {}
            rows.append(RunInfo(
                run=name, uri=store.uri(run_key(name)), complete=data is not None, latest=name == latest,
                time=manifest.get("published_at"), test_accuracy=metric_value(manifest.get("metrics"), "test_accuracy"),
            ))
    return sorted(rows, key=lambda r: (r.time is None, r.time or "", r.run))


def split_run_ref(ref: str) -> tuple[Location, str | None]:
    """`<output>/runs/<run>` -> (output, run); `<output>/latest` -> (output, None)."""
    loc = parse_location(ref)
    if loc.name in ("latest", LATEST):
        return loc.parent, None
    if loc.parent.name == RUNS and is_run_name(loc.name):
        return loc.parent.parent, loc.name
    raise StorageError(f"'{ref}' is not a run: expected <output>/runs/<run-name> or <output>/latest")


def complete_manifest(store: Store, run: str | None) -> tuple[str, dict]:
    """The run's name and manifest (run None: the one latest.json names); incomplete runs refused."""
    if run is None:
        data = store.read(LATEST)
        if data is None:
            raise StorageError(f"{store.uri(LATEST)} does not exist: no run has been published there")
        run = load_json(data, store.uri(LATEST)).get("run")
        if not is_run_name(run):
            raise StorageError(f"{store.uri(LATEST)} does not name a run: delete or repair it")
    data = store.read(manifest_key(run))
    if data is None:
        state = "is incomplete (no manifest.json: interrupted or still publishing)" if store.run_exists(run) else "does not exist"
        raise StorageError(f"run {store.uri(run_key(run))} {state}")
    return run, load_json(data, store.uri(manifest_key(run)))


def show_run(run_uri: str) -> dict:
    """The manifest of a complete run (`<output>/runs/<run>` or `<output>/latest`)."""
    output, run = split_run_ref(run_uri)
    with open_store(output) as store:
        return complete_manifest(store, run)[1]


def download_run(run_uri: str, dest_dir: str | os.PathLike) -> Path:
    """Copy a complete run into dest_dir (which must not exist or be empty), every file checked
    against the manifest; dest_dir appears only when everything is there and verified."""
    output, run = split_run_ref(run_uri)
    dest = Path(dest_dir).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StorageError(f"{dest} already exists and is not an empty directory: choose another destination")
    with open_store(output) as store:
        run, manifest = complete_manifest(store, run)
        download_into(store, run, manifest, dest)
    return dest


def download_into(store: Store, run: str, manifest: dict, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        raise StorageError(f"cannot create {dest}: {exc.strerror}") from None
    try:
        def fetch(entry: dict) -> None:
            target = staging / entry["key"]
            if not Path(os.path.normpath(target)).is_relative_to(staging):
                raise StorageError(f"manifest of run {run} has an unsafe key {entry['key']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            store.fetch(run_key(run, entry['key']), str(target))
            if hash_file(str(target)) != (entry["size"], entry["sha256"]):
                raise StorageError(
                    f"{store.uri(run_key(run, entry['key']))} does not match its manifest (size or sha256): "
                    "the run is damaged"
                )

        with concurrent.futures.ThreadPoolExecutor(FILE_WORKERS) as pool:
            list(pool.map(fetch, manifest.get("files", [])))
        (staging / MANIFEST).write_bytes(dump_json(manifest))
        if dest.is_dir():
            dest.rmdir()  # empty (checked by the caller); the rename below needs it gone
        os.rename(staging, dest)
    except OSError as exc:
        raise StorageError(f"cannot write the run into {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the run's state ---------------------------------------------------------------------------
def run_state(output: str, run_name: str) -> str:
    """'complete' (manifest present), 'incomplete' (files without a manifest) or 'absent'."""
    check_run_name(run_name)
    with open_store(output) as store:
        if store.read(manifest_key(run_name)) is not None:
            return "complete"
        return "incomplete" if store.run_exists(run_name) else "absent"
