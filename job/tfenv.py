"""Import TensorFlow the one way this project can use it, with threads sized to the worker.

TF_USE_LEGACY_KERAS=1 must be set before TensorFlow is first imported, in every process
(Ray workers included), so that `tf.keras` is tf-keras (Keras 2): Keras 3 cannot run
MultiWorkerMirroredStrategy `fit` (keras-team/keras#20585, ray-project/ray#47464).
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# Native (C++) log lines would bury the CLI's own output; training workers set "2" (errors
# stay visible in the Ray logs). A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# What TensorFlow's native side prints while it loads, before the level above applies: absl's
# own warning, then glog-style lines (`I0000 00:00:...`, `W1202 ...`).
ABSL_START_UP = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} )")
# What CUDA's first use prints on a machine without a usable GPU (TensorFlow's wheels bring the
# CUDA libraries along): an error line per process, on every CPU-only run.
CUDA_INIT_FAILED = re.compile(r"failed call to cuInit: (?:INTERNAL: CUDA error: Failed call to cuInit: )?(.*)$")


def tensorflow():
    """Return (tensorflow, tf_keras)."""
    if "tensorflow" not in sys.modules:
        with _native_stderr_captured(lambda line: not ABSL_START_UP.match(line)):
            import tensorflow  # noqa: F401
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


def visible_gpus() -> tuple[list, str | None]:
    """(the GPUs TensorFlow sees, as (name, compute capability) pairs; why CUDA found none).

    The first look at the devices starts CUDA, which prints an error line where there is no
    usable GPU. That line is held back: the caller decides whether it matters (a worker that was
    given GPUs) or not (a CPU-only run), and says so in one line of its own.
    """
    tf, _ = tensorflow()
    with _native_stderr_captured(lambda line: not CUDA_INIT_FAILED.search(line)) as held:
        devices = tf.config.list_physical_devices("GPU")
    gpus = []
    for device in devices:
        details = tf.config.experimental.get_device_details(device)
        gpus.append((details.get("device_name", device.name), details.get("compute_capability")))
    cuda_error = next((match.group(1) for line in held if (match := CUDA_INIT_FAILED.search(line))), None)
    return gpus, cuda_error


@contextlib.contextmanager
def _native_stderr_captured(keep):
    """Hold back what TensorFlow's C++ side prints meanwhile; yield the list of lines held.

    TensorFlow's native lines go to file descriptor 2 directly (and, while it loads, before
    TF_CPP_MIN_LOG_LEVEL takes effect: absl prints everything until it is initialised). Lines
    `keep` refuses are held back, and replayed only if the block fails. Other lines written to
    stderr meanwhile (the driver imports TensorFlow in a thread while Ray starts) are replayed
    after it, in order.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    held: list[str] = []
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = False
        try:
            yield held
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            held.extend(line for line in lines if not keep(line))
            sys.stderr.write("".join(line for line in lines if failed or keep(line)))
            sys.stderr.flush()


def limit_threads(cpus: int) -> None:
    """Size TensorFlow's thread pools to the CPUs this worker was given.

    Ray sets only OMP_NUM_THREADS; TensorFlow would otherwise start pools as wide as the whole
    machine in every worker, and two workers on two cores then fight (58 s vs 144 s an epoch,
    measured in ../shared/ENVIRONMENT.md). Must run before TensorFlow executes any op.
    """
    tf, _ = tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))
