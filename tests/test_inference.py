"""Distributed batch inference on a real local Ray cluster and the real S3 server: exactly once
under actor kills, driver kills and storage outages; re-runs do nothing; bad images are error rows;
no secret reaches the outputs; the in-process executor writes what the Ray actors write."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray
import torch

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import inference, storage
from pipeline.dataset import ShardInfo
from pipeline.distributors import IN_FLIGHT_PER_WORKER, Completion, Distributor, ShardFailure
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images, ingest_synthetic
from pipeline.jobs import ClusterSpec, InferenceSpec
from pipeline.outputs import OutputStore
from pipeline.storage_config import StorageConfig
from pipeline.worker import ShardResult
from tests.corpus import write_bad_input_corpus
from tests.seaweed import SECRET_KEY

NUM_SHARDS, PER_SHARD = 8, 6


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


def _spec(setup: dict, out_uri: str, *, data_uri: str | None = None, **settings) -> InferenceSpec:
    """The job "the test model over ``data_uri`` (default: the synthetic dataset) into ``out_uri``"
    on the session's Ray cluster; storage from the environment unless ``settings`` say otherwise."""
    cluster = ClusterSpec(ray_address=setup["ray"])
    return InferenceSpec(data_uri or setup["data"], out_uri, setup["model"], cluster=cluster, **settings)


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
def clean(setup, s3_server):
    """A clean run, its storage given explicitly (key, literal secret, endpoint) as a StorageConfig."""
    out = setup["bucket"] + "/clean"
    explicit = StorageConfig(s3_server.storage_options())
    summary = run_inference(_spec(setup, out, workers=2, batch_size=4, storage=explicit))
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
    store = OutputStore(setup["bucket"] + "/clean")
    manifest = store.read_manifest()
    assert manifest["state"] == "finished" and manifest["totals"]["images"] == NUM_SHARDS * PER_SHARD
    assert all(dict(row)["model_id"] == manifest["model_id"] for row in images)
    assert manifest["settings"]["batch_size"] == 4 and manifest["settings"]["executor"] == "ray"
    node = ray.get_runtime_context().get_node_id()
    assert {shard["node"] for shard in manifest["shards"].values()} == {node}, "where each shard was done"
    assert all(shard["worker"].startswith(f"{node}:") for shard in manifest["shards"].values())


def test_no_secret_reaches_the_outputs(setup, clean) -> None:
    """The clean run was given a literal secret: the manifest shows it masked, and neither the
    manifest nor any commit record holds it."""
    store = OutputStore(setup["bucket"] + "/clean")
    assert store.read_manifest()["settings"]["storage"]["options"]["secret"] == "***"
    written = [storage.read_bytes(store.manifest_uri)]
    written += [storage.read_bytes(store.commit_uri(name)) for name in sorted(store.committed_names())]
    assert len(written) == 1 + NUM_SHARDS
    assert not any(SECRET_KEY.encode() in data for data in written)


def test_rerun_does_no_work_and_changes_nothing(setup, clean) -> None:
    out = setup["bucket"] + "/clean"
    fs, path = storage.filesystem(out)
    before = {p: info["ETag"] for p, info in fs.find(path + "/images", detail=True).items()}
    summary = run_inference(_spec(setup, out, workers=2))
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
        target=lambda: result.update(summary=run_inference(_spec(setup, out, workers=2, batch_size=2)))
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


@pytest.mark.usefixtures("prefect_server")  # the CLI runs through Prefect flows: they report to the server
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
    except AssertionError as exc:
        driver.kill()
        printed = driver.communicate()[0].decode(errors="replace")
        raise AssertionError(f"{exc}; the driver printed:\n{printed[-3000:]}") from None
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
        target=lambda: result.update(summary=run_inference(_spec(setup, out, workers=2, batch_size=2)))
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
    summary = run_inference(_spec(setup, bucket + "/corpus-out", data_uri=dataset.uri, workers=2))
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
    summary = run_inference(_spec(setup, bucket + "/broken-out", data_uri=dataset.uri, workers=2))
    assert list(summary.failed) == ["shard-00001"] and "not a readable Parquet" in summary.failed["shard-00001"]
    assert OutputStore(bucket + "/broken-out").committed_names() == {"shard-00000", "shard-00002"}
    manifest = OutputStore(bucket + "/broken-out").read_manifest()
    assert manifest["state"] == "failed" and manifest["shards"]["shard-00001"]["state"] == "failed"


def test_cuda_without_cluster_gpus_is_refused(setup) -> None:
    if ray.cluster_resources().get("GPU"):
        pytest.skip("the cluster has GPUs")
    out = setup["bucket"] + "/no-gpu"
    with pytest.raises(ValueError, match="the Ray cluster has no GPUs"):
        run_inference(_spec(setup, out, device="cuda"))
    manifest = OutputStore(out).read_manifest()
    assert manifest["state"] == "stopped" and "no GPUs" in manifest["error"]
    assert not OutputStore(out).committed_names()


