"""Distributed batch inference on a real local Ray cluster and the real S3 server: exactly once
under actor kills, driver kills and storage outages; re-runs do nothing; bad images are error rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import storage
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images, ingest_synthetic
from pipeline.outputs import OutputStore
from pipeline.worker import ShardWorker, shard_tasks
from tests.corpus import write_bad_input_corpus

NUM_SHARDS, PER_SHARD = 8, 6


# the CLI runs through Prefect flows: they report to the session's Prefect server
pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def setup(s3_server, ray_local):
    """A synthetic dataset and a tiny model (random weights, every box kept) in the S3 server."""
    bucket = s3_server.new_bucket("infer")
    dataset = ingest_synthetic(bucket + "/data", num_images=NUM_SHARDS * PER_SHARD, image_size=96, shard_size=PER_SHARD)
    torch.manual_seed(0)
    model = build_detector(
        "tiny",
        len(CATEGORIES) + 1,
        class_names=["__background__", *CATEGORIES],
        box_score_thresh=0.0,
        box_detections_per_img=20,
    )
    local = f"/tmp/detectflow-test-model-{os.getpid()}.pt"
    save_checkpoint(model, local)
    storage.write_bytes(bucket + "/model.pt", open(local, "rb").read())
    os.unlink(local)
    return {"bucket": bucket, "data": dataset.uri, "model": bucket + "/model.pt", "ray": ray_local}


def _tables(out_uri: str) -> tuple[list, list]:
    """The committed outputs as sorted row sets, without the per-run id; scores rounded."""
    store = OutputStore(out_uri)
    images = sorted(
        tuple(sorted((k, v) for k, v in row.items() if k != "run_id")) for row in store.read_table("images").to_pylist()
    )
    detections = sorted(
        tuple(sorted((k, round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "run_id"))
        for row in store.read_table("detections").to_pylist()
    )
    return images, detections


@pytest.fixture(scope="module")
def clean(setup):
    out = setup["bucket"] + "/clean"
    summary = run_inference(setup["data"], out, setup["model"], workers=2, batch_size=4, ray_address=setup["ray"])
    assert not summary.failed and summary.shards_done == NUM_SHARDS
    return _tables(out)


def _assert_exactly_once(tables, clean) -> None:
    images, detections = tables
    ids = [dict(row)["image_id"] for row in images]
    assert len(ids) == len(set(ids)) == NUM_SHARDS * PER_SHARD, "each image exactly once"
    assert images == clean[0]
    assert detections == clean[1]


def test_clean_run_outputs(setup, clean) -> None:
    images, detections = clean
    assert len(images) == NUM_SHARDS * PER_SHARD and len(detections) > 0
    manifest = OutputStore(setup["bucket"] + "/clean").read_manifest()
    assert manifest["state"] == "finished" and manifest["totals"]["images"] == NUM_SHARDS * PER_SHARD
    assert all(dict(row)["model_id"] == manifest["model_id"] for row in images)


def test_rerun_does_no_work_and_changes_nothing(setup, clean) -> None:
    out = setup["bucket"] + "/clean"
    fs, path = storage.filesystem(out)
    before = {p: info["ETag"] for p, info in fs.find(path + "/images", detail=True).items()}
    summary = run_inference(setup["data"], out, setup["model"], workers=2, ray_address=setup["ray"])
    assert summary.shards_done == 0 and summary.shards_skipped == NUM_SHARDS and summary.images == 0
    after = {p: info["ETag"] for p, info in fs.find(path + "/images", detail=True).items()}
    assert before == after
    assert _tables(out) == clean


def _actor_pids() -> list[int]:
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "InferenceActor" in cmdline:
            pids.append(process.info["pid"])
    return pids


def _wait_for_commits(out: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(OutputStore(out).committed_names()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} commits after {timeout}s")


def test_actor_killed_mid_shard(setup, clean) -> None:
    out = setup["bucket"] + "/actor-kill"
    result = {}
    runner = threading.Thread(
        target=lambda: result.update(
            summary=run_inference(setup["data"], out, setup["model"], workers=2, batch_size=2, ray_address=setup["ray"])
        )
    )
    runner.start()
    _wait_for_commits(out, 1)
    pids = _actor_pids()
    assert pids, "no inference actor process found"
    os.kill(pids[0], signal.SIGKILL)
    runner.join(timeout=300)
    summary = result["summary"]
    assert not summary.failed
    assert summary.actor_restarts >= 1, "the killed actor was replaced"
    _assert_exactly_once(_tables(out), clean)


def test_driver_killed_then_restarted(setup, clean) -> None:
    out = setup["bucket"] + "/driver-kill"
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "infer",
        setup["data"],
        out,
        "--model",
        setup["model"],
        "--workers",
        "1",
        "--batch-size",
        "2",
        "--ray-address",
        setup["ray"],
    ]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_commits(out, 2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    committed = len(OutputStore(out).committed_names())
    assert committed < NUM_SHARDS, "the driver was meant to die mid-run"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{committed} already committed" in again.stdout or "already committed" in again.stdout
    _assert_exactly_once(_tables(out), clean)


def test_storage_outage_mid_run(setup, clean, s3_server) -> None:
    out = setup["bucket"] + "/outage"
    result = {}
    runner = threading.Thread(
        target=lambda: result.update(
            summary=run_inference(setup["data"], out, setup["model"], workers=2, batch_size=2, ray_address=setup["ray"])
        )
    )
    runner.start()
    try:
        _wait_for_commits(out, 1)
    finally:
        s3_server.stop()
        time.sleep(10)
        s3_server.start()
    runner.join(timeout=300)
    assert not result["summary"].failed, result["summary"].failed
    _assert_exactly_once(_tables(out), clean)


def test_bad_input_corpus_gives_one_row_per_image(setup, tmp_path) -> None:
    expectations = write_bad_input_corpus(tmp_path / "corpus")
    bucket = setup["bucket"]
    for name in expectations:
        storage.write_bytes(f"{bucket}/corpus/{name}", (tmp_path / "corpus" / name).read_bytes())
    dataset = ingest_images(f"{bucket}/corpus", f"{bucket}/corpus-ds", shard_size=5)
    summary = run_inference(dataset.uri, bucket + "/corpus-out", setup["model"], workers=2, ray_address=setup["ray"])
    assert not summary.failed and summary.images == len(expectations)
    rows = {row["image_id"]: row for row in OutputStore(bucket + "/corpus-out").read_table("images").to_pylist()}
    assert set(rows) == set(expectations)
    for name, expectation in expectations.items():
        assert rows[name]["status"] == expectation[0], name
        if expectation[0] == "error":
            assert name in rows[name]["error"]
        else:
            assert (rows[name]["width"], rows[name]["height"]) == expectation[1:]


def test_unreadable_shard_fails_alone(setup) -> None:
    bucket = setup["bucket"]
    dataset = ingest_synthetic(bucket + "/broken", num_images=12, image_size=64, shard_size=4)
    storage.write_bytes(dataset.shards[1].uri, b"this is not parquet")
    summary = run_inference(dataset.uri, bucket + "/broken-out", setup["model"], workers=2, ray_address=setup["ray"])
    assert list(summary.failed) == ["shard-00001"] and "not a readable Parquet" in summary.failed["shard-00001"]
    assert OutputStore(bucket + "/broken-out").committed_names() == {"shard-00000", "shard-00002"}
    manifest = OutputStore(bucket + "/broken-out").read_manifest()
    assert manifest["state"] == "failed" and manifest["shards"]["shard-00001"]["state"] == "failed"


def test_shard_worker_in_process_pipeline(setup, tmp_path) -> None:
    worker = ShardWorker(setup["model"], str(tmp_path / "out"), batch_size=3)
    from pipeline.dataset import open_dataset

    dataset = open_dataset(setup["data"])
    results = list(worker.process_shards(shard_tasks(dataset.shards[:3])))
    worker.close()
    assert [r.shard for r in results] == ["shard-00000", "shard-00001", "shard-00002"]
    assert all(set(r.timings) == {"read", "decode", "detect", "write"} for r in results)
    assert OutputStore(str(tmp_path / "out")).committed_names() == {"shard-00000", "shard-00001", "shard-00002"}
