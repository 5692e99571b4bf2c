"""Config precedence and validation: defaults < YAML < environment < flags."""

import pytest

from job import config as configuration
from job.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_documented_local_run():
    config = configuration.load(None, {}, environ={})
    assert (config.model, config.dataset, config.workers, config.gpus_per_worker) == ("alexnet-mnist", "mnist", 2, 0)
    assert config.output == "." and config.address is None
    assert config.run_name.startswith("alexnet-mnist-")


def test_precedence_yaml_then_environment_then_flags(tmp_path):
    path = write(tmp_path, "epochs: 3\nbatch_size: 128\nlearning_rate: 0.01\nmodel: alexnet\n")
    environ = {"ALEXNET_JOB_BATCH_SIZE": "32", "ALEXNET_JOB_LEARNING_RATE": "0.02"}
    config = configuration.load(path, {"learning_rate": "0.5"}, environ=environ)
    assert config.epochs == 3            # YAML over default
    assert config.batch_size == 32       # environment over YAML
    assert config.learning_rate == 0.5   # flag over environment
    assert config.model == "alexnet"


def test_ray_address_comes_from_the_environment_unless_given():
    assert configuration.load(None, {}, environ={"RAY_ADDRESS": "ray://head:10001"}).address == "ray://head:10001"
    assert configuration.load(None, {"address": "auto"}, environ={"RAY_ADDRESS": "x:1"}).address == "auto"


def test_types_are_coerced_from_text():
    config = configuration.load(None, {"input_shape": "64,64,3", "augment": "false", "warmup_epochs": "0.5"},
                                environ={})
    assert config.input_shape == [64, 64, 3] and config.augment is False and config.warmup_epochs == 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"model": "vgg"}, "unknown model 'vgg'; choose one of: alexnet, alexnet-mnist"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"workers": "0"}, "workers must be a positive number, not 0"),
    ({"epochs": "-1"}, "epochs must be a positive number, not -1"),
    ({"batch_size": "0"}, "batch_size must be a positive number"),
    ({"batch_size": "65"}, "batch_size 65 does not divide across 2 replicas"),
    ({"batch_size": "64", "workers": "2", "gpus_per_worker": "3"}, "does not divide across 6 replicas"),
    ({"learning_rate": "0"}, "learning_rate must be positive"),
    ({"epochs": "two"}, "epochs must be a whole number, not 'two'"),
    ({"input_shape": "28,28"}, "input_shape must be three positive numbers"),
    ({"seed": "-1"}, "seed must be a whole number from 0 to 4294967295, not -1"),
    ({"seed": str(2**32)}, "seed must be a whole number from 0 to 4294967295, not 4294967296"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of auto, off, bf16, fp16"),
    ({"mixed_precision": "fp16"}, "fp16 needs GPUs"),
    ({"run_name": "My Run"}, "run_name 'My Run' is not valid"),
    ({"validation_fraction": "1"}, "validation_fraction must be in [0, 1)"),
    ({"step_timeout": "0"}, "step_timeout must be a positive number, not 0.0"),
    ({"step_timeout": "soon"}, "step_timeout must be a number, not 'soon'"),
    ({"deadline_seconds": "-60"}, "deadline_seconds must be a positive number, not -60.0"),
])
def test_impossible_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as caught:
        configuration.load(None, overrides, environ={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_config_keys_are_rejected_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'epoch'; known keys: model,"):
        configuration.load(write(tmp_path, "epoch: 3\n"), {}, environ={})


def test_unreadable_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        configuration.load(str(tmp_path / "missing.yaml"), {}, environ={})
    with pytest.raises(ConfigError, match="is not valid YAML at line 2"):
        configuration.load(write(tmp_path, "epochs: 3\n  batch_size: [\n"), {}, environ={})
    with pytest.raises(ConfigError, match="must be a mapping"):
        configuration.load(write(tmp_path, "- 1\n- 2\n"), {}, environ={})
    with pytest.raises(ConfigError, match="config file .*: workers must be a whole number, not 'many'"):
        configuration.load(write(tmp_path, "workers: many\n"), {}, environ={})


def test_the_step_watchdog_is_on_by_default_and_null_turns_it_off(tmp_path):
    assert configuration.load(None, {}, environ={}).step_timeout == 600
    assert configuration.load(write(tmp_path, "step_timeout: null\n"), {}, environ={}).step_timeout is None
    config = configuration.load(None, {"step_timeout": "20", "deadline_seconds": "3600"}, environ={})
    assert (config.step_timeout, config.deadline_seconds) == (20, 3600)
    assert configuration.load(None, {}, environ={}).deadline_seconds is None
    assert configuration.load(None, {"step_timeout": "off"}, environ={}).step_timeout is None
    assert configuration.load(None, {}, environ={"ALEXNET_JOB_STEP_TIMEOUT": "none"}).step_timeout is None
    # Words mean themselves where a field holds text: a run could be named "none".
    assert configuration.load(None, {"run_name": "none"}, environ={}).run_name == "none"


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="ALEXNET_JOB_EPOCHS: epochs must be a whole number"):
        configuration.load(None, {}, environ={"ALEXNET_JOB_EPOCHS": "lots"})


def test_replicas_count_gpus_per_worker():
    assert configuration.Config(workers=4, gpus_per_worker=8).replicas == 32
    assert configuration.Config(workers=2, gpus_per_worker=0).replicas == 2


def test_printed_config_loads_back_to_the_same_config(tmp_path):
    config = configuration.load(None, {"epochs": "7", "input_shape": "32,32,3"}, environ={})
    again = configuration.load(write(tmp_path, config.to_yaml()), {}, environ={})
    assert again == config


def test_loopback_ray_addresses_are_recognised():
    from job.train import is_loopback_address
    assert is_loopback_address("127.0.0.1:6379") and is_loopback_address("localhost:6379")
    assert is_loopback_address("ray://127.0.0.1:10001") and is_loopback_address("[::1]:6379")
    assert not is_loopback_address("auto") and not is_loopback_address("10.0.0.5:6379")
    assert not is_loopback_address("ray-head.default.svc:6379")
