"""One URI layer over local paths, ``file://`` and ``s3://``, on pyarrow filesystems.

Every command reads and writes through these functions, so local folders and S3 (or any S3-compatible
endpoint) are one code path. S3 endpoint, region and credentials come from the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which ``FileSystem.from_uri`` honours.

Transient S3 errors (endpoint unreachable, throttling, 5xx) are retried with backoff for up to
``DERMRAY_STORAGE_RETRY_SECONDS`` (default 60) before they surface.

Atomicity: an S3 object becomes visible only when its upload completes, so a plain PUT is atomic. On a local
filesystem a write goes to a temporary file in the same folder and is then renamed over the target.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyarrow.fs as pafs

from dermray.errors import DermrayError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Canonical spelling: ``s3://bucket/key`` for S3, an absolute path for local files."""
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + uri[5:].strip("/")
    if uri.startswith("file://"):
        uri = uri[7:]
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI (``/`` separators for S3, the OS's for local paths)."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(uri.rstrip(os.sep))


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(uri.rstrip(os.sep))


@functools.lru_cache(maxsize=16)
def _s3_filesystem(bucket: str) -> pafs.FileSystem:
    # Cached per process: building an S3FileSystem resolves credentials and the region, which costs a
    # round trip; map tasks call read_bytes thousands of times.
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return fs


_LOCAL = pafs.LocalFileSystem()

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors an S3 endpoint gives while it is briefly unreachable or overloaded. pyarrow's own retries give up after
# about 6 s; a restarting endpoint or a network blip can take longer, so storage calls retry these for up to
# DERMRAY_STORAGE_RETRY_SECONDS (default 60). Anything else (not found, access denied) fails at once.
_TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE",
                      "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError", "REQUEST_TIMEOUT", "RequestTimeout",
                      "Connection reset", "Broken pipe", "Timeout was reached")


def is_transient(error: BaseException) -> bool:
    """True for a storage error worth retrying (endpoint unreachable, throttled, 5xx)."""
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError | PermissionError):
        return False
    text = str(error)
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def _retry_seconds() -> float:
    return float(os.environ.get("DERMRAY_STORAGE_RETRY_SECONDS", "60"))


