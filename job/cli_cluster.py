"""`alexnet-job submit | status | list | logs | cancel | wait | prune`: training jobs on Kubernetes.

Parsing and printing only; job/cluster.py does the work. Registered by job/cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone


def add_commands(commands) -> None:
    def command(name, help_text, handler, description=None):
        parser = commands.add_parser(name, help=help_text, description=description or help_text[0].upper() + help_text[1:] + ".")
        parser.set_defaults(handler=handler)
        return parser

    submit = command("submit", "submit a training RayJob to the current Kubernetes cluster", run_submit,
                     "Render the alexnet-train chart with helm (values file and --set as for `helm install`) and "
                     "create its RayJob with the current kube context (or in-cluster config). With --manifest, "
                     "create the RayJob a schedule's ConfigMap holds instead (what the chart's CronJob runs).")
    submit.add_argument("-f", "--values", action="append", default=[], metavar="FILE", help="chart values file (repeatable)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="chart value (repeatable)")
    submit.add_argument("--name", help="release and RayJob name (default: alexnet-train-<UTC time>)")
    submit.add_argument("--manifest", metavar="FILE", help="a RayJob manifest rendered by the chart (schedule mode)")
    submit.add_argument("--generate-name", action="store_true",
                        help="with --manifest: give the RayJob a unique name and name its run after it")
    submit.add_argument("--promote-if-better", metavar="METRIC",
                        help="with --manifest: publish the run's model only if it beats the current one on METRIC")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends (always with --manifest)")
    common(submit)

    status = command("status", "show a RayJob's state and its run's progress", run_status)
    status.add_argument("name", metavar="NAME")
    status.add_argument("-w", "--watch", action="store_true",
                        help="show it again as it changes, until the job ends; exit 0 only if it succeeded")
    status.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                        help="with --watch: how often to look (default: %(default)s)")
    common(status)

    listing = command("list", "list RayJobs, newest first", run_list)
    listing.add_argument("-l", "--selector", metavar="LABEL=VALUE", help="label selector, as kubectl's -l")
    common(listing)

    logs = command("logs", "print a RayJob's driver output (from its submitter or head pod)", run_logs)
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    common(logs)

    cancel = command("cancel", "delete a RayJob with its Ray cluster and pods", run_cancel)
    cancel.add_argument("name", metavar="NAME")
    common(cancel)

    wait = command("wait", "wait until a RayJob ends; exit 0 only if it succeeded", run_wait)
    wait.add_argument("name", metavar="NAME")
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 2)")
    common(wait)

    prune = command("prune", "delete all but the newest N finished RayJobs of a schedule", run_prune)
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="RayJobs to keep")
    prune.add_argument("--selector", required=True, metavar="LABEL=VALUE", help="which RayJobs (e.g. alexnet-job/schedule=NAME)")
    common(prune)


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="namespace (default: the kube context's, or the pod's)")
    parser.add_argument("--context", help="kube context (default: the current one)")
    parser.add_argument("--output", choices=("text", "json"), default="text", help="output format")


def connect(args):
    from job import cluster
    return cluster.connect(args.namespace, args.context)


def emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if args.output == "json" else text, flush=True)


def progress_printer(args):
    if args.output == "json":
        return None

    def show(info):
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        job = f" job {info['job_status']}" if info["job_status"] else ""
        why = f" ({info['reason']})" if info["reason"] else ""
        print(f"{stamp} {info['name']}: {info['job_deployment_status']}{job}, workers "
              f"{info['workers_ready']}/{info['workers_desired']} ready{why}", flush=True)
    return show


# ----------------------------------------------------------------------------- handlers

def run_submit(args, started_at) -> int:
    from job import cluster
    from job.errors import UserError

    if args.manifest:
        if args.values or args.set or args.name:
            raise UserError("--manifest takes the RayJob as rendered: it cannot be combined with -f, --set or --name")
        rayjob = cluster.read_manifest(args.manifest)  # the user's own input is checked first
        connection = connect(args)
        submitted = cluster.submit_manifest(connection, rayjob, args.generate_name, args.promote_if_better)
        wait_for = True
    else:
        if args.generate_name or args.promote_if_better:
            raise UserError("--generate-name and --promote-if-better go with --manifest")
        name = args.name or f"alexnet-train-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        cluster.check_values_files(args.values)  # the user's own input and tools are checked first
        cluster.helm_binary()
        connection = connect(args)
        submitted = cluster.submit(connection, name, args.values, args.set)
        wait_for = args.wait
    text = (f"submitted RayJob {submitted.name} in namespace {submitted.namespace}\n"
            f"run: {submitted.run_name or '(named by the job when it starts)'}\n"
            f"model: {submitted.model_uri or '(under the chart output, runs/<run>/)'}")
    if not wait_for:
        emit(args, submitted.to_dict(), text)
        return 0
    if args.output == "text":
        print(text, flush=True)
    info = cluster.wait(connection, submitted.name, progress_printer(args))
    if args.output == "json":
        emit(args, {**submitted.to_dict(), "status": info}, "")
    return 0


def run_status(args, started_at) -> int:
    from job import cluster, progress
    from job.errors import TrainingFailed, UserError
    if args.interval <= 0:
        raise UserError(f"--interval must be a positive number of seconds, not {args.interval:g}")
    connection = connect(args)
    shown, output = None, None
    while True:
        rayjob = cluster.get(connection, args.name)
        info = cluster.summary(rayjob)
        output = output or cluster.job_output(connection, rayjob)  # its ConfigMap: read until found
        info["progress"] = progress.read(output, info["run_name"]) if output and info["run_name"] else None
        info["published"] = published(output, info["run_name"])
        if not args.watch:
            emit(args, info, status_text(info))
            return 0
        seen = {k: v for k, v in info.items() if k != "progress"}, (info["progress"] or {}).get("updated_at")
        if seen != shown:
            if args.output == "json":
                print(json.dumps(info), flush=True)  # one document per line
            else:
                if sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # redraw in place
                print(f"{datetime.now(timezone.utc).strftime('%H:%M:%S')}\n{status_text(info)}\n", flush=True)
            shown = seen
        if cluster.is_terminal(info):
            if not cluster.succeeded(info):
                raise TrainingFailed(f"RayJob {args.name} ended {info['job_deployment_status']}"
                                     f"{' / ' + info['job_status'] if info['job_status'] else ''}")
            return 0
        time.sleep(args.interval)


def status_text(info: dict) -> str:
    from job import progress
    rows = [("name", info["name"]), ("namespace", info["namespace"]), ("run", info["run_name"] or "-"),
            ("deployment", info["job_deployment_status"]), ("job", info["job_status"] or "-"),
            ("reason", info["reason"] or "-"), ("message", info["message"] or "-"),
            ("started", info["start_time"] or "-"), ("ended", info["end_time"] or "-"),
            ("ray cluster", info["ray_cluster"] or "-"),
            ("workers", f"{info['workers_ready']}/{info['workers_desired']} ready"),
            ("progress", progress.describe(info["progress"]) if info["progress"] else "-"),
            ("published", describe_published(info["published"]))]
    return "\n".join(f"{key + ':':<12} {value}" for key, value in rows)


def published(output: str | None, run_name: str | None) -> dict | None:
    """The run's published metrics from its storage, once its manifest exists."""
    if not (output and run_name):
        return None
    from job import storage
    uri = storage.run_uri(output, run_name)
    try:
        manifest = storage.show_run(uri)
    except storage.StorageError as error:  # not published yet, or storage not reachable from here
        return {"uri": uri, "complete": False, "note": str(error)}
    return {"uri": uri, "complete": True, "published_at": manifest.get("published_at"),
            **(manifest.get("metrics") or {})}


