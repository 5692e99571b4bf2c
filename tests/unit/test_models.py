"""The networks against the reference tutorial, and the mixed-precision variants."""

import numpy as np
import pytest

from support import layer_rows
from job import config as configuration
from job import models


def test_alexnet_mnist_is_the_tutorials_reduced_network():
    rows = layer_rows(models.build("alexnet-mnist"))
    weighted = [(kind, shape, params) for kind, shape, params in rows if params]
    assert weighted == [
        ("Conv2D", (26, 26, 32), 3 * 3 * 1 * 32 + 32),
        ("Conv2D", (22, 22, 32), 3 * 3 * 32 * 32 + 32),
        ("Conv2D", (18, 18, 64), 3 * 3 * 32 * 64 + 64),
        ("Conv2D", (16, 16, 64), 3 * 3 * 64 * 64 + 64),
        ("Dense", (512,), 7 * 7 * 64 * 512 + 512),
        ("Dense", (10,), 512 * 10 + 10),
    ]
    assert [r[0] for r in rows].count("Dropout") == 1 and rows[-1][0] == "Activation"


def test_input_shape_and_classes_are_configurable():
    model = models.build("alexnet", input_shape=(227, 227, 3), num_classes=7)
    assert model.input_shape == (None, 227, 227, 3) and model.output_shape == (None, 7)


def test_registry_and_driver_defaults_agree():
    assert set(models.REGISTRY) == set(configuration.MODEL_DEFAULTS)
    for name, (shape, classes) in configuration.MODEL_DEFAULTS.items():
        model = models.build(name)
        assert model.input_shape[1:] == shape and model.output_shape[-1] == classes


@pytest.mark.parametrize("precision, compute", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_precision_computes_low_keeps_softmax_and_weights_float32(precision, compute):
    model = models.build("alexnet-mnist", mixed_precision=precision)
    assert model.layers[0].compute_dtype == compute and model.layers[0].variable_dtype == "float32"
    assert model.layers[-1].compute_dtype == "float32"
    models.compile_for_training(model, 1e-3, precision)
    scaled = type(model.optimizer).__name__.startswith("LossScaleOptimizer")
    assert scaled == (precision == "fp16")  # fp16 gradients need loss scaling, bf16 do not


def test_bf16_training_step_runs_on_cpu():
    model = models.compile_for_training(models.build("alexnet-mnist", mixed_precision="bf16"), 1e-3, "bf16")
    rng = np.random.default_rng(0)
    history = model.fit(rng.random((16, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 16), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0).dtype == np.float32


def test_learning_rate_scaling_warmup_and_cosine_decay():
    from job import tfenv, worker
    from job.config import Config
    _, keras = tfenv.tensorflow()
    constant = dict(warmup_epochs=0, lr_decay="none")
    assert worker.learning_rate_schedule(Config(learning_rate=0.01, **constant), 4, 100, keras) == 0.01
    assert worker.learning_rate_schedule(Config(learning_rate=0.01, scale_lr=True, **constant), 4, 100, keras) == 0.04
    schedule = worker.learning_rate_schedule(
        Config(learning_rate=0.01, warmup_epochs=1, lr_decay="cosine", epochs=3), 1, 100, keras)
    rates = [float(schedule(step)) for step in (0, 49, 99, 100, 200, 299)]
    assert rates[0] == pytest.approx(0.0001) and rates[1] == pytest.approx(0.005)   # linear warm-up
    assert rates[2] == pytest.approx(0.01, rel=1e-3)                                # peak
    assert rates[4] == pytest.approx(0.005, rel=1e-2) and rates[5] < 1e-5           # cosine to zero
