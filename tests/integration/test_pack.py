"""`alexnet-job dataset pack` against local folders and a real S3 server (SeaweedFS, conftest.py).

The shards are read back with TensorFlow's own TFRecordDataset and parse_single_example, and
compared with the image files themselves, never with the code under test.
"""

import collections
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from job import storage, tfenv
from job.data import pack, sources
from job.errors import DataError, UserError
from job.storage.stores import S3Store
from support import error_line, run_cli, upload_folder, write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CLASSES, PER_CLASS, VAL_PER_CLASS = 10, 12, 3  # 120 train and 30 val images


@pytest.fixture(scope="module")
def folder(mnist_dir, tmp_path_factory):
    return write_image_folder(mnist_dir, tmp_path_factory.mktemp("images"), per_class=PER_CLASS, classes=CLASSES,
                              val_per_class=VAL_PER_CLASS)


@pytest.fixture(scope="module")
def s3_folder(s3_server, folder):
    """The same images in a bucket of their own, which no test changes."""
    return upload_folder(s3_server.client(), folder.root, s3_server.create_bucket(), "images")


@pytest.fixture
def staging(tmp_path, monkeypatch):
    """tempfile's folder for this test, where shards wait for their upload."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def shard_names(train: int, val: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{n:05d}.tfrecord" for split, n in (("train", train), ("val", val)) for i in range(n)]


def object_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def download(s3_server, uri: str, dest: Path) -> Path:
    """Every object under an s3:// prefix into dest (TensorFlow reads local files here)."""
    loc = storage.parse_location(uri)
    for key in object_keys(s3_server, loc.bucket, loc.path + "/"):
        target = dest / key[len(loc.path) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3_server.client().download_file(loc.bucket, key, str(target))
    return dest


def read_shard(path: Path) -> list[tuple[str, int, bytes]]:
    """(filename, label, image bytes) of every record, as TensorFlow itself reads them."""
    tf, _ = tfenv.tensorflow()
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/filename": tf.io.FixedLenFeature([], tf.string)}
    rows = []
    for raw in tf.data.TFRecordDataset(str(path)):
        assert set(tf.train.Example.FromString(raw.numpy()).features.feature) == set(sources.RECORD_LAYOUT)
        record = tf.io.parse_single_example(raw, spec)
        rows.append((record["image/filename"].numpy().decode(), int(record["image/class/label"]),
                     record["image/encoded"].numpy()))
    return rows


def check_packed(root: Path, folder, src: str, train_shards: int, val_shards: int, seed: int = 0) -> None:
    """Everything a packed dataset (here in the local folder root) must be, against its images."""
    listing = sources.list_imagefolder(src)
    names = shard_names(train_shards, val_shards)
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, "dataset.json"])  # nothing temporary left
    shards = {name: read_shard(root / name) for name in names}
    assert json.loads((root / "dataset.json").read_text()) == {
        "format": "tfrecord", "version": 1, "class_names": folder.class_names,
        "splits": {split: [{"path": name, "examples": len(rows)} for name, rows in shards.items()
                           if name.startswith(split)] for split in ("train", "val")},
        "source": src, "source_fingerprint": listing.fingerprint,
    }
    assert sources.list_tfrecord(str(root)).counts == folder.counts
    # The records are the seeded plan's, in its order (so: shuffled across shards, reproducible).
    planned = pack.plan(listing, train_shards, val_shards, seed)
    assert [[path for path, _ in shard.files] for shard in planned] == [[n for n, _, _ in rows] for rows in shards.values()]
    for split in ("train", "val"):
        split_shards = [rows for name, rows in shards.items() if name.startswith(split)]
        records = [row for rows in split_shards for row in rows]
        # every image exactly once, with its label, its bytes as they are in the file
        assert collections.Counter((name, label) for name, label, _ in records) == collections.Counter(folder.files[split])
        assert all(data == (folder.root / name).read_bytes() for name, _, data in records)
        assert max(map(len, split_shards)) - min(map(len, split_shards)) <= 1  # shards of equal size
        assert all(len({label for _, label, _ in rows}) >= CLASSES // 2 for rows in split_shards)  # mixed classes


# -- the plan ----------------------------------------------------------------------------------
def test_the_plan_is_seeded_and_gives_val_its_share(folder):
    listing = sources.list_imagefolder(str(folder.root))
    assert [sum(s.split == "val" for s in pack.plan(listing, n, None, 0)) for n in (1, 3, 16, 120)] == [1, 1, 4, 30]
    assert pack.plan(listing, 4, 2, seed=7) == pack.plan(listing, 4, 2, seed=7) != pack.plan(listing, 4, 2, seed=8)
    with pytest.raises(UserError, match="--shards 121 is more than the 120 train images"):
        pack.plan(listing, 121, None, 0)
    with pytest.raises(UserError, match="--val-shards 31 is more than the 30 val images"):
        pack.plan(listing, 4, 31, 0)
    with pytest.raises(UserError, match="--seed must be 0 or more, not -1"):
        pack.plan(listing, 4, None, -1)
    with pytest.raises(UserError, match="--val-shards must be at least 1, not 0"):
        pack.plan(listing, 4, 0, 0)


# -- packing -----------------------------------------------------------------------------------
def test_pack_local_to_local(folder, tmp_path):
    dst = tmp_path / "packed"
    result = pack.pack(str(folder.root), str(dst), shards=3, seed=0)
    assert (result.images, result.shards, result.dst) == (folder.counts, {"train": 3, "val": 1}, str(dst))
    assert result.bytes == sum(p.stat().st_size for p in dst.glob("*.tfrecord"))
    check_packed(dst, folder, str(folder.root), 3, 1)


def test_pack_s3_to_s3_uploads_shard_by_shard_and_dataset_json_last(s3_server, s3_env, s3_folder, folder, bucket,
                                                                    staging, tmp_path, monkeypatch):
    writes = []  # (key, shards on local disk at that moment)
    move_in, write = S3Store.move_in, S3Store.write

    def spy_move_in(self, path, key):
        writes.append((key, len(list(staging.rglob("*.tfrecord")))))
        return move_in(self, path, key)

    def spy_write(self, key, data):
        writes.append((key, 0))
        return write(self, key, data)

    monkeypatch.setattr(S3Store, "move_in", spy_move_in)
    monkeypatch.setattr(S3Store, "write", spy_write)
    dst = f"s3://{bucket}/packed"
    result = pack.pack(s3_folder, dst, shards=4, val_shards=2, seed=0)

    assert [key for key, _ in writes] == [*shard_names(4, 2), "dataset.json"]  # each once, dataset.json last
    assert max(on_disk for _, on_disk in writes) <= 2  # the shard being uploaded and the one being written
    assert not any(staging.iterdir())
    assert object_keys(s3_server, bucket, "") == sorted(f"packed/{key}" for key, _ in writes)
    copy = download(s3_server, dst, tmp_path / "copy")
    assert result.bytes == sum(p.stat().st_size for p in copy.glob("*.tfrecord"))
    check_packed(copy, folder, s3_folder, 4, 2)


def test_the_cli_packs_s3_into_a_local_folder(s3_server, s3_env, s3_folder, folder, tmp_path):
    dst = tmp_path / "packed"
    result = run_cli("dataset", "pack", s3_folder, dst, "--shards", "2", env=s3_server.env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    assert re.fullmatch(rf"packed 150 images \(120 train, 30 val\) into 3 shards \(2 train, 1 val\), "
                        rf"\d+\.\d MB, in \d+\.\d s: {re.escape(str(dst))}\n", result.stdout), result.stdout
    check_packed(dst, folder, s3_folder, 2, 1)


def test_an_existing_dataset_is_replaced_only_with_overwrite(folder, tmp_path):
    dst = tmp_path / "packed"
    pack.pack(str(folder.root), str(dst), shards=3, seed=0)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(UserError, match="already holds a packed dataset.*--overwrite"):
        pack.pack(str(folder.root), str(dst), shards=2, seed=0)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    (dst / "notes.txt").write_text("not the dataset's")
    pack.pack(str(folder.root), str(dst), shards=2, seed=1, overwrite=True)
    (dst / "notes.txt").unlink()  # left alone, and out of check_packed's way
    check_packed(dst, folder, str(folder.root), 2, 1, seed=1)  # the old train-0000?-of-00003 shards are gone


def test_an_unreadable_image_stops_the_pack_and_leaves_no_dataset(s3_server, s3_env, folder, bucket, staging,
                                                                  monkeypatch):
    src, dst = upload_folder(s3_server.client(), folder.root, bucket, "images"), f"s3://{bucket}/packed"
    pack.pack(src, dst, shards=2, seed=0)  # the dataset that --overwrite replaces
    victim = pack.plan(sources.list_imagefolder(src), 4, None, 0)[3].files[0][0]  # first image of the last train shard
    list_imagefolder, move_in, uploaded = sources.list_imagefolder, S3Store.move_in, []

    def list_then_lose_one(root):
        listing = list_imagefolder(root)
        s3_server.client().delete_object(Bucket=bucket, Key=f"images/{victim}")
        return listing

    def spy_move_in(self, path, key):
        uploaded.append(key)
        return move_in(self, path, key)

    monkeypatch.setattr(sources, "list_imagefolder", list_then_lose_one)
    monkeypatch.setattr(S3Store, "move_in", spy_move_in)
    with pytest.raises(DataError) as failure:
        pack.pack(src, dst, shards=4, seed=0, overwrite=True)
    assert f"{src}/{victim} cannot be read" in str(failure.value) and "\n" not in str(failure.value)
    # It failed in the middle: shards 0 and 1 were uploaded (2 was written, its upload maybe cancelled).
    assert uploaded in (shard_names(4, 1)[:2], shard_names(4, 1)[:3])
    assert object_keys(s3_server, bucket, "packed/") == []  # no dataset.json and no shard, old or new
    assert not any(staging.iterdir())


# -- user mistakes through the real command line -----------------------------------------------
def bad_input(case: str, folder, tmp_path: Path) -> tuple[list, list[str]]:
    """(command-line arguments, fragments of the error line) for one mistake."""
    out = tmp_path / "out"
    if case == "source missing":
        return [tmp_path / "nowhere", out], ["dataset folder not found", "nowhere"]
    if case == "empty class":
        src = Path(shutil.copytree(folder.root, tmp_path / "src"))
        for image in (src / "train" / "5").iterdir():
            image.unlink()
        return [src, out], ["class '5'", "has no images"]
    if case == "zero shards":
        return [folder.root, out, "--shards", "0"], ["--shards must be at least 1, not 0"]
    if case == "more shards than images":
        return [folder.root, out, "--shards", "500"], ["--shards 500 is more than the 120 train images"]
    if case == "destination has a dataset":
        out.mkdir()
        (out / "dataset.json").write_text('{"format": "tfrecord"}')
        return [folder.root, out], ["already holds a packed dataset", "--overwrite"]
    if case == "destination bucket missing":
        return [folder.root, "s3://no-such-bucket-here/packed"], ["no-such-bucket-here", "does not exist"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["source missing", "empty class", "zero shards", "more shards than images",
                                  "destination has a dataset", "destination bucket missing"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, folder, s3_server, tmp_path):
    args, fragments = bad_input(case, folder, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    error_line(run_cli("dataset", "pack", *args, env=s3_server.env, timeout=120), *fragments)
    assert sorted(tmp_path.rglob("*")) == before  # DST neither created nor changed
    assert (case != "destination has a dataset" or
            (tmp_path / "out" / "dataset.json").read_text() == '{"format": "tfrecord"}')


def test_the_readme_shows_the_record_layout():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| `(image/[^`]+)` \| (.+) \|$", readme, flags=re.M)
    assert dict(rows) == sources.RECORD_LAYOUT and len(rows) == len(sources.RECORD_LAYOUT)
