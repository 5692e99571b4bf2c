"""The model cache: `predict` with an s3:// run downloads it once, verified, and reuses it while
the manifest's files are unchanged. ALEXNET_JOB_CACHE moves it (default ~/.cache/alexnet-job)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from job.storage.errors import StorageError
from job.storage.layout import MANIFEST, RUNS, run_key
from job.storage.locations import parse_location
from job.storage.manifest import file_table, load_json
from job.storage.runs import complete_manifest, download_into, split_run_ref
from job.storage.stores import open_store


def cache_dir() -> Path:
    """Where downloaded runs are kept: ${ALEXNET_JOB_CACHE:-~/.cache/alexnet-job}."""
    return Path(os.environ.get("ALEXNET_JOB_CACHE") or Path.home() / ".cache" / "alexnet-job").expanduser()


def resolve_model(ref: str) -> Path:
    """A local directory holding the run `ref` names: a local run folder (used in place), or an
    s3:// run / `<output>/latest` (downloaded and verified into the cache, reused while the
    manifest's files are unchanged)."""
    loc = parse_location(ref)
    if not loc.is_s3 and (Path(loc.path) / MANIFEST).is_file():
        return Path(loc.path)  # a complete local run folder, wherever it is
    output, run = split_run_ref(ref)
    if not output.is_s3:
        with open_store(output) as store:
            run, _ = complete_manifest(store, run)
            return Path(store.uri(run_key(run)))
    with open_store(output) as store:
        run, manifest = complete_manifest(store, run)
        target = cache_dir() / "s3" / output.bucket / output.path / RUNS / run
        if _cached(target, manifest):
            return target
        fresh = target.with_name(f".{run}.new-{uuid.uuid4().hex[:8]}")
        download_into(store, run, manifest, fresh)
    old = target.with_name(f".{run}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old)
    try:
        os.rename(fresh, target)
    except OSError:  # another process put a copy there meanwhile
        shutil.rmtree(fresh, ignore_errors=True)
        if not _cached(target, manifest):
            raise StorageError(f"cannot update the model cache at {target}: set ALEXNET_JOB_CACHE elsewhere") from None
    shutil.rmtree(old, ignore_errors=True)
    return target


def _cached(target: Path, manifest: dict) -> bool:
    """A cached copy is reused if it holds the manifest's files at their sizes (hashed at download)."""
    try:
        cached = load_json((target / MANIFEST).read_bytes(), str(target / MANIFEST))
    except (OSError, StorageError):
        return False
    if file_table(cached) != file_table(manifest):
        return False
    return all((target / f["key"]).is_file() and (target / f["key"]).stat().st_size == f["size"]
               for f in manifest.get("files", []))
