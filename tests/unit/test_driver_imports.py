"""What the driver side loads: the Train controller unpickles job.train's failure recorder and
job.tf_config's backend, and must not pay for a TensorFlow import it never uses (3 s of CPU)."""

import json
import os
import subprocess
import sys


def test_the_controllers_modules_import_without_tensorflow():
    code = ("import sys, job.train, job.tf_config, job.records; "
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tf_config_names_every_worker_and_this_ones_index(monkeypatch):
    from job import tf_config
    monkeypatch.delenv("TF_CONFIG", raising=False)
    tf_config.set_tf_config(["127.0.0.1:4001", "127.0.0.1:4002"], 1)
    assert json.loads(os.environ["TF_CONFIG"]) == {"cluster": {"worker": ["127.0.0.1:4001", "127.0.0.1:4002"]},
                                                   "task": {"type": "worker", "index": 1}}
