"""`alexnet-job`: parse the command line and call the library; nothing else happens here.

Library errors (job.errors.UserError and its kin) become one line on stderr and exit code 2.
TensorFlow and Ray are imported only by the commands that need them, so `--help`, config
errors and `--print-config` answer at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from job import cli_cluster
from job import config as configuration
from job.errors import TrainingFailed, UserError

PROG = "alexnet-job"


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, started_at) or 0
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        # The interpreter's last garbage collections, on exit, would walk every object TensorFlow
        # created (a second here); all that is left is ending, so they are spared the walk.
        gc.freeze()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train the Keras AlexNet data-parallel with Ray Train, here or on Kubernetes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model (on a local Ray cluster, or the one at --address)",
        description="Train a model. Options merge as defaults < --config file < ALEXNET_JOB_<OPTION> "
                    "environment variables < flags. Config file keys are the option names with '_'.")
    train.add_argument("--config", metavar="FILE", help="YAML file of options (keys as below, with '_')")
    train.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    for name, field in configuration.FIELDS.items():
        add_option(train, name, field)
    train.set_defaults(handler=run_train)

    summary = commands.add_parser("summary", help="print a model's Keras summary",
                                  description="Print the Keras summary (layers, shapes, parameters) of a model.")
    summary.add_argument("model", metavar="MODEL", help="one of: " + ", ".join(configuration.MODELS))
    summary.add_argument("--input-shape", metavar="H,W,C", help="input shape (default: the model's own)")
    summary.add_argument("--num-classes", metavar="N", help="output classes (default: the model's own)")
    summary.set_defaults(handler=run_summary)

    predict = commands.add_parser("predict", help="classify images with a trained model",
                                  description="Classify PNG or JPEG images with a trained run's model; "
                                              "images are resized and converted as the model needs.")
    predict.add_argument("model_dir", metavar="RUN",
                         help="a run: a local run folder, s3://.../runs/<run>, or <output>/latest "
                              "(remote runs are downloaded, verified and cached)")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files")
    predict.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per image (default 3)")
    predict.add_argument("--output", choices=("text", "json"), default="text", help="output format")
    predict.set_defaults(handler=run_predict)
    cli_cluster.add_commands(commands)

    runs = commands.add_parser("runs", help="list, show and download published runs",
                               description="Runs published under an output location (local or s3://).")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_commands.add_parser("list", help="a table of the runs under OUTPUT, newest first")
    listing.add_argument("output", metavar="OUTPUT", help="the --output of the training runs (folder or s3://bucket/prefix)")
    listing.add_argument("--output", dest="format", choices=("text", "json"), default="text", help="output format")
    listing.set_defaults(handler=run_runs_list)
    show = runs_commands.add_parser("show", help="print a complete run's manifest")
    show.add_argument("run", metavar="RUN", help="<output>/runs/<run> or <output>/latest")
    show.set_defaults(handler=run_runs_show)
    download = runs_commands.add_parser("download", help="copy a complete run to a folder, verifying checksums")
    download.add_argument("run", metavar="RUN", help="<output>/runs/<run> or <output>/latest")
    download.add_argument("dest", metavar="DIR", help="destination (must not exist, or be empty)")
    download.set_defaults(handler=run_runs_download)

    dataset = commands.add_parser("dataset", help="prepare image datasets for training",
                                  description="Image datasets kept as files, locally or in object storage.")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    pack = dataset_commands.add_parser(
        "pack", help="pack an image folder into sharded TFRecord files",
        description="Pack SRC/{train,val}/<class>/*.jpg|*.jpeg|*.png into TFRecord shards of tf.train.Example "
                    "records (image bytes as they are, label, filename) and DST/dataset.json, written last.")
    pack.add_argument("src", metavar="SRC", help="an image folder (local or s3://bucket/prefix); class names are "
                                                 "the folder names under SRC/train")
    pack.add_argument("dst", metavar="DST", help="where the shards and dataset.json go (local or s3://bucket/prefix)")
    pack.add_argument("--shards", type=int, default=16, metavar="N", help="train shards (default: %(default)s)")
    pack.add_argument("--val-shards", type=int, metavar="N",
                      help="val shards (default: in proportion to val's share of the images, at least 1)")
    pack.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of the random order that mixes classes across shards (default: %(default)s)")
    pack.add_argument("--overwrite", action="store_true", help="replace a dataset already packed at DST")
    pack.set_defaults(handler=run_dataset_pack)
    return parser


def add_option(parser: argparse.ArgumentParser, name: str, field) -> None:
    """A `--flag` for one Config field; values stay raw strings until config.coerce."""
    flag = "--" + name.replace("_", "-")
    help_text = field.metadata["help"] + ("" if field.default is None else f" (default: {field.default})")
    if field.type.startswith("bool"):
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        metavar = {"int": "N", "float": "X", "list[int]": "H,W,C"}.get(field.type.split(" |")[0], "TEXT")
        parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


# ----------------------------------------------------------------------------- commands

def run_train(args, started_at: float) -> int:
    overrides = {name: getattr(args, name) for name in configuration.FIELDS if getattr(args, name) is not None}
    config = configuration.load(args.config, overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from job import data, storage

    config.output = storage.parse_location(config.output).uri  # absolute: workers run elsewhere
    state = storage.run_state(config.output, config.run_name)
    if state == "complete":
        # Finishes a publish whose driver was lost before it moved latest.json; else changes nothing.
        result = storage.finish_publish(config.output, config.run_name, promote_if_better=config.promote_if_better)
        print(f"{result.message}; not training it again (choose another --run-name for a new run)")
        return 0
    splits = data.load(config)  # a missing or corrupt dataset fails here, before Ray starts
    from job import runlogs, train
    # From here on the run has a place in its output: what this command prints is saved there.
    with runlogs.Keeper(config.output, config.run_name, f"driver-{runlogs.stamp(started_at)}") as log:
        print(f"training {config.model} on {config.dataset} ({splits.counts['train']} examples) with "
              f"{config.workers} workers x {max(1, config.gpus_per_worker)} replicas, run {config.run_name}", flush=True)
        try:
            metrics = train.run(config, splits, started_at=started_at)
        except (TrainingFailed, UserError) as error:  # main() prints it; the saved log says it too
            log.add(f"{PROG}: {'error: ' if isinstance(error, UserError) else ''}{error}\n")
            raise
        print(f"test accuracy {metrics['test_accuracy']:.4f}  test loss {metrics['test_loss']:.4f}  "
              f"{metrics['images_per_second']:.0f} img/s  {metrics['wall_time_seconds']:.0f}s")
        print(f"run written to {storage.run_uri(config.output, config.run_name)}")
    return 0


def run_summary(args, started_at: float) -> int:
    if args.model not in configuration.MODELS:
        raise UserError(f"unknown model {args.model!r}; choose one of: {', '.join(configuration.MODELS)}")
    shape = configuration.coerce("input_shape", args.input_shape, "--input-shape")
    classes = configuration.coerce("num_classes", args.num_classes, "--num-classes")
    from job import models
    models.build(args.model, shape, classes).summary()
    return 0


def run_predict(args, started_at: float) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {args.top_k}")
    from job import predict, storage
    results = predict.classify(str(storage.resolve_model(args.model_dir)), args.images, args.top_k)
    if args.output == "json":
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            ranked = ", ".join(f"{c['class']} ({c['probability']:.3f})" for c in result["top"])
            print(f"{result['image']}: {ranked}")
    return 0


def run_runs_list(args, started_at: float) -> int:
    from job import progress, storage
    runs = list(reversed(storage.list_runs(args.output)))
    # Runs still training (or stopped before publishing), from their progress records.
    unfinished = progress.unfinished(args.output, {run.run for run in runs})
    if args.format == "json":
        print(json.dumps([{"run": record["run"], "complete": False, "state": progress.state(record), "progress": record}
                          for record in unfinished] + [vars(run) for run in runs], indent=2))
        return 0
    rows = [(record["run"], "-", "-", f"{progress.state(record)} epoch {record['epoch']}/{record['epochs']} "
             f"step {record['step']}/{record['steps_per_epoch']}" + (
                 f" ETA {progress.duration(record['eta_seconds'])}"
                 if progress.state(record) == "training" and record.get("eta_seconds") is not None else ""), "")
            for record in unfinished]
    rows += [(run.run, run.time or "-", f"{run.test_accuracy:.4f}" if run.test_accuracy is not None else "-",
              "complete" if run.complete else "incomplete", "latest" if run.latest else "") for run in runs]
    header = ("RUN", "PUBLISHED (UTC)", "TEST ACC", "STATE", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_runs_show(args, started_at: float) -> int:
    from job import storage
    print(json.dumps(storage.show_run(args.run), indent=2))
    return 0


def run_runs_download(args, started_at: float) -> int:
    from job import storage
    print(f"downloaded and verified {args.run} into {storage.download_run(args.run, args.dest)}")
    return 0


def run_dataset_pack(args, started_at: float) -> int:
    from job.data import pack
    result = pack.pack(args.src, args.dst, shards=args.shards, val_shards=args.val_shards, seed=args.seed,
                       overwrite=args.overwrite, show_progress=sys.stderr.isatty())
    print(result.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
