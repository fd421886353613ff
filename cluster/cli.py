"""`vastdet submit` and `vastdet jobs`: the cluster's commands, added to the `vastdet` command
from above (the `vastdet.commands` entry-point group), so `vastdet/` never imports Ray."""

from __future__ import annotations

import argparse
import json
import sys


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def add_commands(subparsers) -> None:
    """Register `submit` and `jobs` on the `vastdet` command's subparsers."""
    submit = subparsers.add_parser(
        "submit",
        help="run a pipeline (stage 1, stage 2, evaluation) on a Ray cluster, or locally",
    )
    submit.add_argument("config", help="a pipeline YAML file (a path the job will see)")
    submit.add_argument(
        "--address",
        help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: run here, on an embedded "
        "Ray instance listening on 127.0.0.1)",
    )
    submit.add_argument("--working-dir", help="a folder shipped with the job (its files)")
    submit.add_argument(
        "--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable; values are never printed)",
    )  # fmt: skip
    submit.add_argument(
        "--pip", action="append", default=[], help="a pip requirement for the job (repeatable)"
    )
    submit.add_argument("--wait", action="store_true", help="follow the job's log until it ends")
    submit.set_defaults(handler=_submit)

    jobs = subparsers.add_parser("jobs", help="the Ray cluster's jobs: list, status, logs, stop")
    jobs.add_argument("--address", help="the Jobs API (default: RAY_ADDRESS, else the local one)")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    actions.add_parser("list", help="every job, newest last").set_defaults(handler=_list)
    status = actions.add_parser("status", help="one job's state")
    status.add_argument("job_id")
    status.set_defaults(handler=_status)
    logs = actions.add_parser("logs", help="one job's output")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="until the job ends")
    logs.set_defaults(handler=_logs)
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.set_defaults(handler=_stop)


def _submit(args: argparse.Namespace) -> int:
    from cluster.jobs import job_logs, runtime_environment, submit_pipeline, wait_for

    if args.address is None:  # the embedded instance: the pipeline runs in this process
        from cluster.pipeline import main as run_here

        return run_here([args.config])
    env = runtime_environment(args.working_dir, dict(args.env), args.pip)
    job_id = submit_pipeline(args.address, args.config, env)
    print(f"submitted {job_id}")
    if not args.wait:
        return 0
    for chunk in job_logs(args.address, job_id, follow=True):
        sys.stdout.write(chunk)
    status = wait_for(args.address, job_id)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _list(args: argparse.Namespace) -> int:
    from cluster.jobs import list_jobs

    for job in list_jobs(args.address):
        print(f"{job['job_id']:<28} {job['status']:<10} {job['entrypoint']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster.jobs import job_status

    print(json.dumps(job_status(args.address, args.job_id), indent=1, default=str))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from cluster.jobs import job_logs

    for chunk in job_logs(args.address, args.job_id, args.follow):
        sys.stdout.write(chunk)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from cluster.jobs import stop_job

    stopped = stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
