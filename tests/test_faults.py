"""Faults in storage and on disks: nothing already written is lost, and the message says what
happened and what to do. Each test injects the fault into the real component: a small tmpfs
file system that fills up (mounted here, which needs root, as on these machines and CI), an
HTTP shard server that drops connections, a TCP proxy that cuts the moto S3 server off in the
middle of a checkpoint upload, and killed Ray drivers and workers."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import REPO, config, dataset, finish, launch, start_ranks  # noqa: F401 - the shared fixture
from test_ray_cluster import s3_server  # noqa: F401 - the moto server

from vastdet.runtime.checkpoints import complete_tags

OUTAGE_S = 20.0  # how long the storage server answers nothing


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    """A tmpfs of `megabytes` mounted at `path`; yields a function that resizes it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")

    def resize(size: int) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={size}M", str(path)], check=True, capture_output=True
        )

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def vastdet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vastdet.cli", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_line_and_the_run_resumes_once_there_is_room(
    dataset,  # noqa: F811
    tmp_path,
):
    # how much one checkpoint of this run takes, measured on a roomy disk
    sizing = tmp_path / "sizing"
    done = vastdet("train", "--config", str(config(dataset, sizing, steps=2, checkpoint_every=2)))
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint_mb = folder_bytes(sizing / "checkpoints") / 1e6
    disk = tmp_path / "disk"
    with small_disk(disk, int(checkpoint_mb * 1.5) + 1) as resize:
        out = disk / "run"
        cfg = config(dataset, out, steps=6, checkpoint_every=2)
        done = vastdet("train", "--config", str(cfg))
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("vastdet: error:")]
        assert len(errors) == 1, done.stderr[-3000:]
        newest = out / "checkpoints" / "step_00000002"
        assert (
            f"no space left to write checkpoint {out / 'checkpoints' / 'step_00000004'}"
            in (errors[0])
        )
        assert "a checkpoint of this run takes about" in errors[0] and "MB free" in errors[0]
        assert f"the newest complete checkpoint is {newest}" in errors[0]
        assert errors[0].endswith(f"vastdet train --config {cfg}")
        # nothing lost: step 2 intact, the cut checkpoint gone (it gave its space back)
        assert complete_tags(out / "checkpoints") == ["step_00000002"]
        assert not list((out / "checkpoints").glob("*.partial"))
        resize(int(checkpoint_mb * 4) + 10)
        done = vastdet("train", "--config", str(cfg))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from step_00000002 at step 2" in done.stderr
        assert complete_tags(out / "checkpoints")[-1] == "step_00000006"


