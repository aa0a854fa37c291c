"""Distributed training on Ray Train (2 CPU workers, gloo) with the dataset and checkpoints in the
real S3 server: it learns, DDP is real, a killed worker is restored from the last checkpoint, and an
interrupted run resumes. The input stream and the schedule are tested as the pure functions they are."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from detector import PRESETS, load_checkpoint
from pipeline import storage
from pipeline.dataset import Dataset, ShardInfo, open_dataset
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images, ingest_synthetic
from pipeline.jobs import ClusterSpec, InferenceSpec, TrainSpec
from pipeline.outputs import OutputStore
from pipeline.storage_config import StorageConfig
from pipeline.training import (
    checkpoint_uris,
    epoch_chunk,
    format_progress,
    latest_checkpoint,
    lr_factor,
    steps_per_epoch,
    train,
)
from pipeline.training import stream as stream_module
from pipeline.training.recipe import RECIPES, scaled_lr
from tests.seaweed import SECRET_KEY


@pytest.fixture(scope="module")
def data(s3_server, ray_local):
    bucket = s3_server.new_bucket("train")
    dataset = ingest_synthetic(bucket + "/data", num_images=64, image_size=96, shard_size=16)
    return {"bucket": bucket, "data": dataset.uri, "cluster": ClusterSpec(ray_address=ray_local)}


def _spec(data: dict, out: str, **settings) -> TrainSpec:
    defaults = {"data_uri": data["data"], "preset": "tiny", "workers": 2, "batch_size": 4, "cluster": data["cluster"]}
    return TrainSpec(model_out_uri=out, **{**defaults, **settings})


def _metrics_steps(model_out_uri: str) -> list[int]:
    text = storage.read_bytes(model_out_uri + "/metrics.jsonl").decode()
    return [json.loads(line)["step"] for line in text.splitlines()]


# ------------------------------------------------------------------------------ pure parts


def _dataset_of(shard_sizes: list[int]) -> Dataset:
    shards = [ShardInfo(f"shard-{i:05d}", f"memory://x/shard-{i:05d}.parquet", n, 0) for i, n in enumerate(shard_sizes)]
    return Dataset(uri="memory://x", categories=[], shards=shards, source={})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_chunks_are_disjoint_equal_and_cover_the_epoch(world) -> None:
    dataset = _dataset_of([16, 7, 16, 3])
    for epoch in (0, 1):
        chunks = [epoch_chunk(dataset, 0, epoch, rank, world) for rank in range(world)]
        seen = [item for chunk in chunks for item in chunk]
        assert len(set(seen)) == len(seen), "disjoint: no image twice in an epoch"
        assert {len(chunk) for chunk in chunks} == {42 // world}, "every worker takes the same number of steps"
        assert len(seen) > 42 - world, "every image but fewer than `world` of them"
        assert all(0 <= row < dataset.shards[shard].num_images for shard, row in seen)
    assert epoch_chunk(dataset, 0, 0, 0, world) != epoch_chunk(dataset, 0, 1, 0, world), "reshuffled every epoch"
    assert epoch_chunk(dataset, 0, 1, 0, world) == epoch_chunk(dataset, 0, 1, 0, world), "a pure function"
    assert steps_per_epoch(dataset, world, 4) == -(-(42 // world) // 4)


def test_lr_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.02)
    assert [lr_factor(s, 90, 0, "step") for s in (0, 60, 80)] == [1.0, 0.1, 0.01]


def test_resume_skips_batches_without_decoding_them(tmp_path, monkeypatch) -> None:
    """Batches from index ``skip`` are those a full pass gives from there (same images, same flips,
    same boxes), and the skipped ones are never decoded."""
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=40, image_size=64, shard_size=8)
    chunk = epoch_chunk(dataset, 3, 1, 0, 1)
    decoded: list[str] = []
    decode_many = stream_module.decode_many

    def counting(items, **kwargs):
        decoded.extend(image_id for image_id, _ in items)
        return decode_many(items, **kwargs)

    monkeypatch.setattr(stream_module, "decode_many", counting)

    def batches(skip: int) -> list:
        settings = {"batch_size": 3, "seed": 3, "epoch": 1, "rank": 0, "hflip": True, "storage_options": None}
        return list(stream_module.epoch_batches(dataset, chunk, **settings, skip=skip, group_window=2))

    full = batches(0)
    assert len(full) == steps_per_epoch(dataset, 1, 3) == 14
    for skip in (5, 6, 13):  # within a window of groups, at a window's start, the last batch
        decoded.clear()
        rest = batches(skip)
        assert [ids for ids, _, _ in rest] == [ids for ids, _, _ in full[skip:]]
        assert decoded == [i for ids, _, _ in full[skip:] for i in ids], "only the remaining batches are decoded"
        for (_, images, targets), (_, want_images, want_targets) in zip(rest, full[skip:]):
            assert all(torch.equal(a, b) for a, b in zip(images, want_images)), "the same flips"
            assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, want_targets))


def test_loader_workers_hand_out_the_run_in_order(tmp_path) -> None:
    """Two loader processes give the same batches, in the same order, as the stream read in this
    process: from the middle of one epoch across two epoch boundaries, ending inside an epoch."""
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=24, image_size=48, shard_size=8)
    settings = stream_module.StreamSettings(batch_size=4, seed=1, hflip=True, storage_options=None, group_window=2)
    run = stream_module.RunBatches(dataset, settings, rank=0, world=1, start=3, stop=14)  # 6 steps per epoch
    in_process = list(run)
    # spawned: forking this long-lived test process (Ray driver, client threads) once crashed a
    # loader process in the full suite; Ray Train's workers fork theirs from a fresh worker process
    loaded = list(stream_module.batch_loader(run, workers=2, pin_memory=False, start_method="spawn"))
    assert [epoch for epoch, _ in loaded] == [epoch for epoch, _ in in_process] == [0] * 3 + [1] * 6 + [2] * 2
    common = {"batch_size": 4, "seed": 1, "rank": 0, "hflip": True, "storage_options": None, "group_window": 2}
    chunks = [epoch_chunk(dataset, 1, epoch, 0, 1) for epoch in range(3)]
    expected = [
        *stream_module.epoch_batches(dataset, chunks[0], epoch=0, skip=3, **common),
        *stream_module.epoch_batches(dataset, chunks[1], epoch=1, **common),
        *list(stream_module.epoch_batches(dataset, chunks[2], epoch=2, **common))[:2],
    ]
    for (_, (ids, images, targets)), (_, (ids_in, images_in, _)), (want_ids, want_images, want_targets) in zip(
        loaded, in_process, expected
    ):
        assert ids == ids_in == want_ids
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(images, images_in, want_images))
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, want_targets))
        assert all(image.dtype == torch.uint8 for image in images)


def test_batch_targets_read_the_columns_as_arrays() -> None:
    """The vectorised targets equal the row-by-row reading, with empty, null and crowd rows."""
    import pyarrow as pa

    from pipeline.dataset import gt_targets

    rows = pa.table(
        {
            "gt_boxes": [[[0, 0, 4, 4], [1, 1, 2, 2]], [], None, [[5, 5, 9, 9]]],
            "gt_labels": [[1, 2], [], None, [3]],
            "gt_iscrowd": [[False, True], [], None, None],
        },
        schema=pa.schema(
            [
                ("gt_boxes", pa.list_(pa.list_(pa.float32()))),
                ("gt_labels", pa.list_(pa.int32())),
                ("gt_iscrowd", pa.list_(pa.bool_())),
            ]
        ),
    )
    for got, want in zip(stream_module.batch_targets(rows.slice(0)), gt_targets(rows), strict=True):
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


def test_recipes_fill_what_the_job_leaves_unset_and_scale_with_the_global_batch(tmp_path) -> None:
    def spec(**settings) -> TrainSpec:
        return TrainSpec(str(tmp_path / "d"), str(tmp_path / "m"), **settings)

    tiny = spec(preset="tiny", workers=2)
    recipe = (tiny.optimizer, tiny.batch_size, tiny.lr, tiny.warmup_steps, tiny.schedule)
    assert recipe == ("adamw", 8, 0.001, 50, "step")
    assert scaled_lr(tiny.lr, 8, 8, "adamw") == pytest.approx(0.002), "AdamW: the square root of 4× the batch"
    assert scaled_lr(0.04, 8, 8, "sgd") == pytest.approx(0.16), "SGD: linear"
    assert spec(preset="tiny", workers=4).warmup_steps == 25, "the warm-up is the same number of images"
    assert spec(preset="tiny", workers=1, batch_size=4).warmup_steps == 200
    resnet = spec(preset="resnet50_fpn", workers=8)
    assert (resnet.batch_size, resnet.lr, resnet.warmup_steps, resnet.warmup_factor) == (2, 0.02, 1000, 0.001)
    assert resnet.optimizer == "sgd"
    assert resnet.schedule == "step" and resnet.lr_milestones == pytest.approx((16 / 26, 22 / 26))
    assert scaled_lr(resnet.lr, resnet.batch_size, resnet.workers) == pytest.approx(0.02), "torchvision's 8 × 2"
    mine = spec(preset="resnet50_fpn", lr=0.01, warmup_steps=7, schedule="cosine", momentum=0.8)
    assert (mine.lr, mine.warmup_steps, mine.schedule, mine.momentum, mine.batch_size) == (0.01, 7, "cosine", 0.8, 2)
    assert set(RECIPES) == set(PRESETS), "every preset has its recipe"
    with pytest.raises(ValueError, match="lr_milestones"):
        spec(lr_milestones=(0.5, 1.5))
    with pytest.raises(ValueError, match="optimizer must be sgd or adamw, not 'adam'"):
        spec(optimizer="adam")
    assert spec(preset="tiny", optimizer="sgd").lr == 0.04, "another optimiser brings its own rate"
    with pytest.raises(ValueError, match="preset resnet50_fpn's recipe has no learning rate for adamw"):
        spec(preset="resnet50_fpn", optimizer="adamw")
    assert spec(preset="resnet50_fpn", optimizer="adamw", lr=1e-4).lr == 1e-4


# ------------------------------------------------------------------------------ on Ray Train


def test_trains_with_ddp_checkpoints_in_the_bucket_and_serves(data, s3_server) -> None:
    out = data["bucket"] + "/run"
    progress: list[dict] = []
    spec = _spec(
        data,
        out,
        steps=24,
        checkpoint_every=8,
        log_every=10,
        storage=StorageConfig(s3_server.storage_options()),  # the explicit path, beside the environment
    )
    summary = train(spec, progress=progress.append)
    assert summary.steps == 24 and summary.last_loss < 0.8 * summary.first_loss
    assert summary.epochs_seen == pytest.approx(3.0)
    assert set(summary.worker_nodes) == {0, 1} and summary.restarts == 0 and summary.resumed_from == [0]
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
    checkpoint = latest_checkpoint(out, spec.storage)
    assert checkpoint["step"] == 24 and checkpoint["config"] == spec.public()
    assert SECRET_KEY not in json.dumps(checkpoint["config"]), "no storage secret in a checkpoint"

    # The final model is a detector checkpoint that inference takes directly.
    model = load_checkpoint(io.BytesIO(storage.read_bytes(summary.model_uri)))
    assert model.preset == "tiny" and model.class_names[1:] == ["circle", "square", "triangle"]
    served = data["bucket"] + "/served"
    result = run_inference(
        InferenceSpec(
            data_uri=data["data"], out_uri=served, model_uri=summary.model_uri, workers=1, cluster=data["cluster"]
        )
    )
    assert not result.failed and result.images == 64
    assert OutputStore(served).read_table("images").num_rows == 64


def test_killed_worker_is_restored_from_the_last_checkpoint(data) -> None:
    out = data["bucket"] + "/fault"
    result = {}
    spec = _spec(data, out, steps=32, checkpoint_every=8)
    runner = threading.Thread(target=lambda: result.update(summary=train(spec)))
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
    summary = result["summary"]
    assert summary.steps == 32
    assert _metrics_steps(out) == list(range(1, 33)), "step count continuous across the restore"
    assert summary.restarts >= 1, "the worker group was restarted"
    assert summary.resumed_from[0] == 0 and min(summary.resumed_from[1:]) >= 8, "continued from a checkpoint"


def test_interrupted_run_resumes(data) -> None:
    """The first run validates every 4 steps and stops at its target (any AP: the first validation);
    the second continues it to 16 steps."""
    out = data["bucket"] + "/resume"
    progress: list[dict] = []
    validating = {"val_uri": data["data"], "val_every": 4, "target_ap50": 0.0}
    stopped = train(_spec(data, out, steps=8, checkpoint_every=4, **validating), progress=progress.append)
    assert stopped.steps == 4 and [r["step"] for r in progress] == [4]
    assert "validation AP50" in format_progress(progress[0])
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        train(_spec(data, out, steps=16))
    summary = train(_spec(data, out, steps=16, checkpoint_every=4, resume=True))
    assert summary.steps == 16 and _metrics_steps(out) == list(range(1, 17))
    assert summary.resumed_from == [4] and summary.restarts == 0
    records = [json.loads(line) for line in storage.read_bytes(summary.metrics_uri).decode().splitlines()]
    assert [r["step"] for r in records if "val_AP50" in r] == [4], "the first run's validation is kept"


def test_bad_input_fails_before_any_worker(data, tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="unknown preset 'resnet9000'"):
        _spec(data, data["bucket"] + "/x", preset="resnet9000")
    (tmp_path / "imgs").mkdir()
    from tests.corpus import write_bad_input_corpus

    write_bad_input_corpus(tmp_path / "imgs")
    unlabelled = ingest_images(str(tmp_path / "imgs"), str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match="has no labels"):
        train(TrainSpec(data_uri=unlabelled.uri, model_out_uri=data["bucket"] + "/y", cluster=data["cluster"]))
    with pytest.raises(ValueError, match="has no labels"):
        train(_spec(data, data["bucket"] + "/y", val_uri=unlabelled.uri, val_every=2))
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-train"):
        train(_spec(data, "s3://no-such-bucket-train/model"))
    with pytest.raises(ValueError, match="is of preset 'tiny' with 4 classes, not 'tiny' with 9"):
        train(_spec(data, data["bucket"] + "/run", num_classes=9, resume=True))
    with pytest.raises(ValueError, match="was trained with adamw, not sgd: resume with --optimizer adamw"):
        train(_spec(data, data["bucket"] + "/run", optimizer="sgd", resume=True))
    in_memory = ingest_synthetic("memory://detectflow-train-test/data", num_images=4, image_size=32, shard_size=4)
    try:
        with pytest.raises(ValueError, match="is an in-memory location"):
            train(_spec(data, data["bucket"] + "/z", data_uri=in_memory.uri))
    finally:
        storage.delete("memory://detectflow-train-test")
    assert not storage.exists(data["bucket"] + "/z/checkpoints")
    assert open_dataset(data["data"]).num_images == 64
    assert time.monotonic() - started < 30
