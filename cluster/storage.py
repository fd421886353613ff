"""Where Ray Train keeps a pipeline's checkpoints and reports: a local or NFS folder, a cloud URI
(`s3://`, `gs://`), or an S3-compatible endpoint of the user's choice (MinIO and the like).

Ray Train reads and writes storage through a pyarrow file system. For `s3://` with an
`endpoint` (or AWS_ENDPOINT_URL in the environment) one is built by `pipelines.sources`, the
same way shards are read from there; credentials come from the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) and are never part of a config
file.
"""

from __future__ import annotations

import os
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
