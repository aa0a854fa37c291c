"""Distributed training on Ray Train (2 CPU workers, gloo) with the dataset and checkpoints in the
real S3 server: it learns, DDP is real, a killed worker is restored from the last checkpoint, and an
interrupted run resumes."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import psutil
import pytest

from detector import load_checkpoint
from pipeline import storage
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images, ingest_synthetic
from pipeline.outputs import OutputStore
from pipeline.training import checkpoint_uris, format_progress, train


@pytest.fixture(scope="module")
def data(s3_server, ray_local):
    bucket = s3_server.new_bucket("train")
    dataset = ingest_synthetic(bucket + "/data", num_images=64, image_size=96, shard_size=16)
    return {"bucket": bucket, "data": dataset.uri, "ray": ray_local}


def _metrics_steps(model_uri: str) -> list[int]:
    import json

    text = storage.read_bytes(model_uri + "/metrics.jsonl").decode()
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_trains_with_ddp_checkpoints_in_the_bucket_and_serves(data) -> None:
    out = data["bucket"] + "/run"
    progress: list[dict] = []
    summary = train(
        data["data"],
        out,
        preset="tiny",
        workers=2,
        steps=24,
        batch_size=4,
        checkpoint_every=8,
        ray_address=data["ray"],
        record_debug=True,
        log_every=10,
        progress=progress.append,
    )
    assert summary.steps == 24 and summary.last_loss < 0.8 * summary.first_loss
    # the driver hears from rank 0 every log_every steps and at the last one
    assert [r["step"] for r in progress] == [10, 20, 24] and {r["total"] for r in progress} == {24}
    assert "step 24/24" in format_progress(progress[-1])
    assert [storage.basename(u) for u in checkpoint_uris(out)] == [
        "step-0000008.pt",
        "step-0000016.pt",
        "step-0000024.pt",
    ]
    assert _metrics_steps(out) == list(range(1, 25))
    assert storage.read_bytes(out + "/loss_curves.png").startswith(b"\x89PNG")

    # DDP: identical replicas after every step; disjoint halves of the data in every epoch.
    ranks = [storage.read_json(f"{out}/debug/rank{r}.json") for r in (0, 1)]
    assert ranks[0]["checksums"] == ranks[1]["checksums"] and len(ranks[0]["checksums"]) == 24
    for epoch in ranks[0]["images"]:
        seen0, seen1 = set(ranks[0]["images"][epoch]), set(ranks[1]["images"][epoch])
        assert not seen0 & seen1
        assert len(seen0 | seen1) == 64, "every image seen once per epoch"

    # The final model is a detector checkpoint that inference takes directly.
    model = load_checkpoint(io.BytesIO(storage.read_bytes(summary.model_uri)))
    assert model.preset == "tiny" and model.class_names[1:] == ["circle", "square", "triangle"]
    result = run_inference(
        data["data"], data["bucket"] + "/served", summary.model_uri, workers=1, ray_address=data["ray"]
    )
    assert not result.failed and result.images == 64
    assert OutputStore(data["bucket"] + "/served").read_table("images").num_rows == 64


def test_killed_worker_is_restored_from_the_last_checkpoint(data) -> None:
    out = data["bucket"] + "/fault"
    result = {}
    runner = threading.Thread(
        target=lambda: result.update(
            summary=train(
                data["data"],
                out,
                preset="tiny",
                workers=2,
                steps=32,
                batch_size=4,
                checkpoint_every=8,
                ray_address=data["ray"],
                record_debug=True,
            )
        )
    )
    runner.start()
    deadline = time.monotonic() + 240
    while not checkpoint_uris(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    victims = [
        p for p in psutil.process_iter(["pid", "cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert victims, "no training worker process found"
    os.kill(victims[0].info["pid"], signal.SIGKILL)
    runner.join(timeout=600)
    assert result["summary"].steps == 32
    assert _metrics_steps(out) == list(range(1, 33)), "step count continuous across the restore"
    starts = [u for u in storage.list_files(out + "/debug") if "start-" in u]
    assert len(starts) >= 3, "the worker group was restarted"
    restored_from = [storage.read_json(u)["step"] for u in starts]
    assert max(restored_from) >= 8, "the restart continued from a checkpoint"


def test_interrupted_run_resumes(data) -> None:
    out = data["bucket"] + "/resume"
    train(
        data["data"], out, preset="tiny", workers=2, steps=8, batch_size=4, checkpoint_every=4, ray_address=data["ray"]
    )
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        train(data["data"], out, preset="tiny", workers=2, steps=16, ray_address=data["ray"])
    summary = train(
        data["data"],
        out,
        preset="tiny",
        workers=2,
        steps=16,
        batch_size=4,
        checkpoint_every=4,
        resume=True,
        ray_address=data["ray"],
    )
    assert summary.steps == 16 and _metrics_steps(out) == list(range(1, 17))


def test_bad_input_fails_before_any_worker(data, s3_server, tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="unknown preset 'resnet9000'"):
        train(data["data"], data["bucket"] + "/x", preset="resnet9000")
    (tmp_path / "imgs").mkdir()
    from tests.corpus import write_bad_input_corpus

    write_bad_input_corpus(tmp_path / "imgs")
    unlabelled = ingest_images(str(tmp_path / "imgs"), str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match="has no labels"):
        train(unlabelled.uri, data["bucket"] + "/y", preset="tiny")
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-train"):
        train(data["data"], "s3://no-such-bucket-train/model", preset="tiny")
    with pytest.raises(ValueError, match="is of preset 'tiny' with 4 classes, not 'tiny' with 9"):
        train(data["data"], data["bucket"] + "/run", preset="tiny", num_classes=9, resume=True)
    assert time.monotonic() - started < 30
