"""The Prefect flows against a real Prefect server, a real local Ray cluster and the real S3 server:
states and artifacts through the client, retries of transient storage failures, incremental runs,
and a deployment of deploy/prefect.yaml executed by a Prefect worker."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES, make_image
from pipeline import storage
from pipeline.jobs import ClusterSpec, DetectNewSpec, EvaluateSpec, InferenceSpec, IngestSpec
from pipeline.outputs import OutputStore
from tests.readme import run_block

pytestmark = pytest.mark.usefixtures("prefect_server")
REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def _task_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def model_uri(s3_server, tmp_path_factory) -> str:
    """A tiny detector (random weights, every box kept) in the S3 server."""
    bucket = s3_server.new_bucket("flowmodel")
    torch.manual_seed(0)
    model = build_detector(
        "tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES], box_score_thresh=0.0
    )
    local = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(model, local)
    storage.write_bytes(bucket + "/model.pt", local.read_bytes())
    return bucket + "/model.pt"


def test_ingest_infer_evaluate_flows_record_states_and_artifacts(s3_server, ray_local, model_uri) -> None:
    from flows.pipelines import evaluate_flow, inference_flow, ingest_flow

    bucket = s3_server.new_bucket("flows")
    ingest_state = ingest_flow(
        IngestSpec(bucket + "/data", source="synthetic", num_images=12, image_size=64, shard_size=4),
        return_state=True,
    )
    assert ingest_state.is_completed()
    assert ingest_state.result()["images"] == 12

    spec = InferenceSpec(bucket + "/data", bucket + "/out", model_uri, workers=1, cluster=ClusterSpec(ray_local))
    state = inference_flow(spec, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["images"] == 12 and summary["shards_done"] == 3 and not summary["failed"]
    assert OutputStore(bucket + "/out").committed_names() == {"shard-00000", "shard-00001", "shard-00002"}

    flow_run_id = state.state_details.flow_run_id
    with _client() as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed()
    assert flow_run.name.startswith("infer ") and "data" in flow_run.name  # says what runs
    artifacts = _artifacts(flow_run_id)
    assert {"inference-summary", "outputs"} <= artifacts.keys()
    assert summary["run_id"] in artifacts["inference-summary"].data
    assert "| images | 12 (0 errors) |" in artifacts["inference-summary"].data
    assert "/out/_manifest.json" in artifacts["outputs"].data
    assert {t.name.split("-")[0] for t in _task_runs(flow_run_id)} >= {"pending", "infer"}

    metrics_state = evaluate_flow(EvaluateSpec(bucket + "/data", bucket + "/out"), return_state=True)
    assert metrics_state.is_completed()
    artifacts = _artifacts(metrics_state.state_details.flow_run_id)
    assert {"coco-metrics", "per-class-ap", "metrics"} <= artifacts.keys()
    assert storage.exists(bucket + "/out/metrics.json")


def test_bad_parameters_fail_before_any_task(s3_server) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.pipelines import ingest_flow

    with pytest.raises(ParameterTypeError):
        ingest_flow({"out_uri": "s3://nowhere/x", "source": "ftp"})  # not one of the Literal's values
    with pytest.raises(ParameterTypeError, match="annotations_uri"):  # the spec's own check, before a run
        ingest_flow({"out_uri": "s3://nowhere/x", "source": "coco", "images_uri": "s3://nowhere/img"})
    with pytest.raises(ValueError, match="annotations_uri"):  # the same check when the caller builds the spec
        IngestSpec("s3://nowhere/x", source="coco", images_uri="s3://nowhere/img")


def test_transient_storage_failure_is_retried_by_the_task(s3_server, monkeypatch) -> None:
    """The S3 server is down when the ingest task starts: the storage layer gives up after one
    attempt (shortened for the test), the task fails as transient and Prefect retries it after the
    server is back; the flow completes with the dataset in the bucket."""
    from flows.pipelines import ingest_flow

    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)
    bucket = s3_server.new_bucket("retry")
    s3_server.stop()
    restarter = threading.Timer(12.0, s3_server.start)  # longer than botocore/s3fs retry on their own
    restarter.start()
    try:
        state = ingest_flow(
            IngestSpec(bucket + "/data", source="synthetic", num_images=6, image_size=64, shard_size=3),
            return_state=True,
        )
    finally:
        restarter.join()
    assert state.is_completed(), state.message
    [task_run] = [t for t in _task_runs(state.state_details.flow_run_id) if t.name.startswith("ingest")]
    assert task_run.run_count >= 2  # failed at least once, then succeeded
    assert task_run.state.is_completed()
    assert storage.exists(bucket + "/data/dataset.json")


def test_permanent_failure_is_not_retried(s3_server, monkeypatch) -> None:
    from flows.pipelines import ingest_flow

    spec = IngestSpec(
        "s3://detectflow-no-such-bucket-x/data", source="images", images_uri="s3://detectflow-no-such-bucket-x/in"
    )
    state = ingest_flow(spec, return_state=True)
    assert state.is_failed()
    [task_run] = [t for t in _task_runs(state.state_details.flow_run_id) if t.name.startswith("ingest")]
    assert task_run.run_count == 1


def _put_images(prefix: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        buffer = io.BytesIO()
        Image.fromarray(make_image(7, i, 64).image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=90)
        storage.write_bytes(f"{prefix}/img-{i:04d}.jpg", buffer.getvalue())


def test_detect_new_images_is_incremental(s3_server, ray_local, model_uri) -> None:
    from flows.pipelines import detect_new_images_flow

    bucket = s3_server.new_bucket("nightly")
    incoming, dataset, out = bucket + "/incoming", bucket + "/dataset", bucket + "/out"
    _put_images(incoming, 0, 12)
    inference = InferenceSpec(dataset, out, model_uri, workers=1, cluster=ClusterSpec(ray_local))
    run = {"spec": DetectNewSpec(incoming, inference, shard_size=8)}

    first = detect_new_images_flow(**run)
    assert first["new_images"] == 12 and first["images_processed"] == 12
    fs, path = storage.filesystem(out)
    before = {p: info["ETag"] for p, info in fs.find(path, detail=True).items() if "_manifest" not in p}
    dataset_before = storage.read_bytes(dataset + "/dataset.json")

    second = detect_new_images_flow(**run)
    assert second["new_images"] == 0 and second["images_processed"] == 0
    fs.invalidate_cache()
    after = {p: info["ETag"] for p, info in fs.find(path, detail=True).items() if "_manifest" not in p}
    assert after == before  # nothing written, nothing rewritten
    assert storage.read_bytes(dataset + "/dataset.json") == dataset_before

    _put_images(incoming, 100, 10)
    third = detect_new_images_flow(**run)
    assert third["new_images"] == 10 and third["images_processed"] == 10
    images = OutputStore(out).read_table("images")
    assert images.num_rows == 22 and len(set(images.column("image_id").to_pylist())) == 22


def test_deployment_from_prefect_yaml_runs_on_a_worker(s3_server, prefect_server, tmp_path) -> None:
    """The README's Prefect block, as written (tests/readme.py), on the session's server: both work
    pools, `prefect deploy --all` of deploy/prefect.yaml, a run of the `ingest` deployment, and
    `prefect worker start` (once: `--run-once`) — with a second run of `ingest` queued before the
    worker starts, so that the worker runs one and the other waits its turn (one run at a time per
    deployment, ENQUEUE: Scheduled, AwaitingConcurrencySlot)."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from pipeline.dataset import open_dataset

    bucket = s3_server.new_bucket("deployed")
    second = json.dumps({"spec": {"out_uri": f"{bucket}/second", "source": "synthetic", "num_images": 8}})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run_block(
        "prefect",
        cwd=REPO,
        env=env,
        replace={
            "prefect server start": ": prefect server start",  # the session's server
            "http://127.0.0.1:4200/api": prefect_server,
            "s3://detectflow/datasets/synth": f"{bucket}/first",
            "prefect worker start --pool detectflow": f"prefect deployment run ingest/ingest --params '{second}'\n"
            "prefect worker start --pool detectflow --run-once",
        },
        timeout=900,
    )

    with _client() as client:
        nightly = client.read_deployment_by_name("detect-new-images/nightly")
        assert client.read_deployment_by_name("detect-new-images/nightly-docker").work_pool_name == "detectflow-docker"
        runs = client.read_flow_runs()
        states = {
            run.parameters["spec"]["out_uri"].rsplit("/", 1)[-1]: run.state
            for run in runs
            if run.parameters.get("spec", {}).get("out_uri", "").startswith(bucket)
        }
        for run in runs:  # leave nothing queued on the session's server
            if run.parameters.get("spec", {}).get("out_uri", "").startswith(bucket) and not run.state.is_final():
                client.delete_flow_run(run.id)
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.work_pool_name == "detectflow"
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    done = [name for name, state in states.items() if state.is_completed()]
    waiting = [
        name for name, state in states.items() if state.is_scheduled() and state.name == "AwaitingConcurrencySlot"
    ]
    assert len(done) == len(waiting) == 1, states
    assert open_dataset(f"{bucket}/{done[0]}").num_images == 8
    assert not storage.exists(f"{bucket}/{waiting[0]}/dataset.json")
