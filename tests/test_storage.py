"""The storage layer on file://, memory:// and a real S3 server (SeaweedFS, credentials checked),
plus error classification through a fault-injecting fsspec filesystem."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import fsspec
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from pipeline import storage
from pipeline.storage import StorageError
from tests.seaweed import ACCESS_KEY

REPO = Path(__file__).resolve().parents[1]


def raw_names(root: str) -> list[str]:
    """Every object under ``root`` as the filesystem itself lists it (hidden and temporary files
    included), relative to ``root``."""
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    return sorted(name[len(path.rstrip("/")) + 1 :] for name in fs.find(path))


# ------------------------------------------------------------------ every kind of storage


def test_round_trip_list_exists_delete(storage_root: str) -> None:
    storage.write_bytes(storage.join(storage_root, "a", "one.JPG"), b"1")
    storage.write_bytes(storage.join(storage_root, "a", "b", "two.png"), b"22")
    storage.write_bytes(storage.join(storage_root, "a", "b", "c", "three.jpeg"), b"333")
    storage.write_bytes(storage.join(storage_root, "a", ".hidden.jpg"), b"x")
    storage.write_bytes(storage.join(storage_root, "a", "_SUCCESS"), b"")
    storage.write_json(storage.join(storage_root, "meta.json"), {"k": [1, 2]})

    assert storage.read_bytes(storage.join(storage_root, "a", "b", "two.png")) == b"22"
    assert storage.read_json(storage.join(storage_root, "meta.json")) == {"k": [1, 2]}
    assert storage.exists(storage.join(storage_root, "a", "one.JPG"))
    assert storage.exists(storage.join(storage_root, "a", "b"))  # a folder (a prefix on S3)
    assert not storage.exists(storage.join(storage_root, "a", "nope"))
    assert storage.size(storage.join(storage_root, "a", "b", "c", "three.jpeg")) == 3

    deep = storage.list_files(storage.join(storage_root, "a"), recursive=True)
    assert [storage.relative_path(u, storage_root) for u in deep] == ["a/b/c/three.jpeg", "a/b/two.png", "a/one.JPG"]
    assert all(storage.read_bytes(u) for u in deep), "listed URIs are readable as they are"
    flat = storage.list_files(storage.join(storage_root, "a"))
    assert [storage.basename(u) for u in flat] == ["one.JPG"], "not recursive: only direct children"
    images = storage.list_files(storage_root, recursive=True, suffixes=(".jpg", ".JPEG"))
    assert [storage.basename(u) for u in images] == ["three.jpeg", "one.JPG"], "suffixes ignore case"
    assert storage.list_files(storage.join(storage_root, "missing")) == []
    assert storage.list_files(storage.join(storage_root, "missing"), recursive=True) == []

    storage.delete(storage.join(storage_root, "a", "one.JPG"))
    assert not storage.exists(storage.join(storage_root, "a", "one.JPG"))
    storage.delete(storage.join(storage_root, "a", "one.JPG"))  # missing_ok
    with pytest.raises(StorageError) as info:
        storage.delete(storage.join(storage_root, "a", "one.JPG"), missing_ok=False)
    assert not info.value.transient
    storage.delete(storage.join(storage_root, "a"))  # recursive
    assert storage.list_files(storage_root, recursive=True) == [storage.join(storage_root, "meta.json")]


def _less_than_a_retried_call() -> float:
    """Three quarters of the least time one retried call sleeps (every backoff jittered down to half;
    19.9 s with the defaults): calls that are not retried stay far below it even on a loaded machine
    (the refused-credentials test's six calls once took 5.2 s), and a single retried one cannot."""
    backoffs = [
        min(storage.RETRY_MAX_DELAY_S, storage.RETRY_BASE_DELAY_S * 2**attempt) / 2
        for attempt in range(storage.RETRY_ATTEMPTS - 1)
    ]
    return 0.75 * sum(backoffs)


def test_missing_object_is_a_permanent_error_naming_the_uri(storage_root: str) -> None:
    # "500" in the name must not read as an HTTP 500: the error is permanent and not retried.
    uri = storage.join(storage_root, "no", "img_500.parquet")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert not info.value.transient and info.value.uri == uri
    assert str(info.value).startswith(f"reading {uri} failed")
    with pytest.raises(StorageError):
        storage.size(uri)
    assert time.monotonic() - started < _less_than_a_retried_call(), "a permanent error must not be retried"


def test_overwrite_is_atomic_for_readers(storage_root: str) -> None:
    """A reader never sees a partial object while a writer replaces it (whole old or whole new),
    and no temporary object is left behind, not even a hidden one."""
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
    assert storage.read_bytes(uri) == versions[-1]
    assert raw_names(storage_root) == ["big.bin"], "temporary files left behind"


def test_failed_local_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    uri = f"file://{tmp_path}/out/table.parquet"
    storage.write_bytes(uri, b"old contents")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError) as info:
        storage.write_bytes(uri, b"new contents that never land")
    assert not info.value.transient and "No space left" in str(info.value)
    assert (tmp_path / "out" / "table.parquet").read_bytes() == b"old contents"
    assert os.listdir(tmp_path / "out") == ["table.parquet"]


