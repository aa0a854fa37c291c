"""Datasets of image shards and the three ingests, on file://, memory:// and the S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.dataset import DatasetWriter, gt_targets, known_sources, open_dataset, read_shard
from pipeline.evaluate import ImageDT, ImageGT, coco_metrics
from pipeline.ingest import ingest_coco, ingest_images, ingest_synthetic
from tests.corpus import write_bad_input_corpus

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset"
COCO_JSON = COCO / "annotations" / "instances_val2017_subset.json"
needs_coco = pytest.mark.skipif(not COCO_JSON.exists(), reason="shared COCO data not present")


def test_synthetic_ingest_is_deterministic_and_streams_shards(storage_root: str) -> None:
    first = ingest_synthetic(storage.join(storage_root, "a"), num_images=23, seed=3, image_size=64, shard_size=10)
    second = ingest_synthetic(storage.join(storage_root, "b"), num_images=23, seed=3, image_size=64, shard_size=10)
    assert [s.num_images for s in first.shards] == [10, 10, 3]
    assert first.num_images == 23 and first.has_labels and first.class_names[0] == "__background__"
    for a, b in zip(first.shards, second.shards):
        assert storage.read_bytes(a.uri) == storage.read_bytes(b.uri)
    table = read_shard(first.shards[0].uri)
    assert table.schema.field("image").type.equals(__import__("pyarrow").binary())
    boxes, labels, crowd = gt_targets(table)[0]
    assert boxes.shape[1] == 4 and len(labels) == len(crowd) == len(boxes)
    reopened = open_dataset(storage.join(storage_root, "a"))
    assert [s.name for s in reopened.shards] == ["shard-00000", "shard-00001", "shard-00002"]


def test_row_groups_are_sized_for_streaming(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "d"), num_images=100, image_size=32, shard_size=100)
    metadata = pq.ParquetFile(dataset.shards[0].uri[len("file://") :]).metadata
    assert metadata.num_row_groups == 4  # 32 images per row group


def test_missing_dataset_is_a_clear_error(storage_root: str) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        open_dataset(storage.join(storage_root, "nothing-here"))


def test_append_skips_duplicates_and_continues_numbering(tmp_path) -> None:
    uri = str(tmp_path / "d")
    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2)
    for i in range(3):
        writer.add(f"img{i}", b"x", f"file:///src/img{i}.jpg")
    writer.close()
    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
    assert not writer.add("img1", b"y", "file:///src/other.jpg")  # duplicate id → rejected
    writer.add("img9", b"z", "file:///src/img9.jpg")
    dataset = writer.close()
    assert [s.name for s in dataset.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert dataset.num_images == 4
    assert dataset.rejected == [{"input": "file:///src/other.jpg", "reason": "duplicate image_id 'img1'"}]
    assert "file:///src/img9.jpg" in known_sources(dataset)


@needs_coco
def test_coco_ground_truth_round_trips_to_ap_1() -> None:
    dataset = ingest_coco(str(COCO / "images"), str(COCO_JSON), "memory://coco-roundtrip", shard_size=64)
    coco = json.loads(COCO_JSON.read_text())
    assert dataset.num_images == len(coco["images"]) and not dataset.rejected
    assert [c["name"] for c in dataset.categories] == [
        c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])
    ]
    gt, dt = [], []
    for shard in dataset.shards:
        table = read_shard(shard.uri, ["image_id", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"])
        for image_id, w, h, (boxes, labels, crowd) in zip(
            table.column("image_id").to_pylist(),
            table.column("width").to_pylist(),
            table.column("height").to_pylist(),
            gt_targets(table),
        ):
            gt.append(ImageGT(image_id, w, h, boxes, labels, crowd))
            keep = ~crowd
            dt.append(ImageDT(image_id, boxes[keep], [1.0] * int(keep.sum()), labels[keep]))
    assert sum(len(g.labels) for g in gt) == len(coco["annotations"])
    assert any(g.iscrowd.any() for g in gt), "crowd flags kept"
    metrics = coco_metrics(gt, dt, dataset.class_names)
    assert metrics["AP"] == pytest.approx(1.0)


@needs_coco
def test_coco_ingest_from_s3(s3_server) -> None:
    bucket = s3_server.new_bucket("coco")
    coco = json.loads(COCO_JSON.read_text())
    coco["images"] = coco["images"][:5]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    storage.write_json(bucket + "/ann.json", coco)
    for image in coco["images"]:
        storage.write_bytes(f"{bucket}/img/{image['file_name']}", (COCO / "images" / image["file_name"]).read_bytes())
    dataset = ingest_coco(bucket + "/img", bucket + "/ann.json", bucket + "/ds", shard_size=2)
    assert dataset.num_images == 5 and len(dataset.shards) == 3


def test_invalid_annotations_are_rejected_or_cleaned_by_id(tmp_path) -> None:
    folder = tmp_path / "coco"
    write_bad_input_corpus(folder)
    coco = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 3, "file_name": "text.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "exif_rotated.jpg", "width": 60, "height": 40},
        ],
        "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "other"}],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "iscrowd": 0},
            {"id": 101, "image_id": 1, "category_id": 7, "bbox": [5, 5, -3, 10], "iscrowd": 0},
            {"id": 102, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 103, "image_id": 1, "category_id": 3, "bbox": [100, 100, 5, 5], "iscrowd": 0},
            {"id": 104, "image_id": 1, "category_id": 3, "bbox": [60, 40, 10, 10], "iscrowd": 1},
            {"id": 105, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = ingest_coco(str(folder), str(tmp_path / "ann.json"), str(tmp_path / "out"))
    reasons = {entry["input"].split(" (")[0]: entry["reason"] for entry in dataset.rejected}
    assert "non-positive size" in reasons["annotation 101"]
    assert "unknown category 99" in reasons["annotation 102"]
    assert "outside" in reasons["annotation 103"]
    assert "unknown image 42" in reasons["annotation 105"]
    assert reasons["image 2"] == "missing file"
    assert "not a recognised image" in reasons["image 3"]
    assert "EXIF orientation swaps it" in reasons["image 4"]
    assert [c["input"].split(" (")[0] for c in dataset.cleaned] == ["annotation 104"]
    table = read_shard(dataset.shards[0].uri)
    assert table.column("image_id").to_pylist() == ["1"]
    boxes, labels, crowd = gt_targets(table)[0]
    # category 3 → label 1 and 7 → label 2 (contiguous, in id order); box 104 clipped to the image.
    assert labels.tolist() == [2, 1] and crowd.tolist() == [False, True]
    assert boxes.tolist() == [[1, 2, 11, 12], [60, 40, 64, 48]]


def test_image_prefix_ingest_accounts_for_every_input(storage_root: str, tmp_path) -> None:
    local = tmp_path / "corpus"
    expectations = write_bad_input_corpus(local)
    (local / "notes.txt").write_text("not an image")
    prefix = storage.join(storage_root, "photos")
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(prefix, str(path.relative_to(local))), path.read_bytes())
    dataset = ingest_images(prefix, storage.join(storage_root, "ds"), shard_size=7)
    rows = {}
    for shard in dataset.shards:
        table = read_shard(shard.uri, ["image_id", "width", "height", "source"])
        for row in table.to_pylist():
            assert row["image_id"] not in rows, "an input appears twice"
            rows[row["image_id"]] = row
    assert set(rows) == set(expectations), "every image file is exactly one row"
    assert rows["a/dup.jpg"]["source"] != rows["b/dup.jpg"]["source"]
    assert (rows["exif_rotated.jpg"]["width"], rows["exif_rotated.jpg"]["height"]) == (40, 60)
    invalid = {entry["image_id"] for entry in dataset.invalid}
    # Undecodable headers are flagged; the truncated JPEG's header is fine (inference reports it).
    assert {"zero.jpg", "text.jpg"} <= invalid and rows["zero.jpg"]["width"] is None
    assert dataset.counts["skipped"] == 1 and not dataset.rejected

    again = ingest_images(prefix, storage.join(storage_root, "ds"), shard_size=7, only_new=True)
    assert again.num_images == dataset.num_images, "nothing new: nothing added"
    storage.write_bytes(storage.join(prefix, "new", "x.png"), (local / "one_pixel.png").read_bytes())
    grown = ingest_images(prefix, storage.join(storage_root, "ds"), shard_size=7, only_new=True)
    assert grown.num_images == dataset.num_images + 1
