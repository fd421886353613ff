"""Where shards, manifests and category files are read from: a local path, `file://`,
`http(s)://`, `pipe:CMD` (a command's standard output, as webdataset spells it), or any URI a
pyarrow file system serves (`s3://`, `gs://`, `hdfs://`, ...). One opener serves them all, so
a cluster streams shards from object storage with no copy step, and every reader (the
training and evaluation loaders, `vastdet data`, the manifest and category look-ups) takes the
same URLs.

Object stores take their settings from the environment, never from a config file: S3 reads
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (an
S3-compatible server such as MinIO); Google Cloud Storage its usual credentials. HTTP needs
nothing beyond Python: no `curl` on the nodes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import posixpath
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

log = logging.getLogger(__name__)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
HTTP_TIMEOUT_S = 60


def is_url(location: str | os.PathLike) -> bool:
    """True for a URL or a `pipe:` command, False for a path on this machine."""
    text = os.fspath(location)
    return bool(SCHEME.match(text)) and not text.startswith("file://") or text.startswith("pipe:")


def local_path(location: str | os.PathLike) -> Path | None:
    """The path on this machine that `location` names (a path or `file://`), else None."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    return None if is_url(text) else Path(text)


def join(base: str | os.PathLike, name: str) -> str:
    """`name` inside the folder `base` (a path or a URL; `pipe:` has no folders)."""
    text = os.fspath(base)
    if text.startswith("pipe:"):
        raise ValueError(f"{text}: a pipe: command has no folder to look in")
    if is_url(text):
        parsed = urlparse(text)
        joined = posixpath.normpath(parsed.path.rstrip("/") + "/" + name)
        return parsed._replace(path=joined).geturl()
    return str(Path(text) / name)


def parent(location: str | os.PathLike) -> str:
    """The folder holding `location` (a path or a URL)."""
    text = os.fspath(location)
    if is_url(text):
        parsed = urlparse(text)
        return parsed._replace(path=parsed.path.rstrip("/").rsplit("/", 1)[0]).geturl()
    return str(Path(text).parent)


def s3_filesystem(endpoint: str | None = None, **options):
    """A pyarrow S3 file system for `endpoint` (or AWS_ENDPOINT_URL; AWS itself when neither),
    credentials and region from the standard AWS variables; `options` go to S3FileSystem."""
    from pyarrow.fs import S3FileSystem

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    options.setdefault("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    if endpoint:
        target = urlparse(endpoint)
        options["endpoint_override"] = target.netloc or target.path
        options["scheme"] = target.scheme or "https"
    return S3FileSystem(**options)


def filesystem(url: str):
    """(pyarrow file system, path inside it) for an object-store URL."""
    from pyarrow.fs import FileSystem

    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}"
    return FileSystem.from_uri(url)


def open_source(location: str | os.PathLike) -> BinaryIO:
    """A binary stream of the bytes at `location`. Raises OSError (FileNotFoundError where the
    source says so) when it cannot be read."""
    text = os.fspath(location)
    path = local_path(text)
    if path is not None:
        return open(path, "rb")
    if text.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(text)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return io.BufferedReader(ResumingHTTPStream(text), buffer_size=1 << 16)
    fs, inside = filesystem(text)
    try:
        return fs.open_input_stream(inside)
    except FileNotFoundError:
        raise FileNotFoundError(f"{text}: not found") from None


HTTP_RETRIES = 5  # reconnections per stream after a dropped connection
HTTP_BACKOFF_S = 0.5  # doubled after each failed reconnection


class ResumingHTTPStream(io.RawIOBase):
    """The body at an HTTP(S) URL as a binary stream that survives a dropped connection: a read
    that fails (reset, cut short, timed out) reconnects with a `Range` request from the byte it
    had reached and goes on, up to HTTP_RETRIES times in a row with a growing pause; then the
    error is raised naming the URL and the offset (the reader counts the shard as cut short).
    A server that ignores `Range` is read again from the start and the bytes already read are
    skipped. A 404 is FileNotFoundError; other HTTP errors OSError."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.offset, self.response = url, 0, None
        self.response = self._open(0)

    def _open(self, offset: int):
        from urllib.error import HTTPError
        from urllib.request import Request, urlopen

        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urlopen(Request(self.url, headers=headers), timeout=HTTP_TIMEOUT_S)
        except HTTPError as err:
            if err.code == 404:
                raise FileNotFoundError(f"{self.url}: HTTP 404") from None
            raise OSError(f"{self.url}: HTTP {err.code} {err.reason}") from None
        if offset and response.status != 206:  # no ranges: read up to where we were
            skip = offset
            while skip:
                chunk = response.read(min(skip, 1 << 20))
                if not chunk:
                    raise OSError(f"{self.url}: shorter than the {offset} bytes read before")
                skip -= len(chunk)
        return response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        import http.client

        failures = 0
        while True:
            try:
                if self.response is None:
                    self.response = self._open(self.offset)
                count = self.response.readinto(buffer)
                if not count and len(buffer) and self.response.length:
                    # http.client ends a body cut short as if it were complete
                    raise http.client.IncompleteRead(b"", self.response.length)
                self.offset += count
                return count
            except FileNotFoundError:
                raise
            except (OSError, http.client.HTTPException) as err:
                failures += 1
                if failures > HTTP_RETRIES:
                    raise OSError(
                        f"{self.url}: connection lost at byte {self.offset} and "
                        f"{HTTP_RETRIES} reconnections failed ({err})"
                    ) from None
                if self.response is not None:
                    with contextlib.suppress(Exception):
                        self.response.close()
                    self.response = None
                log.warning(
                    "%s: connection lost at byte %d (%s); reconnecting (%d of %d)",
                    self.url, self.offset, err, failures, HTTP_RETRIES,
                )  # fmt: skip
                time.sleep(HTTP_BACKOFF_S * 2 ** (failures - 1))

    def close(self) -> None:
        if self.response is not None:
            with contextlib.suppress(Exception):
                self.response.close()
        super().close()


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_source(location) as stream:
        return stream.read()


def exists(location: str | os.PathLike) -> bool:
    """Whether `location` can be read (for a URL: fetched, so keep it to small files)."""
    path = local_path(location)
    if path is not None:
        return path.is_file()
    try:
        open_source(location).close()
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    return Path(os.environ.get("VASTDET_CACHE", Path.home() / ".cache" / "vastdet")) / "sources"


@functools.lru_cache(maxsize=64)
def local_copy(location: str | os.PathLike) -> Path:
    """A path on this machine holding the file at `location`: the path itself when local, else
    a copy fetched once per process into the cache (for small files that readers want as paths:
    category files, embeddings)."""
    path = local_path(location)
    if path is not None:
        return path
    text = os.fspath(location)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", urlparse(text).path.rsplit("/", 1)[-1]) or "file"
    target = cache_dir() / hashlib.sha256(text.encode()).hexdigest()[:16] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    data = read_bytes(text)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)
    return target