def test_plain_paths_become_file_uris(tmp_path) -> None:
    storage.write_bytes(str(tmp_path / "x" / "y.bin"), b"z")
    assert storage.normalize(str(tmp_path)) == f"file://{tmp_path}"
    assert storage.normalize(f"file://{tmp_path}/") == f"file://{tmp_path}"
    assert storage.list_files(str(tmp_path), recursive=True) == [f"file://{tmp_path}/x/y.bin"]
    assert storage.protocol_of("s3a://b/k") == "s3" and storage.protocol_of("gcs://b/k") == "gs"


# -------------------------------------------------------------------- the real S3 server


def test_missing_bucket_fails_fast_and_permanently(s3_server) -> None:
    missing = "s3://no-such-bucket-detectflow"
    started = time.monotonic()
    for operation, uri in [
        (storage.ensure_bucket, f"{missing}/x"),
        (storage.read_bytes, f"{missing}/x/a.jpg"),
        (lambda uri: storage.write_bytes(uri, b"1"), f"{missing}/x/a.jpg"),
        (storage.list_files, f"{missing}/x"),
        (lambda uri: storage.list_files(uri, recursive=True), f"{missing}/x"),
    ]:
        with pytest.raises(StorageError) as info:
            operation(uri)
        assert not info.value.transient and uri in str(info.value), str(info.value)
    assert time.monotonic() - started < _less_than_a_retried_call(), "permanent errors must not be retried"
    assert not storage.exists(missing)
    bucket = s3_server.new_bucket("exists")
    storage.ensure_bucket(bucket + "/prefix")
    assert storage.exists(bucket)


def test_refused_credentials_are_permanent_and_secrets_stay_out(s3_server) -> None:
    """The server checks signatures: a wrong secret and a read-only identity writing are refused
    at once (403, not retried); the secret never appears in the error."""
    bucket = s3_server.new_bucket("auth")
    storage.write_bytes(bucket + "/object", b"data")
    wrong_secret = "wrong-secret-d41d8cd98f00"
    wrong = {**s3_server.storage_options(), "key": ACCESS_KEY, "secret": wrong_secret}
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(bucket + "/object", wrong)
    assert not info.value.transient and "PermissionError" in str(info.value)
    assert wrong_secret not in str(info.value)

    reader = s3_server.storage_options(read_only=True)
    assert storage.read_bytes(bucket + "/object", reader) == b"data"
    assert storage.list_files(bucket, reader) == [bucket + "/object"]
    with pytest.raises(StorageError) as info:
        storage.write_bytes(bucket + "/new", b"x", reader)
    assert not info.value.transient and "Access Denied" in str(info.value)
    assert reader["secret"] not in str(info.value)
    assert time.monotonic() - started < _less_than_a_retried_call(), "refusals must not be retried"
    assert not storage.exists(bucket + "/new")


def test_transient_outage_is_retried(s3_server, monkeypatch, caplog) -> None:
    """The real server goes away for a few seconds during a read; our retries ride it out.
    botocore's own retries are switched off (s3fs still tries ~2 s per call), so that failed
    attempts surface to our loop."""
    bucket = s3_server.new_bucket("outage")
    storage.write_bytes(bucket + "/object", b"survives")
    single_shot = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 30)
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.2)
    monkeypatch.setattr(storage, "RETRY_MAX_DELAY_S", 1.0)
    caplog.set_level(logging.WARNING, logger="pipeline.storage")
    assert storage.read_bytes(bucket + "/object", single_shot) == b"survives"  # reached once: an outage, not a typo
    s3_server.stop()
    restarter = threading.Timer(3.0, s3_server.start)
    restarter.start()
    try:
        started = time.monotonic()
        assert storage.read_bytes(bucket + "/object", single_shot) == b"survives"
        assert time.monotonic() - started >= 2.5
    finally:
        restarter.join()
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) >= 2 and all(bucket + "/object" in line for line in retried)


