"""The output commit protocol, SQL over committed outputs, evaluation and the PNG view."""

from __future__ import annotations

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import storage
from pipeline.dataset import gt_targets, read_shard
from pipeline.evaluate import evaluate, format_metrics
from pipeline.ingest import ingest_synthetic
from pipeline.outputs import AlreadyCommitted, OutputStore
from pipeline.query import query
from pipeline.show import render


def _tables(shard: str, image_ids: list[str], boxes_per_image: int = 2, run_id: str = "run-1"):
    images = pa.table(
        {
            "image_id": image_ids,
            "shard": [shard] * len(image_ids),
            "width": [64] * len(image_ids),
            "height": [64] * len(image_ids),
            "status": ["ok"] * len(image_ids),
            "error": [None] * len(image_ids),
            "num_detections": [boxes_per_image] * len(image_ids),
            "run_id": [run_id] * len(image_ids),
            "model_id": ["m"] * len(image_ids),
        }
    )
    rows = [(i, k) for i in image_ids for k in range(boxes_per_image)]
    detections = pa.table(
        {
            "image_id": [i for i, _ in rows],
            "shard": [shard] * len(rows),
            "label": [1] * len(rows),
            "label_name": ["circle"] * len(rows),
            "score": [0.5 + 0.1 * k for _, k in rows],
            "x1": [1.0] * len(rows),
            "y1": [2.0] * len(rows),
            "x2": [10.0] * len(rows),
            "y2": [12.0] * len(rows),
            "run_id": [run_id] * len(rows),
            "model_id": ["m"] * len(rows),
        }
    )
    return images, detections


def test_uncommitted_files_are_invisible_and_replaced(storage_root: str) -> None:
    store = OutputStore(storage_root)
    store.write_shard("shard-00000", *_tables("shard-00000", ["a", "b"]), {"run_id": "run-1"})
    # An interrupted write: both files of shard 1 exist, its commit record does not.
    images, detections = _tables("shard-00001", ["c", "d", "e"], boxes_per_image=5)
    from pipeline.outputs import to_parquet_bytes

    storage.write_bytes(store.file_uri("images", "shard-00001"), to_parquet_bytes(images))
    storage.write_bytes(store.file_uri("detections", "shard-00001"), to_parquet_bytes(detections))

    counts = query(storage_root, "SELECT (SELECT count(*) FROM images) AS i, (SELECT count(*) FROM detections) AS d")
    assert counts.to_pylist() == [{"i": 2, "d": 4}]
    assert store.committed_names() == {"shard-00000"}

    # The next run rewrites shard 1 from scratch and commits it.
    store.write_shard("shard-00001", *_tables("shard-00001", ["c", "d", "e"], run_id="run-2"), {"run_id": "run-2"})
    result = query(storage_root, "SELECT image_id, run_id FROM images ORDER BY image_id").to_pylist()
    assert [r["image_id"] for r in result] == ["a", "b", "c", "d", "e"]
    assert query(storage_root, "SELECT count(*) AS n FROM detections").to_pylist() == [{"n": 10}]


def test_committed_shards_are_never_rewritten(storage_root: str) -> None:
    store = OutputStore(storage_root)
    store.write_shard("shard-00000", *_tables("shard-00000", ["a"]), {"run_id": "run-1"})
    before = storage.read_bytes(store.file_uri("images", "shard-00000"))
    with pytest.raises(AlreadyCommitted):
        store.write_shard("shard-00000", *_tables("shard-00000", ["a"], run_id="run-2"), {"run_id": "run-2"})
    assert storage.read_bytes(store.file_uri("images", "shard-00000")) == before
    assert store.committed_shards()["shard-00000"]["run_id"] == "run-1"


def test_query_on_empty_outputs_and_bad_sql(tmp_path) -> None:
    out = str(tmp_path / "empty")
    assert query(out, "SELECT count(*) AS n FROM detections").to_pylist() == [{"n": 0}]
    with pytest.raises(ValueError, match="query failed"):
        query(out, "SELECT nope FROM detections")


def test_evaluate_and_show_from_committed_outputs(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=12, image_size=96, shard_size=6)
    out = str(tmp_path / "out")
    store = OutputStore(out)
    # Ground truth as detections for shard 0 only: shard 1 stays uncommitted and out of the metrics.
    shard = dataset.shards[0]
    table = read_shard(shard.uri, ["image_id", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"])
    image_rows, detection_rows = [], []
    for image_id, (boxes, labels, _) in zip(table.column("image_id").to_pylist(), gt_targets(table)):
        image_rows.append(
            {
                "image_id": image_id,
                "shard": shard.name,
                "width": 96,
                "height": 96,
                "status": "ok",
                "error": None,
                "num_detections": len(labels),
                "run_id": "r",
                "model_id": "m",
            }
        )
        for box, label in zip(boxes, labels):
            detection_rows.append(
                {
                    "image_id": image_id,
                    "shard": shard.name,
                    "label": int(label),
                    "label_name": dataset.class_names[label],
                    "score": 0.9,
                    "x1": box[0],
                    "y1": box[1],
                    "x2": box[2],
                    "y2": box[3],
                    "run_id": "r",
                    "model_id": "m",
                }
            )
    from pipeline.outputs import DETECTIONS_SCHEMA, IMAGES_SCHEMA

    store.write_shard(
        shard.name,
        pa.Table.from_pylist(image_rows, IMAGES_SCHEMA),
        pa.Table.from_pylist(detection_rows, DETECTIONS_SCHEMA),
        {"run_id": "r"},
    )
    metrics = evaluate(dataset.uri, out)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images"] == 6
    assert storage.read_json(out + "/metrics.json")["AP50"] == pytest.approx(1.0)
    assert storage.read_bytes(out + "/pr_curve.png").startswith(b"\x89PNG")
    assert "AP50" in format_metrics(metrics)

    image_id = next(r["image_id"] for r in image_rows if r["num_detections"])
    drawn = render(out, image_id, str(tmp_path / "show.png"), dataset_uri=dataset.uri)
    assert drawn["num_drawn"] == next(r["num_detections"] for r in image_rows if r["image_id"] == image_id)
    with Image.open(tmp_path / "show.png") as png:
        assert png.size == (96, 96)
    with pytest.raises(ValueError, match="not among the committed outputs"):
        render(out, "no-such-image", str(tmp_path / "x.png"), dataset_uri=dataset.uri)
