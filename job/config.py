"""One typed configuration for a training run: defaults < YAML file < environment < flags.

Every option is declared once, in `Config`, with its default and a one-line help text; the
CLI builds its `train` flags from these fields and the chart writes the same keys into its
ConfigMap, so nothing here is typed twice. `validate()` rejects impossible settings before
Ray or TensorFlow start.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from job.errors import ConfigError
from job.storage.gate import parse_gate  # the gate's syntax has one home: storage
from job.storage.layout import RUN_NAME_RULE, is_run_name  # and so has the rule for run names

# Each network's default input (H, W, C) and classes, from the reference tutorial. The builders
# live in job.models (TensorFlow); this table is here so the driver can use it without TensorFlow.
MODEL_DEFAULTS = {"alexnet": ((224, 224, 3), 1000), "alexnet-mnist": ((28, 28, 1), 10)}
MODELS = tuple(MODEL_DEFAULTS)
FILE_DATASETS = ("imagefolder", "tfrecord")  # read as files by each worker (job.data.sources)
DATASETS = ("mnist", "synthetic", *FILE_DATASETS)
SEED_RANGE = (0, 2**32 - 1)  # NumPy's seeds
BAD_IMAGES = ("skip", "fail")
MIXED_PRECISION = ("auto", "off", "bf16", "fp16")
LR_DECAYS = ("none", "cosine")
ENV_PREFIX = "ALEXNET_JOB_"


def option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Config:
    # what to train
    model: str = option("alexnet-mnist", "network: " + ", ".join(MODELS))
    input_shape: list[int] | None = option(None, "model input H,W,C (default: the model's own)")
    num_classes: int | None = option(None, "output classes (default: the dataset's)")
    mixed_precision: str = option(
        "auto", "compute dtype: auto (bf16 where the worker's hardware computes it natively: GPUs of compute "
        "capability 8.0+, CPUs with AVX512_BF16 or AMX; float32 elsewhere), off (float32), bf16, or fp16 (GPUs); "
        "softmax, loss and weights stay float32")
    # data
    dataset: str = option("mnist", "dataset: " + ", ".join(DATASETS))
    data: str | None = option(
        None, "dataset location, local or s3://: mnist: folder of IDX .gz files or mnist.npz (none = Keras "
              "download); imagefolder: folder of {train,val}/<class>/ images; tfrecord: folder 'dataset pack' wrote")
    train_limit: int | None = option(None, "use only the first N training examples (mnist, synthetic)")
    test_limit: int | None = option(None, "evaluate on only the first N test examples (mnist, synthetic)")
    validation_fraction: float = option(
        0.1, "fraction of the training examples held out for per-epoch validation (mnist, synthetic; "
             "image datasets validate on val/)")
    synthetic_examples: int = option(2048, "number of training examples the synthetic dataset makes")
    augment: bool = option(
        True, "augment training data: the tutorial's rotate/shift/shear/zoom (mnist, synthetic); "
              "random 224 crop of the image resized to 256, and flip (image datasets)")
    color_jitter: float = option(0.0, "image datasets: colour jitter strength from 0 (off) to 1 (brightness, "
                                      "contrast and saturation vary by up to 0.4)")
    bad_images: str = option("skip", "image datasets: an image that cannot be read or decoded is skipped and "
                                     "counted (skip), or fails the run (fail)")
    readahead: int = option(64, "image datasets: image files each worker fetches ahead of the pipeline")
    data_cache: str | None = option(None, "image datasets on s3://: a local folder keeping a copy of every file "
                                          "a worker read, read from there next time")
    # cluster
    workers: int = option(2, "Ray Train workers (one per node in a cluster)")
    gpus_per_worker: int = option(0, "GPUs per worker; MultiWorkerMirroredStrategy mirrors across them")
    cpus_per_worker: int = option(1, "CPUs per worker; also sizes TensorFlow's thread pools")
    address: str | None = option(None, "Ray cluster to join (or RAY_ADDRESS); none = start one here")
    # optimisation
    epochs: int = option(5, "training epochs")
    # The defaults are the recipe measured best on full MNIST (README, "The default recipe"):
    # 4x the tutorial's batch and, by the linear scaling rule, 4x its learning rate, warmed up
    # over half an epoch and decayed by cosine.
    batch_size: int = option(256, "global batch size, split evenly across all replicas")
    learning_rate: float = option(0.004, "Adam learning rate")
    scale_lr: bool = option(False, "multiply the learning rate by the number of replicas (linear scaling rule)")
    warmup_epochs: float = option(0.5, "linear learning-rate warm-up over this many epochs")
    lr_decay: str = option("cosine", "after warm-up: none (constant) or cosine (to zero at the last step)")
    steps_per_epoch: int | None = option(None, "fixed steps per epoch (default: training examples // batch size)")
    seed: int = option(0, "seed for weights, shuffling and augmentation")
    # fault tolerance
    max_failures: int = option(3, "times the worker group is restarted from the last checkpoint before the run fails")
    keep_checkpoints: int = option(2, "checkpoints kept in the run's storage (the newest)")
    checkpoint_every_steps: int | None = option(None, "also checkpoint every N steps within an epoch")
    preemption_check_steps: int = option(
        25, "every N steps all workers ask Ray whether a node is being drained, to checkpoint before it goes")
    step_timeout: float | None = option(
        600.0, "a worker that finishes no step for this many seconds (a peer alive but stuck) exits, and Ray "
               "restarts the group from the last checkpoint; off = never")
    deadline_seconds: float | None = option(
        None, "once the command has run this many seconds, stop training, keep the last checkpoint and exit 1")
    # output
    output: str = option(".", "where runs are written: a local folder or s3://bucket/prefix")
    run_name: str | None = option(None, "the run's name (default: <model>-<UTC time>); a fixed name resumes")
    promote_if_better: str | None = option(
        None, "METRIC[:TOLERANCE]: move latest.json only if this run's metric >= latest's - tolerance")
    # experiment tracking
    mlflow_tracking_uri: str | None = option(
        None, "MLflow tracking server, http(s)://... (or MLFLOW_TRACKING_URI): the run logs its params, per-epoch and "
              "test metrics and storage location there, and a promoted run becomes a model version; none = off")
    mlflow_experiment: str = option("alexnet-job", "MLflow experiment the run is logged in")

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: one per GPU, or one per CPU-only worker."""
        return self.workers * max(1, self.gpus_per_worker)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_input_shape(self) -> tuple:
        """The network's input (H, W, C): input_shape, or the model's own."""
        return tuple(self.input_shape or MODEL_DEFAULTS[self.model][0])

    def validate(self) -> "Config":
        """Raise ConfigError for the first impossible setting; fill derived defaults."""
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, not {self.bad_images!r}")
        if self.dataset in FILE_DATASETS:
            if not self.data:
                raise ConfigError(f"dataset {self.dataset} needs --data: the dataset's folder, local or s3://")
            for name in ("train_limit", "test_limit"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} applies to mnist and synthetic; pack a smaller "
                                      f"{self.dataset} dataset instead")
        if not 0 <= self.color_jitter <= 1:
            raise ConfigError(f"color_jitter must be between 0 and 1, not {self.color_jitter}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, not {self.lr_decay!r}")
        for name in ("workers", "cpus_per_worker", "epochs", "batch_size", "synthetic_examples", "keep_checkpoints",
                     "preemption_check_steps", "readahead"):
            _require_positive(name, getattr(self, name))
        for name in ("train_limit", "test_limit", "steps_per_epoch", "num_classes", "checkpoint_every_steps",
                     "step_timeout", "deadline_seconds"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be 0 or more, not {self.gpus_per_worker}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, not {self.seed}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be -1 (unlimited) or more, not {self.max_failures}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, not {self.learning_rate}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be 0 or more, not {self.warmup_epochs}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), not {self.validation_fraction}")
        if self.batch_size % self.replicas:
            raise ConfigError(
                f"batch_size {self.batch_size} does not divide across {self.replicas} replicas "
                f"({self.workers} workers x {max(1, self.gpus_per_worker)}); use a multiple of {self.replicas}")
        if self.input_shape is not None and (
                len(self.input_shape) != 3 or any(d <= 0 for d in self.input_shape)):
            raise ConfigError(f"input_shape must be three positive numbers H,W,C, not {self.input_shape}")
        if self.mixed_precision == "fp16" and self.gpus_per_worker == 0:
            raise ConfigError("mixed_precision fp16 needs GPUs (gpus_per_worker >= 1); use bf16 or off on CPU")
        if self.promote_if_better is not None:
            parse_gate(self.promote_if_better)
        if self.mlflow_tracking_uri is not None and not re.match(r"^https?://[^/\s]+", self.mlflow_tracking_uri):
            raise ConfigError(f"mlflow_tracking_uri must be the http:// or https:// address of an MLflow tracking "
                              f"server, not {self.mlflow_tracking_uri!r}")
        if not self.mlflow_experiment.strip():
            raise ConfigError("mlflow_experiment must be a name, not empty")
        if self.run_name is None:
            self.run_name = f"{self.model}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        if not is_run_name(self.run_name):
            raise ConfigError(f"run_name {self.run_name!r} is not valid; use {RUN_NAME_RULE}")
        return self


