"""The unit tier needs nothing outside the repository: its MNIST is drawn by the tests."""

import pytest

from support import write_drawn_mnist


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return write_drawn_mnist(tmp_path_factory.mktemp("drawn-mnist"))
