"""Exclusive writers on shared storage: the conditional writes of ``pipeline.storage`` and the
leases of ``pipeline.lease`` on local disk, in memory and on the real S3 server (SeaweedFS); a
holder killed with SIGKILL; a stolen lease; two inference runs on one output."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import lease as lease_module
from pipeline import storage
from pipeline.inference import run_inference
from pipeline.ingest import ingest_synthetic
from pipeline.jobs import InferenceSpec
from pipeline.lease import Lease, LeaseHeld, LeaseLost, lease_uri
from pipeline.outputs import OutputStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> str:
    """A fresh root on local disk and in a new bucket of the S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_server").new_bucket("lease")


# ---------------------------------------------------------------------------- conditional writes


def test_conditional_writes(storage_root: str) -> None:
    uri = storage.join(storage_root, "deep", "object.json")
    first = storage.write_bytes_if_absent(uri, b"one")
    assert first is not None
    assert storage.write_bytes_if_absent(uri, b"two") is None, "a second create is refused"
    assert storage.read_bytes_with_version(uri) == (b"one", first) and storage.version_of(uri) == first

    assert storage.replace_bytes_if_version(uri, b"three", "not-its-version") is None
    second = storage.replace_bytes_if_version(uri, b"three", first)
    assert second is not None and second != first and storage.read_bytes(uri) == b"three"
    assert storage.replace_bytes_if_version(uri, b"four", first) is None, "a stale version is refused"
    assert storage.read_bytes(uri) == b"three"

    assert not storage.delete_if_version(uri, first) and storage.exists(uri)
    assert storage.delete_if_version(uri, second) and not storage.exists(uri)
    assert storage.version_of(uri) is None and not storage.delete_if_version(uri, second)
    assert storage.replace_bytes_if_version(uri, b"five", second) is None, "no object, no swap"
    assert storage.write_bytes_if_absent(uri, b"six") is not None, "absent again: created"
    assert storage.list_files(storage.join(storage_root, "deep")) == [uri], "no temp or lock files listed"
    with pytest.raises(storage.StorageError) as missing:
        storage.read_bytes_with_version(storage.join(storage_root, "nothing"))
    assert missing.value.reason == storage.NOT_FOUND


