"""Submitting a pipeline to a Ray cluster with the Jobs API.

    python -m cluster.submit PIPELINE.yaml --address http://HEAD:8265 [--wait]

The job runs `python -m cluster.pipeline PIPELINE.yaml` on the cluster, so the nodes need this
package installed (the `python` of the environment that ran `ray start`) and the config's
shard and run folders on storage every node sees. Clusters with token authentication (Ray's
default for local clusters since 2.59) need `RAY_AUTH_MODE=token` and the token in this
process's environment.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit_pipeline(
    address: str, config_file: str | os.PathLike, env_vars: dict[str, str] | None = None
) -> str:
    """Submit the pipeline as a Ray job; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = f"python -m cluster.pipeline {shlex.quote(os.fspath(config_file))}"
    runtime_env = {"env_vars": env_vars} if env_vars else None
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def wait_for(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Poll until the job ends (or `timeout_s` passes); returns its final status name."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="submit a pipeline to a Ray cluster")
    parser.add_argument("config", help="a pipeline YAML file (a path the cluster's nodes see)")
    parser.add_argument("--address", required=True, help="the cluster's dashboard address")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    args = parser.parse_args(argv)
    job_id = submit_pipeline(args.address, args.config)
    print(f"submitted {job_id}")
    if not args.wait:
        return 0
    from ray.job_submission import JobSubmissionClient

    status = wait_for(args.address, job_id)
    print(JobSubmissionClient(args.address).get_job_logs(job_id))
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