def test_an_endpoint_never_reached_fails_in_seconds() -> None:
    """A wrong endpoint URL (or a server that is not running) is not an outage to ride out: after
    a few connection attempts the error says so, and is not marked transient (no task retries)."""
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as caught:
        storage.read_bytes("s3://photos/never.json", options)
    assert time.monotonic() - started < 15
    error = caught.value
    assert error.reason == storage.UNREACHABLE and not error.transient
    assert str(error) == (
        "reading s3://photos/never.json failed after 3 attempts: could not connect (endpoint http://127.0.0.1:9): "
        "no request to it has succeeded; is the endpoint URL right and the server running?"
    )


def test_environment_configures_s3_in_new_processes(s3_server) -> None:
    """A fresh interpreter given only the environment reaches the server with a plain s3:// URI
    (what Ray workers and CLI subprocesses rely on)."""
    bucket = s3_server.new_bucket("env")
    storage.write_bytes(bucket + "/hello.txt", b"from the parent")
    code = f"from pipeline import storage; print(storage.read_bytes({bucket + '/hello.txt'!r}).decode())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the parent"


# ------------------------------------------------------- classification, fault injection


class FaultyFileSystem(MemoryFileSystem):
    """A private in-memory store behind a fault injector: each data operation first takes the next
    planned exception from ``faults`` and raises it, the way a remote filesystem surfaces a failed
    request. ``calls`` counts the operations tried."""

    protocol = "faulty"
    store: dict = {}
    pseudo_dirs = [""]
    faults: list[BaseException] = []
    calls = 0

    def _next_fault(self) -> None:
        FaultyFileSystem.calls += 1
        if FaultyFileSystem.faults:
            raise FaultyFileSystem.faults.pop(0)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._next_fault()
        return super().cat_file(path, start, end, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._next_fault()
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def exists(self, path, **kwargs):
        self._next_fault()
        return super().exists(path, **kwargs)


@pytest.fixture
def faulty(monkeypatch):
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    monkeypatch.setattr(FaultyFileSystem, "store", {})
    monkeypatch.setattr(FaultyFileSystem, "pseudo_dirs", [""])
    monkeypatch.setattr(FaultyFileSystem, "faults", [])
    monkeypatch.setattr(FaultyFileSystem, "calls", 0)
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.001)
    monkeypatch.setattr(storage, "RETRY_MAX_DELAY_S", 0.002)
    return FaultyFileSystem


