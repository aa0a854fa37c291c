"""The shard worker in-process (no Ray): outputs equal the model's on each image, in pixels of the
displayed image; every input image gets exactly one ``images`` row; lineage and where the shard was
done; committed shards are skipped; the job spec refuses invalid settings. The in-process distributor
(``executor="local"``): one worker, two threads, fetch of one shard overlapping detection of
another, and no Ray."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import build_detector, load_checkpoint, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import worker as worker_module
from pipeline.dataset import open_dataset
from pipeline.decode import DecodedImage, decode_image
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images, ingest_synthetic
from pipeline.jobs import InferenceSpec
from pipeline.outputs import OutputStore
from pipeline.storage import StorageError
from pipeline.worker import ShardResult, ShardWorker

REPO = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION_TAG = 0x0112
# (name, stored width, stored height); the JPEG is stored landscape and displayed portrait.
IMAGE_SIZES = [("a.png", 160, 96), ("b.png", 96, 160), ("c.png", 128, 128), ("d.png", 200, 80)]
ROTATED = ("rotated.jpg", 120, 72)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").resize((width, height), Image.BILINEAR)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny model with random weights that keeps every box (detections on any image)."""
    torch.manual_seed(0)
    model = build_detector(
        "tiny",
        len(CATEGORIES) + 1,
        class_names=["__background__", *CATEGORIES],
        box_score_thresh=0.0,
        box_detections_per_img=30,
    )
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """Images of several sizes and aspect ratios, one EXIF-rotated JPEG and one corrupt file, in
    shards of 3. Returns the dataset URI and the files' bytes by image id."""
    folder = tmp_path_factory.mktemp("mixed")
    files: dict[str, bytes] = {}
    for seed, (name, width, height) in enumerate(IMAGE_SIZES):
        buffer = io.BytesIO()
        _photo(width, height, seed).save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    name, width, height = ROTATED
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    _photo(width, height, 9).save(buffer, format="JPEG", quality=90, exif=exif)
    files[name] = buffer.getvalue()
    files["broken.png"] = files["a.png"][:200]
    for name, data in files.items():
        (folder / name).write_bytes(data)
    dataset = ingest_images(f"file://{folder}", f"file://{folder}-dataset", shard_size=3)
    return dataset.uri, files


def _worker(model_file: Path, data_uri: str, out_uri: str, *, run_id: str | None = None, **settings) -> ShardWorker:
    """A worker for the job "``model_file`` over ``data_uri`` into ``out_uri``", on the CPU unless
    ``settings`` say otherwise."""
    spec = InferenceSpec(data_uri, out_uri, str(model_file), **{"device": "cpu", **settings})
    return ShardWorker(spec, run_id=run_id)


def _process_all(worker: ShardWorker, data_uri: str) -> list[ShardResult]:
    return [worker.process(shard) for shard in open_dataset(data_uri).shards]


def _detections_by_image(out_uri: str) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = {}
    for row in OutputStore(out_uri).read_table("detections").to_pylist():
        by_image.setdefault(row["image_id"], []).append(row)
    return by_image


def test_outputs_equal_the_model_on_each_displayed_image(model_file, mixed_dataset, tmp_path) -> None:
    data_uri, files = mixed_dataset
    out_uri = f"file://{tmp_path}/out"
    results = _process_all(_worker(model_file, data_uri, out_uri, batch_size=1), data_uri)
    assert sum(r.num_images for r in results) == len(files)
    assert sum(r.num_errors for r in results) == 1

    store = OutputStore(out_uri)
    images = {row["image_id"]: row for row in store.read_table("images").to_pylist()}
    assert sorted(images) == sorted(files), "every input image exactly one images row"
    assert images["broken.png"]["status"] == "error" and "broken.png" in images["broken.png"]["error"]
    assert images["broken.png"]["num_detections"] == 0
    name, stored_width, stored_height = ROTATED
    assert (images[name]["width"], images[name]["height"]) == (stored_height, stored_width), "displayed size"

    reference = load_checkpoint(model_file.read_bytes()).eval().to(memory_format=torch.channels_last)
    detections = _detections_by_image(out_uri)
    for image_id, data in files.items():
        decoded = decode_image(data, image_id)
        if not isinstance(decoded, DecodedImage):
            assert image_id not in detections
            continue
        with torch.inference_mode():
            expected = reference([decoded.image.float() / 255])[0]
        rows = sorted(detections.get(image_id, []), key=lambda row: -row["score"])
        assert images[image_id]["status"] == "ok" and images[image_id]["num_detections"] == len(rows)
        assert len(rows) == len(expected["scores"]) > 0, image_id
        got_boxes = torch.tensor([[row["x1"], row["y1"], row["x2"], row["y2"]] for row in rows])
        torch.testing.assert_close(got_boxes, expected["boxes"].float(), atol=1e-3, rtol=0, msg=image_id)
        torch.testing.assert_close(
            torch.tensor([row["score"] for row in rows]), expected["scores"].float(), atol=1e-5, rtol=0
        )
        assert [row["label"] for row in rows] == expected["labels"].tolist()
        assert all(row["label_name"] == CATEGORIES[row["label"] - 1] for row in rows)
        width, height = images[image_id]["width"], images[image_id]["height"]
        assert float(got_boxes[:, 2].max()) <= width and float(got_boxes[:, 3].max()) <= height


