"""The 224x224 AlexNet on 2 workers, streaming image datasets from the S3 server (SeaweedFS):
class folders of JPEGs and PNGs, and the same images packed into TFRecord shards."""

import json
import shutil

import pytest
from support import error_line, run_cli, upload_folder, write_image_folder

pytestmark = pytest.mark.integration

BAD = "train/4/corrupt.jpg"
# 81 training images over 2 workers at 4 images per replica: 10 steps read every worker's
# share of an epoch (40 images), so the corrupt one is met whichever worker it falls to.
TRAIN = ["--model", "alexnet", "--workers", "2", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "10"]


@pytest.fixture(scope="module")
def datasets(s3_server, mnist_dir, tmp_path_factory):
    """The same images as class folders on S3 and packed into 4 TFRecord shards on S3."""
    local = tmp_path_factory.mktemp("images")
    folder = write_image_folder(mnist_dir, local, per_class=8, classes=10, val_per_class=2)
    (local / BAD).write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing decodable")
    bucket = s3_server.create_bucket()
    imagefolder = upload_folder(s3_server.client(), local, bucket, "images")
    packed = run_cli("dataset", "pack", imagefolder, f"s3://{bucket}/packed", "--shards", "4", env=s3_server.env)
    assert packed.returncode == 0, packed.stderr
    return {"local": local, "folder": folder, "imagefolder": imagefolder, "tfrecord": f"s3://{bucket}/packed"}


@pytest.fixture(scope="module")
def runs(datasets, s3_server, tmp_path_factory):
    """One short run from each layout; the imagefolder one keeps a local copy of what it read."""
    results = {}
    for layout in ("imagefolder", "tfrecord"):
        output = tmp_path_factory.mktemp(f"output-{layout}")
        cache = output / "cache"
        result = run_cli("train", "--dataset", layout, "--data", datasets[layout], *TRAIN, "--output", output,
                         "--run-name", layout, *(["--data-cache", cache] if layout == "imagefolder" else []),
                         env=s3_server.env)
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = output / "runs" / layout
        results[layout] = {"result": result, "run_dir": run_dir, "cache": cache,
                           "metrics": json.loads((run_dir / "metrics.json").read_text())}
    return results


@pytest.mark.parametrize("layout", ["imagefolder", "tfrecord"])
def test_alexnet_trains_on_two_workers_from_the_object_store(runs, datasets, layout):
    metrics = runs[layout]["metrics"]
    assert metrics["model"] == "alexnet" and metrics["workers"] == 2 and metrics["steps_per_epoch"] == 10
    assert metrics["class_names"] == [str(digit) for digit in range(10)]
    assert metrics["data"]["counts"] == {"train": 81, "validation": 20, "test": 20}
    assert metrics["data"]["location"] == datasets[layout]
    # Top-1 and top-5 of the centre-cropped val split, and per epoch in the history.
    assert 0 <= metrics["test_accuracy"] <= metrics["test_top5_accuracy"] <= 1
    assert {"top5_accuracy", "val_top5_accuracy"} <= set(metrics["history"][0])
    manifest = json.loads((runs[layout]["run_dir"] / "manifest.json").read_text())
    assert manifest["class_names"] == metrics["class_names"]
    assert "test_top5_accuracy" in manifest["metrics"]


def test_a_corrupt_image_is_skipped_named_and_counted(runs, datasets):
    folder_run, record_run = runs["imagefolder"], runs["tfrecord"]
    named = f"{datasets['imagefolder']}/{BAD}"
    assert folder_run["metrics"]["data"]["bad_images"] == {
        "count": 1, "images": [{"image": named, "reason": "cannot be decoded as JPEG or PNG"}]}
    assert f"skipped bad image {named}" in folder_run["result"].stdout
    # In shards the image is a record; it is named by shard and record number.
    (bad,) = record_run["metrics"]["data"]["bad_images"]["images"]
    assert bad["image"].startswith(datasets["tfrecord"] + "/train-") and " record " in bad["image"]


def test_the_cache_keeps_the_files_a_worker_read(runs, datasets):
    cached = {path.relative_to(runs["imagefolder"]["cache"]).as_posix()
              for path in runs["imagefolder"]["cache"].rglob("*") if path.is_file()}
    prefix = datasets["imagefolder"].removeprefix("s3://")
    sources = {f"{prefix}/{path}" for path, _ in datasets["folder"].files["train"] + datasets["folder"].files["val"]}
    assert len(cached) > 40 and cached <= sources | {f"{prefix}/{BAD}"}


