"""The chief's last act, write_run, in this process: a tiny model on synthetic data."""

import json
import time
from types import SimpleNamespace

from job import config as configuration
from job import data, models, storage, tracking, worker


def test_an_attempt_resumed_after_the_last_epoch_still_publishes(tmp_path, capsys):
    """Its predecessor stopped after the last checkpoint (a deadline, a lost driver, a failed
    publish): this attempt trains no step, so it has no time to its first step."""
    config = configuration.load(None, {"dataset": "synthetic", "synthetic_examples": "128", "batch_size": "64", "epochs": "1", "validation_fraction": "0",
                                       "output": str(tmp_path), "run_name": "late"}, environ={})
    config.output = storage.parse_location(config.output).uri
    splits = data.load(config)
    model = models.build(config.model, config.model_input_shape(), len(splits.class_names))
    history = [{"epoch": 1, "loss": 2.3, "accuracy": 0.1, "images_per_second": 100.0, "seconds": 1.0}]
    staging = tmp_path / "staging"
    staging.mkdir()
    now = time.time()
    settings = data.InputSettings(global_batch=config.batch_size, steps_per_epoch=1, seed=0, augment=False,
                                  input_shape=config.model_input_shape(), cpus=1, on_bad=None)
    phases = []
    worker.write_run(str(staging), config, splits, settings, model,
                     SimpleNamespace(history=history, first_step_at=None, phase=phases.append, tracker=tracking.Tracker(None)), 2, 1, now - 60, now - 30)
    assert phases == ["evaluating", "publishing", "published"]  # what the progress record says meanwhile
    metrics = json.loads((tmp_path / "runs" / "late" / "metrics.json").read_text())
    assert metrics["startup_seconds"] is None and metrics["history"] == history
    assert json.loads((tmp_path / "latest.json").read_text())["run"] == "late"

    # A restart after the publish, which had been stopped before latest.json moved: the run is
    # left as it is and the move is finished.
    (tmp_path / "latest.json").unlink()
    published = (tmp_path / "runs" / "late" / "manifest.json").read_bytes()
    phases = []
    worker.write_run(str(staging), config, splits, settings, model,
                     SimpleNamespace(history=history, first_step_at=None, phase=phases.append, tracker=tracking.Tracker(None)), 2, 1, now - 60, now - 30)
    assert phases == ["published"]
    assert "run late was already published" in capsys.readouterr().out
    assert (tmp_path / "runs" / "late" / "manifest.json").read_bytes() == published
    assert json.loads((tmp_path / "latest.json").read_text())["run"] == "late"