def test_batching_does_not_change_detections(model_file, tmp_path) -> None:
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=8, image_size=96, shard_size=8)
    outputs = {}
    for batch_size in (1, 4):
        out_uri = f"file://{tmp_path}/out-{batch_size}"
        _worker(model_file, dataset.uri, out_uri, batch_size=batch_size).process(dataset.shards[0])
        outputs[batch_size] = _detections_by_image(out_uri)
    assert sorted(outputs[1]) == sorted(outputs[4])
    for image_id, single in outputs[1].items():
        batched = outputs[4][image_id]
        assert len(single) == len(batched), image_id
        scores_single = sorted(row["score"] for row in single)
        scores_batched = sorted(row["score"] for row in batched)
        assert np.allclose(scores_single, scores_batched, atol=1e-4), image_id


def test_lineage_and_commit_record(model_file, tmp_path) -> None:
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=4, image_size=64, shard_size=4)
    out_uri = f"file://{tmp_path}/out"
    worker = _worker(model_file, dataset.uri, out_uri, run_id="run-1")
    result = worker.process(dataset.shards[0])
    assert worker.model_id == hashlib.sha256(model_file.read_bytes()).hexdigest()[:16]
    store = OutputStore(out_uri)
    for table in ("images", "detections"):
        rows = store.read_table(table).to_pylist()
        assert rows and {(row["run_id"], row["model_id"]) for row in rows} == {("run-1", worker.model_id)}
    record = store.committed_shards()["shard-00000"]
    assert record["run_id"] == "run-1" and record["model_id"] == worker.model_id
    assert record["num_images"] == result.num_images == 4
    assert record["num_detections"] == result.num_detections == store.read_table("detections").num_rows
    assert record["node"] == socket.gethostname() and record["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    assert set(record["timings"]) == {"read", "decode", "detect"}  # the write is timed after its record


def test_score_threshold_overrides_the_checkpoint(model_file, tmp_path) -> None:
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=4, image_size=96, shard_size=4)
    counts = {}
    for threshold in (None, 0.3):
        out_uri = f"file://{tmp_path}/out-{threshold}"
        _worker(model_file, dataset.uri, out_uri, score_threshold=threshold).process(dataset.shards[0])
        scores = OutputStore(out_uri).read_table("detections").column("score").to_pylist()
        counts[threshold] = len(scores)
        if threshold is not None:
            assert all(score >= threshold for score in scores)
    assert counts[0.3] < counts[None]


def test_committed_shards_are_skipped(model_file, tmp_path) -> None:
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=6, image_size=64, shard_size=2)
    out_uri = f"file://{tmp_path}/out"
    worker = _worker(model_file, dataset.uri, out_uri)
    worker.process(dataset.shards[1])
    written = (tmp_path / "out" / "images" / "shard-00001.parquet").stat().st_mtime_ns
    assert worker.process(dataset.shards[1]).skipped
    results = _process_all(worker, dataset.uri)
    assert [(r.shard, r.skipped) for r in results] == [
        ("shard-00000", False),
        ("shard-00001", True),
        ("shard-00002", False),
    ]
    assert (tmp_path / "out" / "images" / "shard-00001.parquet").stat().st_mtime_ns == written
    assert OutputStore(out_uri).committed_names() == {"shard-00000", "shard-00001", "shard-00002"}


