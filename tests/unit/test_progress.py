"""The progress record a running run keeps in its storage, and the logs saved with the run."""

import json
import sys
import time

from job import progress, runlogs


def record(**changes):
    return {"run": "r", "state": "training", "epoch": 2, "epochs": 5, "step": 30, "steps_per_epoch": 100,
            "loss": 0.12345, "accuracy": 0.9612, "images_per_second": 1180.4, "elapsed_seconds": 100.0,
            "eta_seconds": 125.0, "updated_at": 1000.0, **changes}


def test_the_chiefs_writer_keeps_the_newest_record_where_status_reads_it(tmp_path):
    writer = progress.Writer(str(tmp_path), "r")
    assert progress.read(str(tmp_path), "r") is None
    writer.put(record(step=10))
    writer.put(record(step=20))
    writer.close()
    saved = progress.read(str(tmp_path), "r")
    assert saved["step"] == 20 and saved["updated_at"] >= time.time() - 60
    assert (tmp_path / "checkpoints" / "r" / "progress.json").exists()
    assert not list((tmp_path / "checkpoints" / "r").glob("*.writing"))


def test_one_line_says_where_the_run_is_and_when_it_ends():
    assert progress.describe(record(), now=1003.0) == (
        "training: epoch 2/5, step 30/100, loss 0.1235, accuracy 0.9612, 1180 img/s, elapsed 1m40s, ETA 2m05s "
        "(updated 0m03s ago)")
    # no worker rewrote it for long: the run is not running any more, whatever it last said
    assert progress.describe(record(), now=1000.0 + 3 * 3600).startswith("stopped: epoch 2/5, step 30/100")
    assert progress.state(record(state="published"), now=1e9) == "published"


def test_unfinished_runs_are_those_with_a_record_and_no_published_run(tmp_path):
    for name, step in (("old", 5), ("new", 7), ("done", 9)):
        writer = progress.Writer(str(tmp_path), name)
        writer.put(record(step=step))
        writer.close()
        time.sleep(0.01)
    (tmp_path / "checkpoints" / "no-record").mkdir()
    assert [r["run"] for r in progress.unfinished(str(tmp_path), {"done"})] == ["new", "old"]
    assert progress.unfinished(str(tmp_path / "nothing-here"), set()) == []


def test_a_process_output_is_saved_with_the_run_as_it_goes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runlogs, "SAVE_EVERY_SECONDS", 0.05)
    with runlogs.Keeper(str(tmp_path), "r", "worker-20261207-000000-rank-1", first_line="rank 1 of 2") as keeper:
        saved = tmp_path / "checkpoints" / "r" / "logs" / "worker-20261207-000000-rank-1.log"
        assert saved.read_text() == "rank 1 of 2\n"  # at once
        print("epoch 1/1  loss 0.5")
        print(json.dumps({"__magic_token__": "__ray_tqdm_magic_token__", "x": 1}))  # a bar's state: not logged
        print("a warning", file=sys.stderr)
        deadline = time.time() + 10
        while "a warning" not in saved.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert saved.read_text() == "rank 1 of 2\nepoch 1/1  loss 0.5\na warning\n"  # before the end
        keeper.add("the last line\n")
    assert saved.read_text().endswith("a warning\nthe last line\n")
    out = capsys.readouterr()
    assert out.out.startswith("epoch 1/1  loss 0.5\n") and out.err == "a warning\n"  # still printed
    with runlogs.Keeper(str(tmp_path), "r", "driver-20261207-000000"):
        print("driver line")
    uri, logs = runlogs.saved(str(tmp_path), "r")
    assert uri == f"{tmp_path}/checkpoints/r/logs"
    assert [name for name, _ in logs] == ["driver-20261207-000000.log", "worker-20261207-000000-rank-1.log"]
    assert logs[0][1] == "driver line\n"
