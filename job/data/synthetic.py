"""Random images of any shape, for benchmarks: costs no I/O, so it measures the model alone."""

from __future__ import annotations

import numpy as np

from job.config import MODEL_DEFAULTS
from job.data import fingerprint


def load(config):
    """((train_x, train_y), (test_x, test_y), description, fingerprint) shaped for the model."""
    shape = config.model_input_shape()
    classes = num_classes(config)
    rng = np.random.default_rng(config.seed)

    def make(count):
        return (rng.integers(0, 256, size=(count, *shape), dtype=np.uint8),
                rng.integers(0, classes, size=count, dtype=np.int32))

    test_count = max(config.batch_size, config.synthetic_examples // 8)
    description = f"synthetic:{'x'.join(map(str, shape))}:{classes}:{config.synthetic_examples}:{config.seed}"
    return make(config.synthetic_examples), make(test_count), description, fingerprint([description.encode()])


def num_classes(config) -> int:
    return config.num_classes or MODEL_DEFAULTS[config.model][1]
