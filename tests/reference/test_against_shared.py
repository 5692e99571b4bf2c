"""The facts the product is built to match, read from ../shared: the real MNIST files and the
reference tutorial. Kept apart so that the unit tier needs nothing outside the repository."""

import re

import numpy as np
import pytest

from job import models
from job.data import mnist
from support import TUTORIAL, layer_rows

pytestmark = pytest.mark.reference


def tutorial_summary():
    """(layer type, output shape, params) rows of the tutorial's AlexNet Keras summary."""
    text = TUTORIAL.read_text()
    block = text[text.index("Layer (type) Output Shape Param #"):text.index("Total params: 25,678,184")]
    # Keras 2.2 cut long type names: "max_pooling2d_4 (MaxPooling2 (None, 26, 26, 96) 0".
    rows = re.findall(r"^\w+ \((\w+)\)? \(None, ([\d, ]+)\) (\d+)$", block, flags=re.M)
    return [(kind, tuple(int(d) for d in shape.split(",")), int(params)) for kind, shape, params in rows]


def test_alexnet_equals_the_tutorial_summary_layer_by_layer():
    expected = tutorial_summary()
    assert len(expected) == 22  # the table parsed completely
    actual = layer_rows(models.build("alexnet"))
    assert [(kind[:11], shape, params) for kind, shape, params in actual] == \
           [(kind[:11], shape, params) for kind, shape, params in expected]
    assert models.build("alexnet").count_params() == 25_678_184


def test_idx_files_load_with_the_published_counts(mnist_dir):
    (train_x, train_y), (test_x, test_y), location, fingerprint = mnist.load(str(mnist_dir))
    assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28, 1) and test_y.shape == (10000,)
    assert list(train_y[:20]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9]  # the tutorial's
    assert test_y[0] == 7 and fingerprint.startswith("sha256:")