def test_the_reader_fetches_objects_in_order_and_names_a_missing_one(datasets, s3_env, tmp_path):
    from job.data.sources import Reader

    wanted = [path for path, _ in datasets["folder"].files["train"][:5]]
    reader = Reader(datasets["imagefolder"], readahead=2, cache_dir=str(tmp_path))
    try:
        read = list(reader.read_ahead([(path, n) for n, path in enumerate([*wanted[:3], "train/0/gone.jpg", *wanted[3:]])]))
    finally:
        reader.close()
    assert [(path, n) for path, n, _ in read] == [(path, n) for n, path in
                                                   enumerate([*wanted[:3], "train/0/gone.jpg", *wanted[3:]])]
    assert [data for path, _, data in read if path != "train/0/gone.jpg"] == \
        [(datasets["local"] / path).read_bytes() for path in wanted]
    assert read[3][2].startswith("cannot be read: ") and "gone.jpg" in read[3][2]


def test_predict_uses_the_runs_classes_and_centre_crop(runs, datasets):
    images = [datasets["local"] / path for path, _ in datasets["folder"].files["val"][:3]]
    result = run_cli("predict", runs["imagefolder"]["run_dir"], *images, "--top-k", "5", "--output", "json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert len(predictions) == 3 and all(len(p["top"]) == 5 for p in predictions)
    assert all(choice["class"] in [str(d) for d in range(10)] for p in predictions for choice in p["top"])


def test_bad_images_fail_the_run_when_asked(datasets, tmp_path, s3_server):
    # The small network on a local copy: what matters is the one line that names the file, and
    # that the failure, which every retry would meet again, is not retried (--max-failures 3).
    result = run_cli("train", "--dataset", "imagefolder", "--data", datasets["local"], "--bad-images", "fail",
                     "--max-failures", "3", "--workers", "2", "--batch-size", "8", "--epochs", "1",
                     "--steps-per-epoch", "10", "--output", tmp_path, "--run-name", "bad", env=s3_server.env)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("alexnet-job: training failed: ") and f"bad image {datasets['local']}/{BAD}" in last
    assert not (tmp_path / "latest.json").exists()
    failures = [json.loads(line) for part in (tmp_path / "checkpoints" / "bad" / "failures").glob("*.jsonl")
                for line in part.read_text().splitlines()]
    assert [f["retried"] for f in failures] == [False], failures


def test_an_empty_split_stops_before_training(datasets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(datasets["local"], copy)
    shutil.rmtree(copy / "val")
    error_line(run_cli("train", "--dataset", "imagefolder", "--data", copy, "--output", tmp_path),
               f"no images in {copy}/val")


def test_an_unwritable_data_cache_stops_before_training(datasets, tmp_path, s3_server):
    (tmp_path / "a-file").write_text("not a folder")
    error_line(run_cli("train", "--dataset", "imagefolder", "--data", datasets["imagefolder"], "--data-cache",
                       tmp_path / "a-file" / "cache", "--output", tmp_path / "out", env=s3_server.env),
               f"cannot write the data cache {tmp_path}/a-file/cache: Not a directory; "
               "give --data-cache a writable local folder")
    assert not (tmp_path / "out").exists()


def test_a_cache_that_fails_mid_run_stops_caching_not_reading(datasets, s3_env, tmp_path, capsys):
    from job.data.sources import Reader

    # One image of each of the classes 0-3, read one after the other; class 1's cache folder is blocked.
    wanted = [next(path for path, label in datasets["folder"].files["train"] if label == n) for n in range(4)]
    prefix = datasets["imagefolder"].removeprefix("s3://")
    blocked = tmp_path / prefix / wanted[1].rsplit("/", 1)[0]
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the class folder would go")  # a write fails, as on a full disk
    reader = Reader(datasets["imagefolder"], readahead=1, cache_dir=str(tmp_path))
    try:
        read = list(reader.read_ahead([(path, None) for path in wanted]))
    finally:
        reader.close()
    assert [data for _, _, data in read] == [(datasets["local"] / path).read_bytes() for path in wanted]
    assert capsys.readouterr().out.count(f"data cache {tmp_path} stopped") == 1
    cached = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert cached == {f"{prefix}/{wanted[0]}", blocked.relative_to(tmp_path).as_posix()}  # nothing after the failure
