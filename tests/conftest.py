"""Fixtures shared by every test layer, and a temporary folder of the session's own."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from support import MNIST

# Every process the tests start puts its temporary files here, not in the machine's /tmp: Ray's
# session folders, TensorFlow's autograph files, SeaweedFS's logs, Python's multiprocessing
# folders, and whatever a process killed on purpose (SIGKILL cannot be cleaned up after) leaves
# behind. Removed when the session ends. Short, for Ray's unix sockets (at most 107 bytes a path).
SESSION_TMP = Path(tempfile.mkdtemp(prefix="aj-"))
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = None  # computed again, from TMPDIR


def pytest_sessionfinish(session, exitstatus):
    # Never into a file system mounted below it (a node's leftover mount): the e2e teardown tests
    # report those; removing through one would delete what it shows.
    with open("/proc/self/mountinfo") as mounts:
        mounted = [line.split()[4] for line in mounts if line.split()[4].startswith(f"{SESSION_TMP}/")]
    if mounted:
        print(f"\nleft {SESSION_TMP} in place: {', '.join(mounted)} mounted below it")
    else:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_dir():
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST files missing at {MNIST}: the project expects ../shared beside the clone")
    return MNIST