def test_local_executor_writes_what_the_ray_actors_write(setup, clean) -> None:
    """``executor="local"``: one shard worker in this process, same settings, same committed tables."""
    out = setup["bucket"] + "/local"
    threads = torch.get_num_threads()
    try:
        summary = run_inference(_spec(setup, out, batch_size=4, threads_per_worker=1, executor="local"))
    finally:
        torch.set_num_threads(threads)
    assert not summary.failed and summary.shards_done == NUM_SHARDS and summary.actor_restarts == 0
    assert _tables(out) == clean
    manifest = OutputStore(out).read_manifest()
    assert manifest["state"] == "finished" and manifest["settings"]["executor"] == "local"
    assert {shard["node"] for shard in manifest["shards"].values()} == {socket.gethostname()}


class ScriptedDistributor(Distributor):
    """Runs nothing: answers each attempt of a shard with the next outcome scripted for it —
    ``ok``, ``storage`` (still failing after its retries), ``bad`` (deterministic), ``died``."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = {name: list(outcomes) for name, outcomes in script.items()}
        self.submitted: list[ShardInfo] = []
        self.most_in_flight = 0
        self.replaced = 0

    def has_room(self) -> bool:
        return len(self.submitted) < IN_FLIGHT_PER_WORKER

    def submit(self, shard: ShardInfo) -> None:
        self.submitted.append(shard)
        self.most_in_flight = max(self.most_in_flight, len(self.submitted))

    @property
    def in_flight(self) -> int:
        return len(self.submitted)

    def wait(self, timeout_s: float) -> list[Completion]:
        shard = self.submitted.pop(0)
        outcome = self.script[shard.name].pop(0)
        if outcome == "ok":
            return [Completion(shard, 0, result=ShardResult(shard.name, num_images=shard.num_images))]
        if outcome == "died":
            return [Completion(shard, 0, failure=ShardFailure("worker lost", True), worker_died=True)]
        return [Completion(shard, 0, failure=ShardFailure(f"{outcome} failure", retryable=outcome == "storage"))]

    def replace_worker(self, worker) -> bool:
        self.replaced += 1
        return True

    def close(self) -> None:
        pass


def test_scheduler_retries_replaces_and_gives_up(tmp_path, monkeypatch) -> None:
    """The scheduler's rules without Ray: a transient storage failure and a lost worker are retried
    (the worker replaced), a deterministic error fails its shard at once, a shard that keeps
    failing is given up after max_shard_attempts; the others finish; ≤ 2 shards in flight."""
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=10, image_size=32, shard_size=2)
    (tmp_path / "model.pt").write_bytes(b"the scheduler only hashes the model")
    script = {
        "shard-00000": ["storage", "ok"],
        "shard-00001": ["died", "ok"],
        "shard-00002": ["bad"],
        "shard-00003": ["storage", "died", "storage"],
        "shard-00004": ["ok"],
    }
    distributor = ScriptedDistributor(script)
    monkeypatch.setattr(inference, "start_distributor", lambda spec, run_id, num_shards: distributor)
    out_uri = f"file://{tmp_path}/out"
    spec = InferenceSpec(dataset.uri, out_uri, str(tmp_path / "model.pt"), executor="local", max_shard_attempts=3)
    summary = run_inference(spec)

    assert all(not outcomes for outcomes in distributor.script.values()), "every scripted attempt was made"
    assert summary.shards_done == 3 and summary.images == 6
    assert summary.failed == {
        "shard-00002": "bad failure",
        "shard-00003": "gave up after 3 attempts: storage failure",
    }
    assert summary.actor_restarts == distributor.replaced == 2
    assert distributor.most_in_flight == IN_FLIGHT_PER_WORKER
    manifest = OutputStore(out_uri).read_manifest()
    assert manifest["state"] == "failed" and manifest["this_run"]["failed"] == summary.failed
    assert {name: entry["state"] for name, entry in manifest["shards"].items()} == {
        "shard-00002": "failed",
        "shard-00003": "failed",
    }


def test_workers_start_while_the_plan_runs(tmp_path, monkeypatch) -> None:
    """The distributor is started beside the plan, not after it (its workers' start-up overlaps the
    plan); a plan that fails stops the workers started meanwhile."""
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=4, image_size=32, shard_size=2)
    save_checkpoint(build_detector("tiny", len(CATEGORIES) + 1), tmp_path / "model.pt")  # the plan reads its classes
    started, closed = threading.Event(), threading.Event()

    class Closing(ScriptedDistributor):
        def close(self) -> None:
            closed.set()

    def start(spec, run_id, num_shards):
        started.set()
        return Closing({"shard-00000": ["ok"], "shard-00001": ["ok"]})

    real_plan = inference.InferenceRun.plan

    def plan(self, dataset) -> None:
        assert started.wait(30), "the workers are started before the plan ends"
        real_plan(self, dataset)

    monkeypatch.setattr(inference, "start_distributor", start)
    monkeypatch.setattr(inference.InferenceRun, "plan", plan)
    spec = InferenceSpec(dataset.uri, f"file://{tmp_path}/out", str(tmp_path / "model.pt"), executor="local")
    assert run_inference(spec).shards_done == 2 and closed.is_set()

    closed.clear()
    missing = InferenceSpec(dataset.uri, f"file://{tmp_path}/out2", str(tmp_path / "missing.pt"), executor="local")
    with pytest.raises(storage.StorageError, match="missing.pt"):
        run_inference(missing)
    assert closed.wait(30), "the workers started for a refused run are stopped"
