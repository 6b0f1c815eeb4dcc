"""The URI layer: local paths, file:// and s3:// are one code path; writes are atomic; a briefly unreachable S3
endpoint is retried, while a missing object fails at once."""

import os
import threading
import time

import pytest

from dermray import storage
from tests.conftest import interrupt_s3


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/store"


def test_round_trip_listing_and_delete(root):
    storage.write_text(storage.join(root, "a", "one.txt"), "1")
    storage.write_bytes(storage.join(root, "a", "b", "two.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a", "one.txt")) == "1"
    assert storage.read_bytes(storage.join(root, "a", "b", "two.bin")) == b"\x00\x01"
    assert storage.is_file(storage.join(root, "a", "one.txt"))
    assert storage.is_dir(storage.join(root, "a"))
    assert storage.size(storage.join(root, "a", "b", "two.bin")) == 2
    files = list(storage.list_files(root))
    assert [f.removeprefix(storage.normalize(root)) for f in files] == ["/a/b/two.bin", "/a/one.txt"]  # path order
    assert [storage.basename(d) for d in storage.list_dirs(storage.join(root, "a"))] == ["b"]
    storage.delete(storage.join(root, "a", "one.txt"))
    assert not storage.exists(storage.join(root, "a", "one.txt"))


def test_uri_spellings():
    assert storage.normalize("s3://bucket/key/") == "s3://bucket/key"
    assert storage.normalize("file:///tmp/x") == "/tmp/x"
    assert storage.join("s3://b/p", "x", "y.jpg") == "s3://b/p/x/y.jpg"
    assert storage.parent("s3://b/p/x.jpg") == "s3://b/p"
    with pytest.raises(Exception, match="names no bucket"):
        storage.resolve("s3://")


def test_local_write_is_atomic_under_concurrent_readers(tmp_path):
    """Readers see the old content or the new, never a prefix of it (the write goes to a temp file, renamed)."""
    target = str(tmp_path / "manifest.bin")
    old, new = b"a" * 4_000_000, b"b" * 4_000_000
    storage.write_bytes(target, old)
    seen: set[str] = set()
    stop = threading.Event()

    def read_forever():
        while not stop.is_set():
            data = storage.read_bytes(target)
            seen.add("old" if data == old else "new" if data == new else "torn")

    reader = threading.Thread(target=read_forever)
    reader.start()
    for i in range(20):
        storage.write_bytes(target, new if i % 2 == 0 else old)
    stop.set()
    reader.join()
    assert "torn" not in seen and seen
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_s3_object_fails_at_once(bucket):
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{bucket}/nothing-here.jpg")
    assert time.monotonic() - started < 5


def test_reads_and_writes_survive_an_s3_outage(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("DERMRAY_STORAGE_RETRY_SECONDS", "60")
    uri = f"s3://{bucket}/outage/object.txt"
    storage.write_text(uri, "before")
    restarted = interrupt_s3(s3_server, seconds=8)  # longer than pyarrow's own ~6 s of retries
    try:
        assert storage.read_text(uri) == "before"
        storage.write_text(uri, "after")
    finally:
        restarted.join()
    assert storage.read_text(uri) == "after"


def test_an_outage_longer_than_the_budget_surfaces(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("DERMRAY_STORAGE_RETRY_SECONDS", "1")
    uri = f"s3://{bucket}/outage/object.txt"
    storage.write_text(uri, "x")
    restarted = interrupt_s3(s3_server, seconds=12)
    try:
        with pytest.raises(OSError) as error:
            storage.read_bytes(uri)
        assert storage.is_transient(error.value)
    finally:
        restarted.join()
    assert storage.read_text(uri) == "x"