def with_retries(operation: Callable[[], T], what: str) -> T:
    """Run ``operation``, retrying transient storage errors with jittered exponential backoff."""
    deadline = time.monotonic() + _retry_seconds()
    delay = 0.5
    while True:
        try:
            return operation()
        except OSError as error:
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("dermray storage: %s failed (%s); retrying in %.1fs", what, str(error).split(";")[0], delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI."""
    uri = normalize(uri)
    if is_s3(uri):
        bucket_and_key = uri[5:]
        bucket = bucket_and_key.split("/", 1)[0]
        if not bucket:
            raise DermrayError(f"storage: '{uri}' names no bucket")
        return _s3_filesystem(bucket), bucket_and_key
    return _LOCAL, uri


def storage_path_for_ray(uri: str) -> str:
    """The spelling Ray Train's ``RunConfig(storage_path=...)`` wants: ``s3://...`` or an absolute path."""
    return normalize(uri)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return with_retries(lambda: fs.get_file_info(path), f"stat {uri}")


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    """True for a local folder or an S3 prefix holding at least one object."""
    fs, path = resolve(uri)
    info = _info(uri)
    if info.type == pafs.FileType.Directory:
        return True
    if is_s3(uri) and info.type == pafs.FileType.NotFound:
        # Some S3 stores have no directory markers: look for any object under the prefix.
        selector = pafs.FileSelector(path.rstrip("/") + "/", allow_not_found=True, recursive=False)
        return len(with_retries(lambda: fs.get_file_info(selector), f"list {uri}")) > 0
    return False


def size(uri: str) -> int:
    return _info(uri).size


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        # A random-access file reads the whole object in one GET; pyarrow's S3 input *stream* reads it in small
        # ranged GETs (a 60 MB checkpoint: hundreds of requests, 9.7 s against moto on loopback instead of 0.2 s).
        with fs.open_input_file(path) as handle:
            return handle.read()

    return with_retries(read, f"read {uri}")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically (readers see the old object or the new one, never half)."""
    uri = normalize(uri)
    fs, path = resolve(uri)
    if is_s3(uri):

        def put() -> None:
            with fs.open_output_stream(path) as stream:
                stream.write(data)

        with_retries(put, f"write {uri}")
        return uri
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return uri


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


# ------------------------------------------------------------------------------------ conditional writes
# Compare-and-swap for the few objects several processes may race on (the model registry's champion pointer and
# lock). S3 has it natively (PutObject with If-None-Match / If-Match on the ETag); pyarrow does not expose it, so
# S3 goes through boto3, which reads the same AWS_* environment variables. Locally, an flock on a sidecar file
# serialises compare-and-replace, and the version token is the content's hash.


def _s3_client():
    import boto3

    return boto3.client("s3")


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = normalize(uri)[5:].partition("/")
    return bucket, key


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """(content, version token) of an object, or (None, None) when it does not exist."""
    uri = normalize(uri)
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        try:
            response = with_retries(lambda: _s3_client().get_object(Bucket=bucket, Key=key), f"read {uri}")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return response["Body"].read(), response["ETag"]
    if not os.path.exists(uri):
        return None, None
    with open(uri, "rb") as handle:
        data = handle.read()
    return data, _content_version(data)


def _content_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def write_if_version(uri: str, data: bytes, expected_version: str | None) -> bool:
    """Write ``data`` only if the object is still at ``expected_version`` (None: only if it does not exist).
    Returns False, writing nothing, when another writer got there first."""
    uri = normalize(uri)
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        condition = {"IfNoneMatch": "*"} if expected_version is None else {"IfMatch": expected_version}
        try:
            with_retries(lambda: _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition),
                         f"conditional write {uri}")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                                "NoSuchKey", "412", "409"):
                return False
            raise
        return True
    import fcntl

    os.makedirs(os.path.dirname(uri), exist_ok=True)
    with open(f"{uri}.cas-lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        _, current = read_versioned(uri)
        if current != expected_version:
            return False
        write_bytes(uri, data)
        return True


def delete_if_version(uri: str, expected_version: str) -> bool:
    """Delete an object only if it is still at ``expected_version`` (a lock released by its holder)."""
    uri = normalize(uri)
    if is_s3(uri):
        # S3 has no conditional delete on every store: overwrite-then-delete would race too, so check the ETag
        # and delete; a holder only deletes the lock it still owns (its own expiry is far away).
        _, current = read_versioned(uri)
        if current != expected_version:
            return False
        bucket, key = _bucket_key(uri)
        with_retries(lambda: _s3_client().delete_object(Bucket=bucket, Key=key), f"delete {uri}")
        return True
    import fcntl

    with open(f"{uri}.cas-lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        _, current = read_versioned(uri)
        if current != expected_version:
            return False
        os.remove(uri)
        return True


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_file_infos(uri: str, recursive: bool = True) -> list[tuple[str, int, int]]:
    """(URI, size in bytes, modification time in ns) of every file under a folder or prefix, sorted by URI."""
    uri = normalize(uri)
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    found = with_retries(lambda: fs.get_file_info(selector), f"list {uri}")
    infos = sorted((info for info in found if info.type == pafs.FileType.File), key=lambda i: i.path)
    return [(("s3://" + i.path) if is_s3(uri) else i.path, i.size or 0, i.mtime_ns or 0) for i in infos]


def list_files(uri: str, recursive: bool = True) -> Iterator[str]:
    """Every file under a folder or prefix, as full URIs, in sorted order."""
    for file_uri, _, _ in list_file_infos(uri, recursive):
        yield file_uri


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-folders (or sub-prefixes) of a folder, as full URIs, sorted."""
    uri = normalize(uri)
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    found = with_retries(lambda: fs.get_file_info(selector), f"list {uri}")
    dirs = [i.path for i in found if i.type == pafs.FileType.Directory]
    return sorted(("s3://" + d) if is_s3(uri) else d for d in dirs)


class _RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem whose calls retry transient errors like dermray's own (``with_retries``), for the
    files Ray Train writes itself (checkpoint uploads, run snapshots). An error inside an already open stream is
    not retried; opening it is."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __reduce__(self):
        return _RetryingHandler, (self.fs,)

    def _call(self, name: str, *args, **kwargs):
        return with_retries(lambda: getattr(self.fs, name)(*args, **kwargs), f"{name} {args[0] if args else ''}")

    def get_type_name(self):
        return "dermray-retrying-" + self.fs.type_name

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other):
        return isinstance(other, _RetryingHandler) and self.fs.equals(other.fs)

    def get_file_info(self, paths):
        return self._call("get_file_info", paths)

    def get_file_info_selector(self, selector):
        return self._call("get_file_info", selector)

    def create_dir(self, path, recursive):
        return self._call("create_dir", path, recursive=recursive)

    def delete_dir(self, path):
        return self._call("delete_dir", path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._call("delete_dir_contents", path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self._call("delete_dir_contents", "/", accept_root_dir=True)

    def delete_file(self, path):
        return self._call("delete_file", path)

    def move(self, src, dest):
        return self._call("move", src, dest)

    def copy_file(self, src, dest):
        return self._call("copy_file", src, dest)

    def open_input_stream(self, path):
        return self._call("open_input_stream", path)

    def open_input_file(self, path):
        return self._call("open_input_file", path)

    def open_output_stream(self, path, metadata):
        return self._call("open_output_stream", path, compression=None, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self._call("open_append_stream", path, compression=None, metadata=metadata)


def train_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``. For S3: ``bucket/prefix`` (no scheme,
    as Ray wants beside an explicit filesystem) and the S3 filesystem of the same AWS_* variables as every other
    storage call, wrapped so that a transient error retries (a short outage during a checkpoint upload then costs
    no failure slot). A local path: itself and None (Ray's own local filesystem)."""
    uri = normalize(uri)
    if not is_s3(uri):
        return uri, None
    fs, path = resolve(uri)
    return path, pafs.PyFileSystem(_RetryingHandler(fs))
