"""Runs in storage: a local folder or `s3://bucket/prefix` on any S3-compatible server.

docs/storage.md explains the layout, the manifest, latest.json and the S3 settings for users.
This package knows nothing of TensorFlow, Ray or the command line. Every failure a user can
cause or fix (bad URI, credentials, missing bucket, unreachable endpoint, ...) is a StorageError
whose message is one line that never contains a credential. One job a module, each using only
those above it:

    errors       StorageError; S3's failures as one line each, and which ones are worth retrying
    locations    Location, parse_location: a local directory or an S3 prefix
    layout       runs/<run>/, manifest.json, latest.json, checkpoints/; the run-name rule; run_uri
    s3           S3Settings from the environment and the AWS profile; the boto3 client
    manifest     a run's files hashed; the manifest built and read
    stores       Store: one interface over a local folder and an S3 prefix; open_store, check_access
    gate         the promotion gate; the decision and latest.json's conditional move
    publishing   publish, finish_publish
    runs         list_runs, show_run, download_run, run_state
    cache        resolve_model: a run as a local folder, s3:// runs downloaded once into the cache
    objects      open_input, read_bytes, replace_file, arrow_filesystem (Ray Train), object_store

Below are the names callers use; the modules' other public names are for each other and tests.
"""

from job.storage.cache import resolve_model
from job.storage.errors import StorageError
from job.storage.gate import Gate, parse_gate
from job.storage.layout import checkpoints_uri, run_uri
from job.storage.locations import Location, parse_location
from job.storage.objects import arrow_filesystem, object_store, open_input, read_bytes, replace_file
from job.storage.publishing import PublishResult, finish_publish, publish
from job.storage.runs import RunInfo, download_run, list_runs, run_state, show_run
from job.storage.s3 import S3Settings, s3_settings
from job.storage.stores import Store, check_access, open_store

__all__ = [
    "Gate", "Location", "PublishResult", "RunInfo", "S3Settings", "Store", "StorageError",
    "arrow_filesystem", "check_access", "checkpoints_uri", "download_run", "finish_publish", "list_runs",
    "object_store", "open_input", "open_store", "parse_gate", "parse_location", "publish", "read_bytes",
    "replace_file", "resolve_model", "run_state", "run_uri", "s3_settings", "show_run",
]