def own_disk(disk: Path, seen_as: Path) -> list[str]:
    """A command prefix that runs a process in a mount namespace of its own where `disk` is
    mounted over `seen_as`: that process's node has its own disk under the shared path."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode
    ):
        pytest.skip("no mount namespaces here to give one rank a disk of its own")
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(disk), str(seen_as)]  # fmt: skip


@pytest.mark.slow
def test_a_full_disk_on_one_node_stops_every_rank_with_the_one_line(dataset, tmp_path):  # noqa: F811
    """Two ranks, a disk per node: rank 1's fills while it writes its ZeRO-1 partition of a
    checkpoint, rank 0's has room and finishes its part. Every rank must end with exit 2 and
    the line naming the checkpoint (no rank left waiting for one that is gone, no traceback
    from the closed connection), and on both disks the previous checkpoint stays the newest
    complete one. (Resuming from disks per node needs the model's file on each node, which
    DeepSpeed writes on one: the cluster path shares checkpoints through storage instead.)"""
    sizing = tmp_path / "sizing"
    launch(
        ["vastdet.cli", "train", "--config",
         str(config(dataset, sizing, steps=2, checkpoint_every=2, zero_stage=1))], 2,
    )  # fmt: skip
    rank1_mb = (
        sum(p.stat().st_size for p in (sizing / "checkpoints").rglob("*rank_1*") if p.is_file())
        / 1e6
    )
    out = tmp_path / "run"
    out.mkdir()
    with small_disk(tmp_path / "disk1", int(rank1_mb * 1.5) + 1):
        cfg = config(dataset, out, steps=6, checkpoint_every=2, zero_stage=1)
        args = ["vastdet.cli", "train", "--config", str(cfg)]
        wrap = {1: own_disk(tmp_path / "disk1", out)}
        procs = start_ranks(args, 2, wrap, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        codes, errors = finish(procs, timeout=300)
        assert codes == [2, 2], [e[-2000:] for e in errors]  # None: still waiting, killed
        for rank_errors in errors:
            assert "Traceback" not in rank_errors, rank_errors[-3000:]
            lines = [ln for ln in rank_errors.splitlines() if ln.startswith("vastdet: error:")]
            assert len(lines) == 1, rank_errors[-3000:]
            assert (
                f"no space left to write checkpoint {out / 'checkpoints' / 'step_00000004'}"
                in lines[0]
            )
            newest = out / "checkpoints" / "step_00000002"
            assert f"the newest complete checkpoint is {newest}" in lines[0]
        assert "step_00000004 (on rank 1's disk):" in errors[0]  # rank 0 says whose disk
        for node in (out, tmp_path / "disk1"):
            assert complete_tags(node / "checkpoints") == ["step_00000002"]
            assert not list((node / "checkpoints").glob("*.partial"))
        # each node keeps its own part of step 2 (rank 1's optimizer partition on its disk)
        step2 = "checkpoints/step_00000002/zero_pp_rank_{}_mp_rank_00_optim_states.pt"
        assert (tmp_path / "disk1" / step2.format(1)).is_file()
        assert (out / step2.format(0)).is_file() and not (out / step2.format(1)).exists()


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_export_and_names_the_file(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    done = vastdet("train", "--config", str(config(dataset, run, steps=2, checkpoint_every=2)))
    assert done.returncode == 0, done.stderr[-2000:]
    first = tmp_path / "first.pt"
    assert vastdet("export", str(run), "-o", str(first)).returncode == 0
    size_mb = first.stat().st_size / 1e6
    disk = tmp_path / "disk"
    with small_disk(disk, int(size_mb * 1.5) + 1):
        target = disk / "model.pt"
        assert vastdet("export", str(run), "-o", str(target)).returncode == 0
        before = target.read_bytes()
        done = vastdet("export", str(run), "-o", str(target))  # no room for a second copy
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"no space left to write {target}: it needs more than" in done.stderr
        assert "the previous model.pt is intact" in done.stderr
        assert target.read_bytes() == before  # and it still loads
        assert torch.load(target, map_location="cpu", weights_only=True)["format"]
        assert not [p for p in disk.iterdir() if p.name.startswith(".tmp")]


def test_a_full_disk_names_the_shard_it_could_not_write(tmp_path):
    tax = tmp_path / "tax.json"
    from taxonomy import Node, Taxonomy, save_taxonomy

    save_taxonomy(Taxonomy([Node("a", "thing", (), 1), Node("b", "kind", ("a",), 2)]), tax)
    disk = tmp_path / "disk"
    with small_disk(disk, 1):
        done = vastdet(
            "data", "synth", "--taxonomy", str(tax), "-o", str(disk / "syn"), "--shards",
            "--train", "400", "--val", "0", "--max-samples", "50", "--min-side", "320",
        )  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"no space left to write {disk / 'syn' / 'shards' / 'train'}/" in done.stderr
        shards = sorted((disk / "syn" / "shards" / "train").glob("*.tar"))
        assert not [p for p in shards if p.name.startswith(".tmp")]  # only whole shards remain


def test_metrics_json_on_a_full_disk_keeps_the_previous_one(tmp_path):
    from taxonomy.files import NoSpaceError
    from vastdet.evaluation.runner import write_json

    disk = tmp_path / "disk"
    with small_disk(disk, 1):
        target = disk / "metrics.json"
        write_json(target, {"AP": 0.5})
        with pytest.raises(NoSpaceError, match=f"no space left to write {target}"):
            write_json(target, {"AP": 0.6, "padding": "x" * 3_000_000})
        assert yaml.safe_load(target.read_text()) == {"AP": 0.5}


class DroppingShardServer:
    """Serves a folder over HTTP on loopback; a `.tar` body is cut after `cut` bytes (the socket
    closed mid-body) on the first `drops` requests for each shard. Honours `Range`, or, with
    `refuse_ranges`, answers it with 503 (a server gone for good)."""

    def __init__(self, root: Path, cut: int, drops: int, refuse_ranges: bool = False):
        import http.server
        import threading

        self.requests: list[tuple[str, str | None]] = []
        served: dict[str, int] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                wanted = self.headers.get("Range")
                owner.requests.append((self.path, wanted))
                if wanted and refuse_ranges:
                    self.send_error(503)
                    return
                if wanted:
                    start = int(wanted.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                times = served.get(self.path, 0)
                served[self.path] = times + 1
                if path.suffix == ".tar" and times < drops and len(body) > cut:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the peer sees the connection end mid-body
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def image_ids(shards) -> tuple[list[int], dict]:
    from pipelines.loader import eval_loader
    from pipelines.transforms import no_augmentation

    loader = eval_loader(shards, 2, no_augmentation(), num_workers=0, rank=0, world_size=1)
    ids = sorted(int(t["image_id"]) for batch in loader if not batch.empty for t in batch.targets)
    return ids, loader.skipped()


def test_a_shard_server_that_drops_the_connection_mid_shard_is_read_on_from_where_it_broke(
    dataset,  # noqa: F811
    monkeypatch,
):
    from pipelines import sources

    monkeypatch.setattr(sources, "HTTP_BACKOFF_S", 0.01)
    expected, _ = image_ids(dataset / "val")
    with DroppingShardServer(dataset, cut=3000, drops=2) as server:
        ids, skipped = image_ids(f"{server.url}/val")
    assert ids == expected and not skipped  # every image, none twice, nothing skipped
    # each reconnection asked for the rest from the byte the broken one had reached
    for shard in {path for path, wanted in server.requests if wanted}:
        ranges = [wanted for path, wanted in server.requests if path == shard and wanted]
        assert ranges == [f"bytes={3000 * k}-" for k in range(1, len(ranges) + 1)], ranges


def test_a_shard_server_that_goes_away_costs_that_shards_rest_counted_and_no_hang(
    dataset,  # noqa: F811
    monkeypatch,
):
    from pipelines import sources

    monkeypatch.setattr(sources, "HTTP_BACKOFF_S", 0.01)
    expected, _ = image_ids(dataset / "val")
    with DroppingShardServer(dataset, cut=12000, drops=1, refuse_ranges=True) as server:
        ids, skipped = image_ids(f"{server.url}/val")
    assert set(ids) < set(expected) and ids  # the samples before each break are kept
    assert sum(skipped.values()) >= 1  # and the break is counted, not hidden
    retries = [path for path, wanted in server.requests if wanted]
    assert len(retries) == len(set(retries)) * sources.HTTP_RETRIES  # then it gave up


def ray_train_workers() -> list[int]:
    """Live Ray Train worker processes (their loader workers, which inherit the title, left
    out)."""
    from two_nodes import train_worker_pids

    return train_worker_pids()


def snapshot_checkpoints(storage: Path) -> dict[str, int]:
    """Checkpoints each Ray run in a storage folder has registered."""
    counts = {}
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            counts[snapshot.parent.name] = len(
                json.loads(snapshot.read_text()).get("checkpoint_results", [])
            )
        except ValueError:
            pass
    return counts


def start_pipeline(pipeline: Path) -> subprocess.Popen:
    from cluster.local import local_environment

    env = {
        **os.environ, **local_environment(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.pipeline", str(pipeline), "--num-cpus", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )  # fmt: skip


def wait_until(condition, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # Ray on a busy 2-core machine starts slowly
def test_a_killed_driver_resubmitted_and_a_killed_evaluation_worker_lose_nothing(
    dataset,  # noqa: F811
    tmp_path,
):
    """The driver (and the local Ray it started) is killed while stage 2 trains, after its
    first checkpoint reached storage; the same command again skips stage 1, resumes stage 2
    from its newest checkpoint (no step after it trained twice) and evaluates. Then a worker of
    the evaluation job is killed: the job restarts it and the metrics equal the first ones."""
    import re
    import signal

    stage1 = yaml.safe_load(
        config(dataset, tmp_path / "s1", model="cq_dino_tiny_stage1", steps=2).read_text()
    )
    stage2 = yaml.safe_load(
        config(
            dataset, tmp_path / "s2", evaluate=True, model="cq_dino_tiny", steps=12,
            checkpoint_every=2,
        ).read_text()
    )  # fmt: skip
    settings = {"stage1": stage1, "stage2": stage2, "num_workers": 2, "max_failures": 1}
    settings["run_dir"] = str(tmp_path)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(settings))
    storage = tmp_path / "ray"

    def stage2_checkpointed() -> bool:
        return any(n >= 1 for run, n in snapshot_checkpoints(storage).items() if "-stage2-" in run)

    first = start_pipeline(pipeline)
    try:
        wait_until(stage2_checkpointed, first)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone already if it failed)
            os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray, at once
        first.wait(timeout=60)
    state = json.loads((tmp_path / "pipeline.json").read_text())["steps"]
    assert state["stage1"]["status"] == "finished" and state["stage2"]["status"] == "running"

    again = start_pipeline(pipeline)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-4000:]
    assert "stage1 finished earlier" in output
    steps = [int(m.group(1)) for m in re.finditer(r"stage2 +step +(\d+)/12", output)]
    restored = steps[0] - 1
    assert restored >= 2 and restored % 2 == 0, steps  # from a checkpoint in storage
    assert steps == list(range(restored + 1, 13)), steps  # each later step trained once
    rows = [r for r in read_rows(tmp_path / "s2") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first_metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert first_metrics["images"] == 5

    # the evaluation again (a changed setting makes it a new step: loader processes, which do
    # not change a metric), one of its Ray workers killed
    settings["evaluation"] = {"settings": {"batch_size": 1, "num_workers": 0}}
    pipeline.write_text(yaml.safe_dump(settings))
    third = start_pipeline(pipeline)
    killed = []

    def eval_worker_killed() -> bool:
        running = json.loads((tmp_path / "pipeline.json").read_text())["steps"]
        if running.get("eval", {}).get("status") == "running":
            pids = ray_train_workers()
            if len(pids) == 2:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
        return bool(killed)

    wait_until(eval_worker_killed, third)
    output = third.communicate(timeout=900)[0]
    assert third.returncode == 0, output[-4000:]
    assert "stage2 finished earlier" in output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("AP", "AP50", "AR100", "AR_C", "images", "detections"):
        assert metrics[key] == pytest.approx(first_metrics[key], abs=1e-9), key


def read_rows(run_dir: Path) -> list[dict]:
    from vastdet.runtime.metrics import read_metrics

    return read_metrics(run_dir)


class FlakyProxy:
    """A TCP proxy on loopback in front of a server. The first time a request whose bytes match
    `trigger` (a bytes regex) passes through, it cuts that connection mid-request and then, for `outage_s`
    seconds, closes every connection it is offered and every one in flight: the server
    "stops answering" and comes back, its stored objects intact."""

    def __init__(self, target_port: int, trigger: bytes, outage_s: float):
        import re
        import socket
        import threading

        self.target = ("127.0.0.1", target_port)
        self.trigger, self.outage_s = re.compile(trigger), outage_s
        self.down_until = 0.0
        self.cut: list[float] = []  # when the outage began
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open: set = set()
        threading.Thread(target=self.accept, daemon=True).start()

    def down(self) -> bool:
        import time

        return time.monotonic() < self.down_until

    def close_all(self) -> None:
        with self.lock:
            for sock in list(self.open):
                with contextlib.suppress(OSError):
                    sock.close()
            self.open.clear()

    def accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down():
                self.refused += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.update((client, server))
            for a, b, watch in ((client, server, True), (server, client, False)):
                threading.Thread(target=self.pipe, args=(a, b, watch), daemon=True).start()

    def pipe(self, source, sink, watch: bool) -> None:
        import time

        try:
            while chunk := source.recv(65536):
                if self.down():
                    break
                if watch and not self.cut and self.trigger.search(chunk):
                    self.cut.append(time.monotonic())
                    self.down_until = time.monotonic() + self.outage_s
                    sink.sendall(chunk[: len(chunk) // 2])  # half a request reaches the server
                    self.close_all()
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.listener.close()
        self.close_all()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # Ray on a busy 2-core machine starts slowly
def test_storage_that_stops_answering_during_a_checkpoint_upload_loses_nothing(
    s3_server,  # noqa: F811
    dataset,  # noqa: F811
    tmp_path,
):
    """The S3 server's connection is cut in the middle of the second checkpoint's upload and it
    answers nothing for a while, then comes back. The stage goes on: nothing half uploaded is
    restored, each step after the restored checkpoint trains once, and the losses are an
    uninterrupted run's."""
    from test_ray_cluster import BUCKET, progress_steps, resumed_once, two_node_runs

    moto_port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    # Ray names a checkpoint's folder by its time: the one holding step 4, the second
    second = rb"/ray-outage/outage/checkpoint_[^/ ]+/checkpoints/step_00000004/"
    proxy = FlakyProxy(moto_port, second, OUTAGE_S)
    runs = [{"name": "straight", "kill": False}, {"name": "outage", "kill": False}]
    through_proxy = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    try:
        result = two_node_runs(dataset, tmp_path, f"s3://{BUCKET}/ray-outage", runs, through_proxy)
    finally:
        proxy.close()
    assert proxy.cut, "the upload was never cut: the test did not exercise the fault"
    assert proxy.refused, "no connection came during the outage: it was not felt"
    straight, cut = result["straight"], result["outage"]
    assert straight["error"] is None and cut["error"] is None, (straight["error"], cut["error"])
    assert cut["checkpoint"].startswith(f"{BUCKET}/ray-outage/outage/")
    # the failed upload failed the step; the group restarted from a checkpoint that had been
    # stored whole (step 2, or step 4 had a retry completed it) and trained each later step once
    assert resumed_once(progress_steps(cut["lines"]), 8) in (None, 2, 4)
    # the same training as without the outage: nothing half uploaded was restored
    assert [r["step"] for r in cut["rows"]] == list(range(1, 9))
    for a, b in zip(straight["rows"], cut["rows"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)


def test_a_restore_waits_out_storage_that_does_not_answer_and_names_it_when_it_never_does(
    s3_server,  # noqa: F811
    tmp_path,
    capfd,
):
    """A restarted worker group reads its checkpoint from storage that is still down (the
    outage that failed the upload often outlasts a restart): the read waits it out and the
    folder arrives whole; storage that stays down past the window fails naming the path."""
    import time

    from ray.train import Checkpoint
    from test_ray_cluster import BUCKET, upload

    from cluster.storage import StorageUnavailableError, missing_files
    from cluster.workers import NOTE, fetch_checkpoint
    from pipelines.sources import s3_filesystem

    tag = "step_00000002"
    kit = tmp_path / "kit"
    (kit / "checkpoints" / tag).mkdir(parents=True)
    written = {
        f"checkpoints/{tag}/mp_rank_00_model_states.pt": os.urandom(200_000),
        f"checkpoints/{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt": os.urandom(300_000),
        NOTE: json.dumps({"tag": tag, "step": 2}).encode(),
        "config.json": b"{}",
    }
    for name, data in written.items():
        (kit / name).write_bytes(data)
    upload(kit, "restore/kit")
    moto_port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = FlakyProxy(moto_port, rb"(?!)", 0.0)  # cut by hand below
    try:
        fs = s3_filesystem(f"http://127.0.0.1:{proxy.port}")
        checkpoint = Checkpoint(f"{BUCKET}/restore/kit", filesystem=fs)
        proxy.down_until = time.monotonic() + 6.0
        assert fetch_checkpoint(checkpoint, tmp_path / "run", retry_s=120) == tag
        assert proxy.refused, "no connection came during the outage: it was not felt"
        for name, data in written.items():
            if name != NOTE:
                assert (tmp_path / "run" / name).read_bytes() == data, name
        said = capfd.readouterr().err
        assert f"storage did not answer while reading checkpoint s3://{BUCKET}/restore/kit" in said
        proxy.down_until = time.monotonic() + 600.0  # longer than the window
        with pytest.raises(StorageUnavailableError) as failed:
            fetch_checkpoint(checkpoint, tmp_path / "run2", retry_s=3)
        assert f"did not answer for 3 s while reading checkpoint s3://{BUCKET}/restore/kit" in str(
            failed.value
        )
        assert not (tmp_path / "run2" / "checkpoints").exists()
        # two workers of one node restoring together (one downloads, the other waits on its
        # lock and is told only that the folder never came): both wait the outage out
        kit_file = tmp_path / "checkpoint.pickle"
        kit_file.write_bytes(pickle.dumps(checkpoint))  # as Ray ships it: one download folder
        proxy.down_until = time.monotonic() + 8.0
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", TWO_WORKERS, str(kit_file), str(tmp_path / f"node{i}")],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(2)
        ]
        for i, worker in enumerate(workers):
            out, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err[-2000:]
            assert out.split() == [tag], out
            for name, data in written.items():
                if name != NOTE:
                    assert (tmp_path / f"node{i}" / name).read_bytes() == data, name
        # a download is checked against storage's listing: a file missing or cut is named
        whole = Checkpoint(f"{BUCKET}/restore/kit", filesystem=s3_filesystem())
        assert missing_files(whole, kit) == []
        (kit / "config.json").unlink()
        cut = kit / f"checkpoints/{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        cut.write_bytes(cut.read_bytes()[:1000])
        assert missing_files(whole, kit) == [str(cut.relative_to(kit)), "config.json"]
    finally:
        proxy.close()


TWO_WORKERS = """
import pickle, sys
from pathlib import Path
from cluster.workers import fetch_checkpoint
print(fetch_checkpoint(pickle.loads(Path(sys.argv[1]).read_bytes()), Path(sys.argv[2]), retry_s=120))
"""
