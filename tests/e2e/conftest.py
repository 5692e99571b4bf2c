"""The e2e layer's session fixture: one real, loopback-only control plane (see e2elib.py), the
project's image built from the Dockerfile (image.py), and a real node running it (node.py), all
started by session.py.

If any of them cannot be built or started, the fixture fails with the reason: the e2e tests never
skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import ControlPlaneError  # noqa: E402
from e2elib import TIMINGS  # noqa: E402
from image import ImageError  # noqa: E402
from session import start_e2e  # noqa: E402


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    try:
        env = start_e2e(tmp_path_factory.mktemp("e2e"), TIMINGS)
    except Exception as error:  # noqa: BLE001 - whatever it is, fail with the reason; never skip
        reason = str(error) if isinstance(error, (ControlPlaneError, ImageError)) else f"{type(error).__name__}: {error}"
        pytest.fail(f"the e2e cluster did not start: {reason}", pytrace=False)
    try:
        yield env
    finally:
        env.stop()


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "e2e cluster")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f}s")
