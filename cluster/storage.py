"""Where Ray Train keeps a pipeline's checkpoints and reports: a local or NFS folder, a cloud URI
(`s3://`, `gs://`), or an S3-compatible endpoint of the user's choice (MinIO and the like).

Ray Train reads and writes storage through a pyarrow file system. For `s3://` with an
`endpoint` (or AWS_ENDPOINT_URL in the environment) one is built by `pipelines.sources`, the
same way shards are read from there; credentials come from the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) and are never part of a config
file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse


def storage_filesystem(storage_path: str | None, endpoint: str | None = None):
    """(pyarrow file system or None for Ray's own choice, the path to give Ray with it)."""
    if not storage_path:
        return None, None
    parsed = urlparse(storage_path)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if parsed.scheme != "s3" or not endpoint:
        return None, storage_path
    from pipelines.sources import s3_filesystem

    fs = s3_filesystem(endpoint, allow_bucket_creation=True)
    return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")


RETRY_S = 300.0  # how long a read from storage waits out a server that does not answer
TRANSIENT = (  # what pyarrow's S3 and GCS file systems say when the server did not answer
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error UNKNOWN",
    "Connection reset",
    "Connection refused",
    "timed out",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


class StorageUnavailableError(OSError):
    """Storage did not answer within the retry window; the message names the storage path."""


def transient(error: BaseException) -> bool:
    """Whether `error` says the storage server did not answer (worth trying again), as opposed
    to a missing object, refused credentials or a full local disk (not)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return isinstance(error, OSError) and any(token in str(error) for token in TRANSIENT)


def location(checkpoint) -> str:
    """A Ray checkpoint's place in storage as a user writes it (`s3://bucket/key`, a path)."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def with_retry(action, what: str, where: str, window_s: float = RETRY_S):
    """`action()`, tried again with a growing pause (1 s doubling to 30 s) while it fails
    because storage does not answer, for up to `window_s` seconds; then StorageUnavailableError
    naming `where`. Other errors pass through at once. Each retry prints one line to stderr."""
    deadline = time.monotonic() + window_s
    pause = 1.0
    while True:
        try:
            return action()
        except OSError as error:
            if not transient(error):
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailableError(
                    f"storage did not answer for {window_s:g} s while {what} {where}: {reason}"
                ) from error
            wait = min(pause, left)
            print(
                f"vastdet: storage did not answer while {what} {where} ({reason}); "
                f"trying again in {wait:.0f} s ({left:.0f} s left of {window_s:g} s)",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait)
            pause = min(2 * pause, 30.0)


def missing_files(checkpoint, folder) -> list[str]:
    """The files of a checkpoint in storage that `folder`, its download, lacks or holds cut
    short (relative paths, sorted); one listing of the checkpoint's prefix."""
    from pyarrow.fs import FileSelector, FileType

    root = checkpoint.path.rstrip("/") + "/"
    listed = checkpoint.filesystem.get_file_info(FileSelector(checkpoint.path, recursive=True))
    short = []
    for info in listed:
        if info.type == FileType.File:
            name = info.path[len(root) :] if info.path.startswith(root) else info.base_name
            local = Path(folder) / name
            if not local.is_file() or local.stat().st_size != info.size:
                short.append(name)
    return sorted(short)


@contextlib.contextmanager
def checkpoint_folder(checkpoint, window_s: float = RETRY_S):
    """A Ray checkpoint as a local folder (`Checkpoint.as_directory`: downloaded once per node
    and removed after), its download retried while storage does not answer (`with_retry`) and
    checked against storage's listing, so a download cut short is never used.

    Workers on one node share the download: one fetches while the others wait on its lock. When
    that one fails (storage did not answer), Ray hands each waiting worker the folder as the
    failed download left it, or tells it the folder "should have been created by another
    process": the same outage, so both are retried, and the next try downloads in this worker
    if nobody else is."""
    import pyarrow.fs

    remote = not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)

    def enter():
        attempt = contextlib.ExitStack()
        try:
            folder = attempt.enter_context(checkpoint.as_directory())
            short = missing_files(checkpoint, folder) if remote else []
            if short:
                raise ConnectionError(
                    f"the download stopped short: {len(short)} file(s) missing or cut, "
                    f"{', '.join(short[:3])}"
                )
        except RuntimeError as error:
            attempt.close()
            if "another process" not in str(error):
                raise
            raise ConnectionError(f"another worker's download failed: {error}") from error
        except BaseException:
            attempt.close()
            raise
        stack.enter_context(attempt)
        return folder

    with contextlib.ExitStack() as stack:
        yield with_retry(enter, "reading checkpoint", location(checkpoint), window_s)