def s3_error(code: str, status: int, message: str = "", operation: str = "GetObject") -> BaseException:
    """What s3fs raises for an S3 error response: botocore's ClientError translated by s3fs."""
    response = {
        "Error": {"Code": code, "Message": message or code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return translate_boto_error(ClientError(response, operation))


TRANSIENT_FAULTS = {
    "SlowDown 503": lambda: s3_error("SlowDown", 503, "Please reduce your request rate."),
    "ServiceUnavailable 503": lambda: s3_error("ServiceUnavailable", 503),
    "InternalError 500": lambda: s3_error("InternalError", 500, "We encountered an internal error."),
    "bare 503": lambda: s3_error("503", 503, "Service Unavailable"),
    "unknown code 502": lambda: s3_error("BadGatewayFromProxy", 502),
    "RequestTimeout": lambda: s3_error("RequestTimeout", 400),
    "endpoint down": lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    "read timeout": lambda: ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    "server disconnected": lambda: aiohttp.ServerDisconnectedError(),
    "payload cut": lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
    "aiohttp reset": lambda: aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
    "reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": lambda: TimeoutError("The read operation timed out"),
}
PERMANENT_FAULTS = {
    "AccessDenied 403": lambda: s3_error("AccessDenied", 403, "Access Denied"),
    "InvalidAccessKeyId 403": lambda: s3_error("InvalidAccessKeyId", 403),
    "SignatureDoesNotMatch 403": lambda: s3_error("SignatureDoesNotMatch", 403),
    "bare 403": lambda: s3_error("403", 403, "Forbidden", operation="HeadObject"),
    "NoSuchBucket 404": lambda: s3_error("NoSuchBucket", 404, "The specified bucket does not exist"),
    "NoSuchKey 404": lambda: s3_error("NoSuchKey", 404, "The specified key does not exist."),
    "InvalidArgument 400": lambda: s3_error("InvalidArgument", 400),
    "not found, 500 in name": lambda: FileNotFoundError("bucket/shards/img_500.jpg"),
    "bad argument": lambda: ValueError("bad argument"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT_FAULTS))
def test_transient_faults_are_retried(faulty, name: str) -> None:
    storage.write_bytes("faulty://bkt/obj", b"payload")
    faulty.calls = 0
    faulty.faults = [TRANSIENT_FAULTS[name](), TRANSIENT_FAULTS[name]()]
    assert storage.read_bytes("faulty://bkt/obj") == b"payload"
    assert faulty.calls == 3, "two failed attempts, then success"

    faulty.faults = [TRANSIENT_FAULTS[name]()]
    storage.write_bytes("faulty://bkt/obj2", b"second")
    faulty.faults = [TRANSIENT_FAULTS[name]()]
    assert storage.list_files("faulty://bkt") == ["faulty://bkt/obj", "faulty://bkt/obj2"]


@pytest.mark.parametrize("name", sorted(PERMANENT_FAULTS))
def test_permanent_faults_fail_at_once(faulty, name: str) -> None:
    storage.write_bytes("faulty://bkt/obj", b"payload")
    faulty.calls = 0
    faulty.faults = [PERMANENT_FAULTS[name]()]
    with pytest.raises(StorageError) as info:
        storage.read_bytes("faulty://bkt/obj")
    assert faulty.calls == 1 and not info.value.transient
    assert "faulty://bkt/obj" in str(info.value)
    assert info.value.__cause__ is not None, "the original error stays attached for debugging"


def test_retries_are_capped(faulty) -> None:
    faulty.faults = [ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")] * 10
    with pytest.raises(StorageError) as info:
        storage.with_retries(
            lambda: FaultyFileSystem().cat_file("bkt/none"), uri="faulty://bkt/none", what="reading", attempts=4
        )
    assert faulty.calls == 4 and info.value.transient and "after 4 attempts" in str(info.value)


def test_classification_follows_the_cause_chain() -> None:
    try:
        try:
            raise s3_error("SlowDown", 503)
        except OSError as inner:
            raise RuntimeError("reading a Parquet footer failed") from inner
    except RuntimeError as outer:
        assert storage.is_transient(outer)
    assert not storage.is_transient(RuntimeError("a bug, not an outage"))
    assert storage.is_transient(OSError("unexplained I/O failure"))


# ---------------------------------------------------------------------- secrets, options


def test_credentials_never_reach_error_messages_or_logs(faulty, caplog) -> None:
    assert storage.redact("s3://AKIAKEY:topsecret@bucket/key") == "s3://***@bucket/key"
    assert "sig123" not in storage.redact("https://h/o?X-Amz-Signature=sig123&x=1")
    assert storage.redact("token hunter2 here", ["hunter2"]) == "token *** here"

    secret = "s3cr3t-from-options"
    options = {"key": "AKIAEXAMPLEKEY", "client_kwargs": {"aws_secret_access_key": secret}}
    caplog.set_level(logging.WARNING, logger="pipeline.storage")
    faulty.faults = [
        ConnectionResetError(f"reset while signing with {secret}"),
        PermissionError(f"AccessDenied for key AKIAEXAMPLEKEY secret {secret}"),
    ]
    with pytest.raises(StorageError) as info:
        storage.read_bytes("faulty://bkt/obj", options)
    message = str(info.value)
    assert "AccessDenied" in message and secret not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__, "no traceback can print it"
    assert caplog.records, "the transient failure was logged"
    assert secret not in caplog.text

    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://AKIAKEY:topsecret@bucket/key?X-Amz-Signature=abc")
    assert "topsecret" not in str(info.value) and "abc" not in str(info.value)


def test_parse_storage_options() -> None:
    options = storage.parse_storage_options(
        [
            "anon=false",
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
            'client_kwargs={"region_name": "eu-west-1"}',
            "config_kwargs.s3.addressing_style=path",
            "default_block_size=1048576",
            "key=abc",
            "token=null",
            'fixed_upload_size=["a", 2]',
        ]
    )
    assert options == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "default_block_size": 1048576,
        "key": "abc",
        "token": None,
        "fixed_upload_size": ["a", 2],
    }
    assert storage.parse_storage_options(["secret=a=b=c"]) == {"secret": "a=b=c"}
    assert storage.parse_storage_options(None) == {}
    for bad in (["novalue"], ["=x"], ["a..b=1"]):
        with pytest.raises(ValueError, match="key=value"):
            storage.parse_storage_options(bad)
    with pytest.raises(ValueError, match="'anon' is already set"):
        storage.parse_storage_options(["anon=false", "anon.x=1"])