def test_invalid_settings_are_refused(model_file, tmp_path) -> None:
    out_uri = f"file://{tmp_path}/out"
    data_uri = f"file://{tmp_path}/data"
    for settings, message in (
        ({"batch_size": 0}, "batch_size"),
        ({"amp": "fp8"}, "amp"),
        ({"amp": "auto"}, "amp"),  # the old spelling of "off" is gone
        ({"device": "tpu"}, "device"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"max_shard_attempts": 0}, "max_shard_attempts"),
    ):
        with pytest.raises(ValueError, match=message):
            InferenceSpec(data_uri, out_uri, str(model_file), **settings)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            _worker(model_file, data_uri, out_uri, device="cuda")
    with pytest.raises(StorageError, match="missing.pt") as missing:
        _worker(tmp_path / "missing.pt", data_uri, out_uri)
    assert not missing.value.transient


def test_local_executor_overlaps_fetch_with_detection(model_file, tmp_path, monkeypatch) -> None:
    """Stage intervals recorded around the real stages, detection made slow (device time): in
    the order detections end, each shard's fetch starts before the previous shard's detection
    ends — one thread fetches while the other holds the model."""
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=12, image_size=96, shard_size=3)
    intervals: dict[tuple[str, str], tuple[float, float]] = {}
    lock = threading.Lock()

    def timed(stage: str, method, shard_of):
        def run(self, *args):
            started = time.perf_counter()
            value = method(self, *args)
            with lock:
                intervals[(stage, shard_of(*args))] = (started, time.perf_counter())
            return value

        return run

    def slow_detect_images(*args, **kwargs):
        time.sleep(0.3)
        return real_detect_images(*args, **kwargs)

    real_detect_images = worker_module.detect_images
    monkeypatch.setattr(worker_module, "detect_images", slow_detect_images)
    monkeypatch.setattr(ShardWorker, "fetch", timed("fetch", ShardWorker.fetch, lambda shard: shard.name))
    monkeypatch.setattr(ShardWorker, "detect", timed("detect", ShardWorker.detect, lambda fetched: fetched.shard.name))
    out_uri = f"file://{tmp_path}/out"
    spec = InferenceSpec(dataset.uri, out_uri, str(model_file), executor="local", device="cpu", batch_size=3)
    summary = run_inference(spec)

    assert summary.shards_done == 4 and summary.images == 12 and not summary.failed
    assert summary.actor_restarts == 0
    manifest = OutputStore(out_uri).read_manifest()
    assert manifest["state"] == "finished" and manifest["settings"]["executor"] == "local"
    assert all(set(shard["timings"]) == {"read", "decode", "detect"} for shard in manifest["shards"].values())
    assert {shard["node"] for shard in manifest["shards"].values()} == {socket.gethostname()}
    order = sorted(manifest["shards"], key=lambda name: intervals[("detect", name)][1])
    for previous, current in zip(order, order[1:]):
        assert intervals[("fetch", current)][0] < intervals[("detect", previous)][1], "fetch overlaps detection"


def test_local_executor_never_imports_ray(model_file, tmp_path) -> None:
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=4, image_size=64, shard_size=2)
    code = f"""
        import sys
        from pipeline.inference import run_inference
        from pipeline.jobs import InferenceSpec

        spec = InferenceSpec({dataset.uri!r}, {f"file://{tmp_path}/out"!r}, {str(model_file)!r}, executor="local")
        summary = run_inference(spec)
        assert summary.shards_done == 2 and not summary.failed, summary
        assert "ray" not in sys.modules, "the in-process executor imported Ray"
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model_file, mixed_dataset, tmp_path) -> None:
    data_uri, _ = mixed_dataset
    outputs = {}
    for device, amp in (("cpu", "off"), ("cuda", "off"), ("cuda", "bf16")):
        out_uri = f"file://{tmp_path}/out-{device}-{amp}"
        _process_all(_worker(model_file, data_uri, out_uri, device=device, amp=amp, batch_size=1), data_uri)
        outputs[(device, amp)] = _detections_by_image(out_uri)
    cpu = outputs[("cpu", "off")]
    for key in (("cuda", "off"), ("cuda", "bf16")):
        tolerance = 1e-3 if key[1] == "off" else 5e-2
        assert sorted(outputs[key]) == sorted(cpu)
        for image_id, rows in cpu.items():
            top_cpu = max(row["score"] for row in rows)
            top_gpu = max(row["score"] for row in outputs[key][image_id])
            assert abs(top_cpu - top_gpu) < tolerance, (key, image_id)
