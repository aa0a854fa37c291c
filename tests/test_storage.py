"""The storage layer on file://, memory:// and a real S3 server."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import storage
from pipeline.storage import StorageError


def test_round_trip_list_exists_delete(storage_root: str) -> None:
    storage.write_bytes(storage.join(storage_root, "a", "one.JPG"), b"1")
    storage.write_bytes(storage.join(storage_root, "a", "b", "two.png"), b"22")
    storage.write_bytes(storage.join(storage_root, "a", ".hidden"), b"x")
    storage.write_json(storage.join(storage_root, "meta.json"), {"k": [1, 2]})

    assert storage.read_bytes(storage.join(storage_root, "a", "b", "two.png")) == b"22"
    assert storage.read_json(storage.join(storage_root, "meta.json")) == {"k": [1, 2]}
    assert storage.exists(storage.join(storage_root, "a", "one.JPG"))
    assert not storage.exists(storage.join(storage_root, "a", "nope"))
    assert storage.size(storage.join(storage_root, "a", "b", "two.png")) == 2

    names = [storage.basename(u) for u in storage.list_files(storage.join(storage_root, "a"), recursive=True)]
    assert names == ["two.png", "one.JPG"]  # sorted by full path (a/b/… < a/o…), hidden files left out
    flat = storage.list_files(storage.join(storage_root, "a"))
    assert [storage.basename(u) for u in flat] == ["one.JPG"]
    images = storage.list_files(storage_root, recursive=True, suffixes=(".jpg",))
    assert [storage.basename(u) for u in images] == ["one.JPG"]  # suffixes are case-insensitive
    assert storage.list_files(storage.join(storage_root, "missing")) == []

    storage.delete(storage.join(storage_root, "a", "one.JPG"))
    assert not storage.exists(storage.join(storage_root, "a", "one.JPG"))
    storage.delete(storage.join(storage_root, "a", "one.JPG"))  # missing_ok


def test_missing_object_is_a_permanent_error_naming_the_uri(storage_root: str) -> None:
    uri = storage.join(storage_root, "no", "such.parquet")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert not info.value.transient
    assert "no/such.parquet" in str(info.value)
    assert time.monotonic() - started < 2, "a permanent error must not be retried"


def test_overwrite_is_atomic_for_readers(storage_root: str) -> None:
    """A reader never sees a partial object while a writer replaces it (whole old or whole new)."""
    uri = storage.join(storage_root, "big.bin")
    versions = [bytes([i]) * 3_000_000 for i in range(4)]
    storage.write_bytes(uri, versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            seen.append(storage.read_bytes(uri))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for version in versions[1:]:
            storage.write_bytes(uri, version)
    finally:
        done.set()
        reader.join()
    assert seen
    assert all(data in versions for data in seen), "a reader saw a partial object"
    leftovers = storage.list_files(storage_root, recursive=True)
    assert [storage.basename(u) for u in leftovers] == ["big.bin"], "temporary files left behind"


def test_missing_bucket_fails_fast(s3_server) -> None:
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.ensure_bucket("s3://no-such-bucket-detectflow/x")
    assert not info.value.transient and "s3://no-such-bucket-detectflow/x" in str(info.value)
    assert time.monotonic() - started < 3
    storage.ensure_bucket(s3_server.new_bucket("exists") + "/prefix")


def test_transient_outage_is_retried(s3_server, monkeypatch) -> None:
    """The real server goes away for a few seconds during a read; the retried read succeeds."""
    bucket = s3_server.new_bucket("outage")
    storage.write_bytes(bucket + "/object", b"survives")
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.2)
    monkeypatch.setattr(storage, "RETRY_MAX_DELAY_S", 1.0)
    s3_server.stop()
    restarter = threading.Timer(3.0, s3_server.start)
    restarter.start()
    try:
        started = time.monotonic()
        assert storage.read_bytes(bucket + "/object") == b"survives"
        assert time.monotonic() - started >= 2.5
    finally:
        restarter.join()


@pytest.mark.parametrize(
    "error,transient",
    [
        (ConnectionResetError("Connection reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (
            OSError(
                "An error occurred (SlowDown) when calling the PutObject operation: Please reduce your request rate"
            ),
            True,
        ),
        (OSError("503 Service Unavailable"), True),
        (PermissionError("Access Denied"), False),
        (FileNotFoundError("The specified bucket does not exist"), False),
        (ValueError("bad argument"), False),
    ],
)
def test_error_classification(error: Exception, transient: bool, monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.001)
    calls = []

    def failing_then_ok():
        calls.append(1)
        if len(calls) == 1:
            raise error
        return "ok"

    if transient:
        assert storage.with_retries(failing_then_ok, uri="s3://b/k", what="reading") == "ok"
        assert len(calls) == 2
    else:
        with pytest.raises(StorageError) as info:
            storage.with_retries(failing_then_ok, uri="s3://b/k", what="reading")
        assert len(calls) == 1 and not info.value.transient


def test_retries_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.001)
    calls = []

    def always_down():
        calls.append(1)
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(StorageError) as info:
        storage.with_retries(always_down, uri="s3://b/k", what="reading", attempts=4)
    assert len(calls) == 4 and info.value.transient and "after 4 attempts" in str(info.value)


def test_credentials_never_reach_error_messages() -> None:
    assert storage.redact("s3://AKIAKEY:topsecret@bucket/key") == "s3://***@bucket/key"
    assert "sig123" not in storage.redact("https://h/o?X-Amz-Signature=sig123&x=1")

    def leaky():
        raise PermissionError("denied for https://user:topsecret@host/path?token=abc")

    with pytest.raises(StorageError) as info:
        storage.with_retries(leaky, uri="s3://AKIAKEY:topsecret@bucket/key", what="reading")
    assert "topsecret" not in str(info.value) and "abc" not in str(info.value)


def test_parse_storage_options() -> None:
    options = storage.parse_storage_options(
        ["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "default_block_size=1048576", "key=abc"]
    )
    assert options == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "default_block_size": 1048576,
        "key": "abc",
    }
    with pytest.raises(ValueError, match="key=value"):
        storage.parse_storage_options(["novalue"])


def test_plain_paths_become_file_uris(tmp_path) -> None:
    storage.write_bytes(str(tmp_path / "x" / "y.bin"), b"z")
    assert storage.normalize(str(tmp_path)) == f"file://{tmp_path}"
    assert storage.list_files(str(tmp_path), recursive=True) == [f"file://{tmp_path}/x/y.bin"]
