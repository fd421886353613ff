"""Pipelines as Ray jobs: submission with a runtime environment, and the jobs' status, logs and
stopping, over Ray's Jobs API (`ray.job_submission`).

A job runs `python -m cluster.pipeline PIPELINE.yaml` on the cluster: the nodes need vastdet,
either installed in the environment that ran `ray start` or shipped with the job
(`working_dir`, `pip`). Clusters with token authentication (Ray's default since 2.59) need
`RAY_AUTH_MODE=token` and the token in this process's environment; nothing here turns it off.
Environment variables given to a job are passed to it and never printed: job listings show
their names only.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SECRET = "***"
AGENT_WAIT_S = 120.0  # how long a submission waits for a new cluster's job agent


def client(address: str | None):
    """A Jobs API client for `address` (default: RAY_ADDRESS, else the local dashboard)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def runtime_environment(
    working_dir: str | None = None,
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
) -> dict | None:
    """A Ray runtime environment: a working directory shipped to the cluster, environment
    variables and pip requirements; None when empty."""
    env = {}
    if working_dir:
        env["working_dir"] = working_dir
    if env_vars:
        env["env_vars"] = dict(env_vars)
    if pip:
        env["pip"] = list(pip)
    return env or None


def submit_pipeline(
    address: str | None, config_file: str | os.PathLike, runtime_env: dict | None = None
) -> str:
    """Submit the pipeline as a Ray job; returns the job id. A cluster that has just started
    may have no job agent registered yet (Ray answers 500, "No available agent"): the
    submission is tried again for up to `AGENT_WAIT_S` seconds before that error is raised."""
    entrypoint = f"python -m cluster.pipeline {shlex.quote(os.fspath(config_file))}"
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait_for(address: str | None, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Poll until the job ends (or `timeout_s` passes); returns its final status name."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def redacted(runtime_env: dict | None) -> dict | None:
    """A runtime environment fit to print: environment variable values replaced."""
    if not runtime_env:
        return runtime_env
    env = dict(runtime_env)
    if isinstance(env.get("env_vars"), dict):
        env["env_vars"] = {k: SECRET for k in env["env_vars"]}
    return env


def describe(job) -> dict:
    """The printable facts of a Jobs API `JobDetails`."""
    return {
        "job_id": job.submission_id or job.job_id,
        "status": str(job.status.value if hasattr(job.status, "value") else job.status),
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "runtime_env": redacted(job.runtime_env),
    }


def list_jobs(address: str | None) -> list[dict]:
    return [describe(job) for job in client(address).list_jobs()]


def job_status(address: str | None, job_id: str) -> dict:
    return describe(client(address).get_job_info(job_id))


def job_logs(address: str | None, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's output so far, or with `follow` its lines as they come until it ends."""
    jobs = client(address)
    if not follow:
        yield jobs.get_job_logs(job_id)
        return
    import asyncio

    # tail_job_logs is an asynchronous generator: step it on a loop of our own, chunk by chunk
    loop = asyncio.new_event_loop()
    chunks = jobs.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop_job(address: str | None, job_id: str) -> bool:
    return client(address).stop_job(job_id)