def _require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number, not {value}")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def coerce(name: str, raw: Any, source: str) -> Any:
    """Turn a YAML, environment or flag value into the field's type, or raise ConfigError."""
    kind = FIELDS[name].type
    if raw is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{source}: {name} needs a value")
    if "None" in kind and not kind.startswith("str") and str(raw).strip().lower() in ("none", "null", "off"):
        return None  # a flag or variable cannot say YAML's null otherwise (--step-timeout off)
    try:
        if kind.startswith("list[int]"):
            parts = raw if isinstance(raw, list) else str(raw).replace("x", ",").split(",")
            return [int(p) for p in parts]
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = {"int": "a whole number", "float": "a number", "bool": "true or false",
                    "list[int]": "three whole numbers H,W,C"}.get(kind.split(" |")[0], kind)
        raise ConfigError(f"{source}: {name} must be {expected}, not {raw!r}") from None


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    unknown = sorted(set(loaded) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {unknown[0]!r}; known keys: {', '.join(FIELDS)}")
    return {name: coerce(name, value, f"config file {path}") for name, value in loaded.items()}


def from_environment(environ: dict[str, str]) -> dict[str, Any]:
    values = {name: coerce(name, environ[ENV_PREFIX + name.upper()], ENV_PREFIX + name.upper())
              for name in FIELDS if ENV_PREFIX + name.upper() in environ}
    if "address" not in values and environ.get("RAY_ADDRESS"):
        values["address"] = environ["RAY_ADDRESS"]
    if "mlflow_tracking_uri" not in values and environ.get("MLFLOW_TRACKING_URI"):
        values["mlflow_tracking_uri"] = environ["MLFLOW_TRACKING_URI"]
    return values


def load(config_file: str | None, overrides: dict[str, Any],
         environ: dict[str, str] | None = None) -> Config:
    """Merge defaults < config file < environment < overrides (flags), then validate."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(read_yaml(config_file))
    merged.update(from_environment(dict(os.environ if environ is None else environ)))
    merged.update({k: coerce(k, v, "--" + k.replace("_", "-")) for k, v in overrides.items()})
    return Config(**merged).validate()