def describe_published(record: dict | None) -> str:
    if record is None:
        return "-"
    if not record["complete"]:
        return f"not yet ({record['note']})"
    return f"test accuracy {record['test_accuracy']:.4f}, test loss {record['test_loss']:.4f} at {record['uri']}"


def run_list(args, started_at) -> int:
    from job import cluster
    infos = [cluster.summary(job) for job in cluster.list_jobs(connect(args), args.selector)]
    header = ("NAME", "DEPLOYMENT", "JOB", "WORKERS", "CREATED")
    rows = [(i["name"], i["job_deployment_status"], i["job_status"] or "-",
             f"{i['workers_ready']}/{i['workers_desired']}", i["created"]) for i in infos]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows])
    emit(args, infos, text if rows else "no RayJobs")
    return 0


def run_logs(args, started_at) -> int:
    from job import cluster
    connection = connect(args)
    lines = []
    write = lines.append if args.output == "json" else (lambda line: print(line, flush=True))
    source = "pod"
    try:
        cluster.logs(connection, args.name, args.follow, write)
    except cluster.ClusterError as no_pod:
        # The RayJob's pods are gone (or not there yet): what its run saved, if it saved anything.
        saved = cluster.saved_logs(connection, args.name)
        if not saved:
            raise no_pod from None
        uri, driver_log = saved
        source = uri
        print(f"(the pods of RayJob {args.name} are gone: its driver's output as saved with the run, {uri})",
              file=sys.stderr, flush=True)
        for line in driver_log.splitlines():
            write(line)
    if args.output == "json":
        emit(args, {"name": args.name, "source": source, "lines": lines}, "")
    return 0


def run_cancel(args, started_at) -> int:
    from job import cluster
    connection = connect(args)
    cluster.cancel(connection, args.name)
    emit(args, {"name": args.name, "namespace": connection.namespace, "cancelled": True},
         f"cancelled RayJob {args.name}: its Ray cluster and pods are being deleted")
    return 0


def run_wait(args, started_at) -> int:
    from job import cluster
    from job.errors import TrainingFailed
    connection = connect(args)
    try:
        info = cluster.wait(connection, args.name, progress_printer(args), args.timeout)
    except TrainingFailed:
        if args.output == "json":
            emit(args, cluster.summary(cluster.get(connection, args.name)), "")
        raise
    emit(args, info, f"RayJob {args.name} succeeded")
    return 0


def run_prune(args, started_at) -> int:
    from job import cluster
    result = cluster.prune(connect(args), args.keep, args.selector)
    text = (f"kept {len(result['kept'])}, deleted {len(result['deleted'])}"
            + (f": {', '.join(result['deleted'])}" if result["deleted"] else "")
            + (f"; still running, not deleted: {', '.join(result['still_running'])}" if result["still_running"] else ""))
    emit(args, result, text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `alexnet-job`")
