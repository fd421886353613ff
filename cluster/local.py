"""The embedded Ray instance (`make demo`, a pipeline run without `--address`): one machine,
reachable from this machine only.

Ray's servers (GCS, raylet, object manager, each worker's gRPC server, the dashboard agent, the
runtime-env agent) bind to the node's IP address, and a plain `ray.init()` takes the machine's
outward address as that IP: on a shared or cloud machine every one of them is open to the
network, and anyone who reaches them can run code as this user. Here the node IP is loopback.
Ray maps a node IP of 127.0.0.1 to the outward address unless it runs as a single-machine
instance (its own default on macOS and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so that
mode is switched on for this process and the Ray processes it starts.

A real cluster is a different matter: its nodes must reach each other, so `ray start` binds to
the node IPs, and the cluster is protected by Ray's token authentication (on by default since
Ray 2.59: clients and jobs need `RAY_AUTH_MODE=token` and the cluster's token) and by the
network it sits in; the dashboard (job submission) listens on 127.0.0.1 unless
`--dashboard-host` says otherwise. See the README's section on clusters.

The embedded instance's workers also run as nice as the command that started it. Ray starts
every worker at niceness 15 by default (`RAY_worker_niceness`), so that on a cluster node its
own servers stay responsive; on a machine shared with anything else that makes the training,
which here is the whole job, take what the other processes leave: beside two busy processes
on two cores, a worker at 15 gets about 3% of a core (CFS weights: 36 against 1024).
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch: "0" = this machine only
WORKER_NICENESS = "RAY_worker_niceness"  # added to the raylet's niceness for each worker


def local_environment() -> dict[str, str]:
    """Environment variables for the Ray processes of an instance on this machine alone: on
    loopback, and workers as nice as the raylet (unless the caller set a niceness)."""
    return {SINGLE_MACHINE: "0", WORKER_NICENESS: os.environ.get(WORKER_NICENESS, "0")}


def start_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """`ray.init` of a new single-machine instance listening on 127.0.0.1 only; `kwargs` go to
    `ray.init` (e.g. `log_to_driver=False`)."""
    os.environ.update(local_environment())
    import ray
    from ray._private import ray_constants

    # read once when Ray is imported; a process that imported Ray before this call needs it set
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        # always a new instance: never one left running on this machine (by a killed driver
        # whose Ray outlived it, or another user's), which `ray.init()` would otherwise join
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        **kwargs,
    )