def test_concurrent_creates_have_one_winner(root: str) -> None:
    uri = storage.join(root, "contended")
    barrier = threading.Barrier(8)
    results: list[str | None] = [None] * 8

    def create(index: int) -> None:
        barrier.wait()
        results[index] = storage.write_bytes_if_absent(uri, f"writer {index}".encode())

    threads = [threading.Thread(target=create, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [index for index, version in enumerate(results) if version is not None]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()


def test_a_store_without_conditional_writes_is_named(s3_server, monkeypatch) -> None:
    bucket = s3_server.new_bucket("lenient")
    assert storage.honours_conditional_writes(bucket)
    with pytest.warns(RuntimeWarning, match="conditional writes are not possible there"):
        assert not storage.honours_conditional_writes("ftp://files.example.com/data")

    def ignoring_conditions(fs, path, data, version):  # an S3-compatible server that ignores them
        bucket_name, key, _ = fs.split_path(path)
        return fs.call_s3("put_object", Bucket=bucket_name, Key=key, Body=data)["ETag"]

    monkeypatch.setattr(storage, "_write_versioned", ignoring_conditions)
    with pytest.warns(RuntimeWarning, match=f"endpoint {s3_server.endpoint_url}.*ignores If-None-Match"):
        assert not storage.honours_conditional_writes(bucket)


# ------------------------------------------------------------------------------------- leases


def _lease(uri: str, run_id: str, **settings) -> Lease:
    return Lease(uri, run_id=run_id, what=f"test {run_id}", **{"poll_s": 0.1, **settings})


def test_second_holder_is_refused_naming_the_first_and_a_waiter_gets_it(root: str) -> None:
    uri = lease_uri(root)
    first = _lease(uri, "run-a").acquire()
    with pytest.raises(LeaseHeld) as refused:
        _lease(uri, "run-b").acquire()
    message = str(refused.value)
    assert "run run-a (test run-a)" in message and socket.gethostname() in message
    assert first.holder.started_at in message and first.holder.expires_at in message
    assert "--wait-for-lease" in message
    assert str(pickle.loads(pickle.dumps(refused.value))) == message
    held = json.loads(storage.read_bytes(uri))
    assert held["run_id"] == "run-a" and held["pid"] == os.getpid()

    waiter = _lease(uri, "run-c", wait_s=20)
    acquired_at: list[float] = []
    thread = threading.Thread(target=lambda: (waiter.acquire(), acquired_at.append(time.monotonic())))
    thread.start()
    time.sleep(1.0)
    assert not acquired_at, "the waiter waits while the holder lives"
    released_at = time.monotonic()
    first.release()
    thread.join(10)
    assert acquired_at and acquired_at[0] - released_at < 2.0
    assert json.loads(storage.read_bytes(uri))["run_id"] == "run-c"
    waiter.release()
    assert not storage.exists(uri), "released: the lease object is gone"


_HOLDER = """
import sys, time
from pipeline.lease import Lease
lease = Lease(sys.argv[1], run_id="doomed", what="a run that will be killed", ttl_s=float(sys.argv[2])).acquire()
print(lease.holder.expires_at, flush=True)
time.sleep(120)
"""


def _killed_holder(uri: str, ttl_s: float) -> None:
    """A process that takes the lease on ``uri`` and is killed with SIGKILL (and reaped)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, uri, str(ttl_s)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip(), "the holder process acquired the lease"
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def test_a_killed_holder_on_another_machine_blocks_until_its_lease_expires(root: str, caplog) -> None:
    uri, ttl_s = lease_uri(root), 3.0
    _killed_holder(uri, ttl_s)
    # As if it had run elsewhere: its process cannot be looked at from here.
    storage.write_bytes(uri, json.dumps({**json.loads(storage.read_bytes(uri)), "machine": "elsewhere"}).encode())
    expires = lease_module._parse_time(json.loads(storage.read_bytes(uri))["expires_at"])
    with pytest.raises(LeaseHeld, match="run doomed .* expires at"):
        _lease(uri, "next").acquire()
    caplog.set_level(logging.WARNING, logger=lease_module.__name__)
    with _lease(uri, "next", wait_s=3 * ttl_s, ttl_s=ttl_s):
        took_over = time.time()
        assert json.loads(storage.read_bytes(uri))["run_id"] == "next"
    assert expires < took_over < expires + 1.5, "blocked until the dead holder's lease expired, no longer"
    assert any("took over the lease" in r.message and "doomed" in r.message for r in caplog.records)
    assert not storage.exists(uri)


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(root: str, caplog) -> None:
    uri = lease_uri(root)
    _killed_holder(uri, 60.0)
    caplog.set_level(logging.WARNING, logger=lease_module.__name__)
    with _lease(uri, "restarted"):
        assert json.loads(storage.read_bytes(uri))["run_id"] == "restarted"
    assert any("doomed" in r.message and "its process is gone" in r.message for r in caplog.records)
    with _lease(uri, "alive"), pytest.raises(LeaseHeld, match="run alive"):
        _lease(uri, "second").acquire()  # a live holder on this machine is waited for, as anywhere


def test_the_heartbeat_keeps_a_lease_past_its_ttl(root: str) -> None:
    uri = lease_uri(root)
    with _lease(uri, "long-run", ttl_s=1.2) as holder:
        first_expiry = holder.holder.expires_at
        time.sleep(3.0)
        with pytest.raises(LeaseHeld, match="long-run"):
            _lease(uri, "other").acquire()
        assert not holder.lost.is_set() and holder.holder.expires_at > first_expiry
        holder.verify()


def test_a_holder_whose_lease_was_taken_notices_and_stops(root: str) -> None:
    uri = lease_uri(root)
    with _lease(uri, "victim", ttl_s=1.5) as victim:
        thief = dict(json.loads(storage.read_bytes(uri)), run_id="thief", what="a run that took over")
        storage.write_bytes(uri, json.dumps(thief).encode())
        with pytest.raises(LeaseLost, match="lease lost: .* no longer held by run victim: run thief"):
            victim.verify()
        assert victim.lost.wait(2.0)
        with pytest.raises(LeaseLost):
            victim.check()
    assert json.loads(storage.read_bytes(uri))["run_id"] == "thief", "a lost lease is not deleted on release"


def test_the_heartbeat_alone_notices_a_theft(tmp_path) -> None:
    uri = lease_uri(f"file://{tmp_path}")
    with _lease(uri, "victim", ttl_s=0.9) as victim:
        storage.write_bytes(uri, json.dumps(dict(json.loads(storage.read_bytes(uri)), run_id="thief")).encode())
        assert victim.lost.wait(2.0), "noticed within ttl/3 and a bit"
        assert "run thief" in victim.lost_reason


# ------------------------------------------------------------------- two inference runs, one output


@pytest.fixture(scope="module")
def inference_setup(tmp_path_factory) -> dict[str, str]:
    """A synthetic dataset of 8 shards of 3 small images and a tiny model that keeps every box."""
    folder = tmp_path_factory.mktemp("two-runs")
    dataset = ingest_synthetic(f"file://{folder}/data", num_images=24, image_size=64, shard_size=3)
    torch.manual_seed(0)
    model = build_detector(
        "tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES], box_score_thresh=0.0
    )
    save_checkpoint(model, folder / "model.pt")
    return {"data": dataset.uri, "model": str(folder / "model.pt"), "root": f"file://{folder}"}


def _spec(setup: dict, out_uri: str, **settings) -> InferenceSpec:
    return InferenceSpec(setup["data"], out_uri, setup["model"], executor="local", device="cpu", **settings)


def _assert_consistent(out_uri: str, run_id: str) -> None:
    """Each image once; every shard's images, detections and commit record of the one run."""
    store = OutputStore(out_uri)
    images = store.read_table("images").to_pylist()
    assert len(images) == len({row["image_id"] for row in images}) == 24
    for shard, record in store.committed_shards().items():
        rows = store.read_table("images", [shard]).to_pylist() + store.read_table("detections", [shard]).to_pylist()
        assert {row["run_id"] for row in rows} == {record["run_id"]} == {run_id}, shard


def test_a_second_inference_run_on_one_output_is_refused_or_waits(inference_setup) -> None:
    out_uri = inference_setup["root"] + "/out"
    seen: dict = {}

    def while_running(summary) -> None:
        if "refused" in seen:
            return
        with pytest.raises(LeaseHeld) as error:
            run_inference(_spec(inference_setup, out_uri))
        seen["refused"] = str(error.value)
        patient = _spec(inference_setup, out_uri, lease_wait_s=60)
        seen["thread"] = threading.Thread(target=lambda: seen.update(waited=run_inference(patient)))
        seen["thread"].start()

    first = run_inference(_spec(inference_setup, out_uri), progress=while_running)
    seen["thread"].join(60)
    assert first.shards_done == 8 and not first.failed
    assert f"run {first.run_id} (inference of " in seen["refused"], "the holder is named"
    second = seen["waited"]
    assert second.shards_done == 0 and second.shards_skipped == 8, "it waited its turn, then found all done"
    _assert_consistent(out_uri, first.run_id)
    assert OutputStore(out_uri).read_manifest()["run_id"] == second.run_id
    assert not storage.exists(lease_uri(out_uri))


def test_an_inference_run_that_loses_its_lease_stops(inference_setup) -> None:
    out_uri = inference_setup["root"] + "/stolen"
    thief = {"run_id": "thief", "what": "another run", "host": "elsewhere", "pid": 1}

    def steal(summary) -> None:
        holder = json.loads(storage.read_bytes(lease_uri(out_uri)))
        storage.write_bytes(lease_uri(out_uri), json.dumps({**holder, **thief}).encode())

    with pytest.raises(LeaseLost, match="lease lost: .*run thief"):
        run_inference(_spec(inference_setup, out_uri), progress=steal)
    committed = OutputStore(out_uri).committed_names()
    assert 0 < len(committed) < 8, "stopped at a shard boundary, before the end"
    manifest = OutputStore(out_uri).read_manifest()
    assert manifest is None or manifest["state"] == "running", "the lost run wrote no final manifest"
    assert json.loads(storage.read_bytes(lease_uri(out_uri)))["run_id"] == "thief"


def test_lease_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="lease_wait_s must be ≥ 0"):
        InferenceSpec("file:///d", "file:///o", "file:///m", lease_wait_s=-1)
    with pytest.raises(ValueError, match="ttl_s > 0"):
        Lease("file:///tmp/x/_lease.json", run_id="r", what="w", ttl_s=0)
