"""Ingest of COCO datasets, image prefixes (the bad-input corpus) and parallel reads: every input
accounted for exactly once, ground truth exact."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.dataset import gt_targets, open_dataset, read_shard
from pipeline.decode import DecodedImage, DecodeError, decode_image
from pipeline.evaluate import ImageDT, ImageGT, coco_metrics
from pipeline.ingest import ingest_coco, ingest_images, read_many
from pipeline.lease import LeaseHeld, LeaseLost
from tests.corpus import write_bad_input_corpus

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset"
COCO_JSON = COCO / "annotations" / "instances_val2017_subset.json"
needs_coco = pytest.mark.skipif(not COCO_JSON.exists(), reason="shared COCO data not present")


def _rows(dataset, columns: list[str]) -> list[dict]:
    return [row for shard in dataset.shards for row in read_shard(shard.uri, columns).to_pylist()]


@needs_coco
def test_coco_ground_truth_round_trips_to_ap_1() -> None:
    dataset = ingest_coco(str(COCO / "images"), str(COCO_JSON), "memory://detectflow-test-coco", shard_size=64)
    try:
        coco = json.loads(COCO_JSON.read_text())
        assert dataset.num_images == len(coco["images"]) and not dataset.rejected
        assert [s.num_images for s in dataset.shards][:-1] == [64] * (len(dataset.shards) - 1)
        ordered = sorted(coco["categories"], key=lambda c: c["id"])
        assert [(c["label"], c["name"], c["source_id"]) for c in dataset.categories] == [
            (label, c["name"], c["id"]) for label, c in enumerate(ordered, start=1)
        ]
        declared = {str(image["id"]): (image["width"], image["height"]) for image in coco["images"]}
        gt, dt = [], []
        for shard in dataset.shards:
            table = read_shard(shard.uri, ["image_id", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"])
            for image_id, w, h, (boxes, labels, crowd) in zip(
                table.column("image_id").to_pylist(),
                table.column("width").to_pylist(),
                table.column("height").to_pylist(),
                gt_targets(table),
            ):
                assert (w, h) == declared[image_id]
                gt.append(ImageGT(image_id, w, h, boxes, labels, crowd))
                keep = ~crowd
                dt.append(ImageDT(image_id, boxes[keep], [1.0] * int(keep.sum()), labels[keep]))
        assert sum(len(g.labels) for g in gt) == len(coco["annotations"]) - dataset.counts.get("rejected", 0)
        assert any(g.iscrowd.any() for g in gt), "crowd flags kept"
        # One box checked by hand: xywh → xyxy, category id → label.
        first = coco["annotations"][0]
        image = next(g for g in gt if g.image_id == str(first["image_id"]))
        x, y, w, h = first["bbox"]
        label = next(c["label"] for c in dataset.categories if c["source_id"] == first["category_id"])
        match = np.all(np.isclose(image.boxes, [x, y, x + w, y + h], atol=1e-3), axis=1) & (image.labels == label)
        assert match.any()
        metrics = coco_metrics(gt, dt, dataset.class_names)
        assert metrics["AP"] == pytest.approx(1.0)
        worse = [ImageDT(d.image_id, d.boxes + 8.0, d.scores, d.labels) for d in dt]
        assert coco_metrics(gt, worse, dataset.class_names)["AP"] < 0.9, "the check can fail"
    finally:
        storage.delete("memory://detectflow-test-coco")


@needs_coco
def test_coco_ingest_from_s3_matches_local(s3_server, tmp_path) -> None:
    bucket = s3_server.new_bucket("coco")
    coco = json.loads(COCO_JSON.read_text())
    coco["images"] = coco["images"][:5]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    storage.write_json(bucket + "/ann.json", coco)
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    for image in coco["images"]:
        storage.write_bytes(f"{bucket}/img/{image['file_name']}", (COCO / "images" / image["file_name"]).read_bytes())
    remote = ingest_coco(bucket + "/img", bucket + "/ann.json", bucket + "/ds", shard_size=2)
    local = ingest_coco(str(COCO / "images"), str(tmp_path / "ann.json"), str(tmp_path / "ds"), shard_size=2)
    assert remote.num_images == 5 and len(remote.shards) == 3 and not remote.rejected
    columns = ["image_id", "image", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"]
    assert _rows(remote, columns) == _rows(local, columns)


def test_invalid_coco_inputs_are_rejected_or_cleaned_by_id(tmp_path) -> None:
    folder = tmp_path / "coco"
    write_bad_input_corpus(folder)
    coco = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 3, "file_name": "text.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "exif_rotated.jpg", "width": 60, "height": 40},
            {"id": 5, "file_name": "image.bmp", "width": 28, "height": 14},
            {"id": 5, "file_name": "image.webp", "width": 26, "height": 18},
            {"id": 6, "width": 1, "height": 1},
        ],
        "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "other"}],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "iscrowd": 0},
            {"id": 101, "image_id": 1, "category_id": 7, "bbox": [5, 5, -3, 10], "iscrowd": 0},
            {"id": 102, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 103, "image_id": 1, "category_id": 3, "bbox": [100, 100, 5, 5], "iscrowd": 0},
            {"id": 104, "image_id": 1, "category_id": 3, "bbox": [60, 40, 10, 10], "iscrowd": 1},
            {"id": 105, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 100, "image_id": 5, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 106, "image_id": 5, "category_id": 3, "bbox": [1, "x", 5, 5], "iscrowd": 0},
            {"id": 107, "image_id": 5, "category_id": 7, "bbox": [2, 3, 4, 5]},
            {"id": 108, "image_id": [5], "category_id": 7, "bbox": [2, 3, 4, 5]},
            {"id": 109, "image_id": 5, "category_id": {"id": 7}, "bbox": [2, 3, 4, 5]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = ingest_coco(str(folder), str(tmp_path / "ann.json"), str(tmp_path / "out"))
    reasons = {entry["input"].split(" (")[0]: entry["reason"] for entry in dataset.rejected}
    assert len(reasons) == len(dataset.rejected) == dataset.counts["rejected"] == 13
    assert "refers to unknown image [5]" in reasons["annotation 108"]
    assert "unknown category {'id': 7}" in reasons["annotation 109"]
    assert "non-positive size" in reasons["annotation 101"]
    assert "unknown category 99" in reasons["annotation 102"]
    assert "outside" in reasons["annotation 103"]
    assert "unknown image 42" in reasons["annotation 105"]
    assert "duplicate annotation id" in reasons["annotation 100"]
    assert "malformed bbox" in reasons["annotation 106"]
    assert reasons["image 2"] == "missing file"
    assert reasons["image 3"].startswith("3") and "not a recognised image" in reasons["image 3"]
    assert "EXIF orientation swaps it" in reasons["image 4"]
    assert reasons["image 5"] == "duplicate image id (first listed for image.bmp)"
    assert "needs an integer or string id and a file_name" in reasons["images[6]"]
    assert [c["input"].split(" (")[0] for c in dataset.cleaned] == ["annotation 104"]

    rows = {row["image_id"]: row for row in _rows(dataset, ["image_id", "gt_boxes", "gt_labels", "gt_iscrowd"])}
    assert sorted(rows) == ["1", "5"]
    # category 3 → label 1 and 7 → label 2 (contiguous, in id order); box 104 clipped to the image.
    assert rows["1"]["gt_labels"] == [2, 1] and rows["1"]["gt_iscrowd"] == [False, True]
    assert rows["1"]["gt_boxes"] == [[1, 2, 11, 12], [60, 40, 64, 48]]
    assert rows["5"]["gt_boxes"] == [[2, 3, 6, 8]] and rows["5"]["gt_iscrowd"] == [False]


def test_coco_files_that_are_not_instances_are_clear_errors(tmp_path) -> None:
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "dup.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]})
    )
    for name, message in (
        ("list.json", "list.json is not a COCO instances file"),
        ("broken.json", "broken.json is not valid JSON"),
        ("dup.json", r"duplicate category ids \[1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            ingest_coco(str(tmp_path), str(tmp_path / name), str(tmp_path / "out"))
    with pytest.raises(storage.StorageError, match="nothing.json"):
        ingest_coco(str(tmp_path), str(tmp_path / "nothing.json"), str(tmp_path / "out"))


def test_image_prefix_ingest_accounts_for_every_input(storage_root: str, tmp_path) -> None:
    local = tmp_path / "corpus"
    expectations = write_bad_input_corpus(local)
    (local / "notes.txt").write_text("not an image")
    (local / "a" / "README").write_text("no suffix")
    prefix = storage.join(storage_root, "photos")
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(prefix, str(path.relative_to(local))), path.read_bytes())
    out = storage.join(storage_root, "ds")
    dataset = ingest_images(prefix, out, shard_size=7)

    rows: dict[str, dict] = {}
    for row in _rows(dataset, ["image_id", "image", "width", "height", "source"]):
        assert row["image_id"] not in rows, "an input appears twice"
        rows[row["image_id"]] = row
    assert set(rows) == set(expectations), "every image file is exactly one row"
    assert not dataset.rejected and dataset.counts["skipped"] == 2
    assert sorted(dataset.skipped) == ["a/README", "notes.txt"]
    assert rows["a/dup.jpg"]["source"] == storage.join(prefix, "a/dup.jpg") != rows["b/dup.jpg"]["source"]

    invalid = {entry["image_id"]: entry["reason"] for entry in dataset.invalid}
    assert {"zero.jpg", "text.jpg"} <= set(invalid)
    for image_id, expectation in expectations.items():
        row = rows[image_id]
        decoded = decode_image(row["image"], image_id)
        if expectation[0] == "ok":
            assert isinstance(decoded, DecodedImage), f"{image_id}: {decoded}"
            assert (decoded.width, decoded.height) == expectation[1:] == (row["width"], row["height"]), image_id
            assert tuple(decoded.image.shape) == (3, expectation[2], expectation[1])
        else:
            assert isinstance(decoded, DecodeError), image_id
            assert decoded.message.startswith(image_id) and expectation[1] in decoded.message
        if image_id in invalid:
            assert row["width"] is None and row["height"] is None and invalid[image_id].startswith(image_id)
        else:
            assert row["width"] is not None, f"{image_id}: readable header, known size"

    again = ingest_images(prefix, out, shard_size=7, only_new=True)
    assert again.num_images == dataset.num_images and len(again.shards) == len(dataset.shards)
    assert again.counts["skipped"] == 2, "the latest listing, not a running total"
    storage.write_bytes(storage.join(prefix, "new", "x.png"), (local / "one_pixel.png").read_bytes())
    grown = ingest_images(prefix, out, shard_size=7, only_new=True)
    assert grown.num_images == dataset.num_images + 1 and len(grown.shards) == len(dataset.shards) + 1
    assert read_shard(grown.shards[-1].uri, ["image_id"]).column("image_id").to_pylist() == ["new/x.png"]


def test_empty_or_missing_prefix_is_a_clear_error(storage_root: str) -> None:
    with pytest.raises(ValueError, match="no files under .*nothing"):
        ingest_images(storage.join(storage_root, "nothing"), storage.join(storage_root, "ds"))


def test_parallel_reads_keep_order_and_bound_read_ahead(tmp_path) -> None:
    for index in range(40):
        (tmp_path / f"{index:02d}.bin").write_bytes(bytes([index]) * 10_000)
    uris = [f"file://{tmp_path}/{index:02d}.bin" for index in range(40)] + [f"file://{tmp_path}/missing.bin"]
    pulled = [0]

    def counted() -> Iterator[str]:
        for uri in uris:
            pulled[0] += 1
            yield uri

    ahead = []
    results = []
    for uri, data in read_many(counted(), threads=2, window=100, budget_bytes=20_000):
        ahead.append(pulled[0] - len(results))
        results.append((uri, data))
        time.sleep(0.005)  # a slow consumer: the reads finish and count against the budget
    assert [uri for uri, _ in results] == uris
    assert all(data == bytes([i]) * 10_000 for i, (_, data) in enumerate(results[:40]))
    assert isinstance(results[40][1], storage.StorageError) and not results[40][1].transient
    # At most 2 finished files (the budget) + 2 being read + the one just pulled; the window is 100.
    assert max(ahead) <= 5, ahead

    pulled[0] = 0
    results = []
    ahead = []
    for _ in read_many(counted(), threads=4, window=3):
        ahead.append(pulled[0] - len(results))
        results.append(_)
    assert max(ahead) <= 4 and len(results) == 41


# ------------------------------------------------------------------- ingests that share a dataset


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(root: str, name: str, count: int, seed: int) -> str:
    """``count`` small PNGs ``<name>-NNN.png`` under ``root/name`` (written by 16 threads)."""
    folder = storage.join(root, name)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(f"{folder}/{name}-{i:03d}.png", _png(seed + i)), range(count)))
    return folder


def _ids(dataset) -> list[str]:
    return [
        image_id for shard in dataset.shards for image_id in read_shard(shard.uri, ["image_id"]).column(0).to_pylist()
    ]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_concurrent_incremental_ingests_keep_every_image_once(kind: str, tmp_path, request, caplog) -> None:
    """Two ``--only-new`` ingests of different folders into one existing dataset, the second
    started while the first writes shards: the second is refused naming the first, a retry waits
    its turn; every image ends up in the dataset exactly once."""
    root = f"file://{tmp_path}" if kind == "file" else request.getfixturevalue("s3_server").new_bucket("two")
    first_folder, second_folder = _image_folder(root, "a", 100, 0), _image_folder(root, "b", 100, 1000)
    out = storage.join(root, "ds")
    ingest_images(_image_folder(root, "c", 20, 5000), out, shard_size=10, only_new=True)
    caplog.set_level(logging.WARNING, logger="pipeline.lease")
    seen: dict = {}

    def second_while_first_writes(done: int) -> None:
        if done != 60:
            return
        with pytest.raises(LeaseHeld) as refused:
            ingest_images(second_folder, out, shard_size=10, only_new=True)
        seen["refused"] = str(refused.value)
        retry = threading.Thread(
            target=lambda: seen.update(
                second=ingest_images(second_folder, out, shard_size=10, only_new=True, lease_wait_s=60)
            )
        )
        retry.start()
        seen["retry"] = retry

    first = ingest_images(first_folder, out, shard_size=10, only_new=True, progress=second_while_first_writes)
    seen["retry"].join(60)
    assert f"(ingest images from {first_folder})" in seen["refused"], "the holder is named"
    assert "in use by run ingest-" in seen["refused"]
    assert any("waiting up to 60 s" in record.message for record in caplog.records), "the waiting run says so"
    assert first.num_images == 120
    dataset = seen["second"]
    ids = _ids(dataset)
    expected = {f"{name}-{i:03d}.png" for name, count in (("a", 100), ("b", 100), ("c", 20)) for i in range(count)}
    assert len(ids) == len(set(ids)) == dataset.num_images == dataset.counts["rows"] == 220
    assert set(ids) == expected
    assert len({shard.name for shard in dataset.shards}) == len(dataset.shards) == 22
    assert ingest_images(second_folder, out, shard_size=10, only_new=True).num_images == 220, "nothing left to add"
    assert not storage.exists(storage.join(out, "_lease.json"))


def test_an_ingest_that_loses_its_lease_stops_without_touching_the_descriptor(tmp_path) -> None:
    root = f"file://{tmp_path}"
    out = storage.join(root, "ds")
    before = ingest_images(_image_folder(root, "old", 10, 0), out, shard_size=5, only_new=True)
    descriptor = storage.read_bytes(storage.join(out, "dataset.json"))

    def steal(done: int) -> None:
        if done == 12:
            uri = storage.join(out, "_lease.json")
            storage.write_bytes(uri, json.dumps({**json.loads(storage.read_bytes(uri)), "run_id": "thief"}).encode())

    with pytest.raises(LeaseLost, match="lease lost: .*run thief"):
        ingest_images(_image_folder(root, "new", 40, 100), out, shard_size=5, only_new=True, progress=steal)
    assert storage.read_bytes(storage.join(out, "dataset.json")) == descriptor
    assert open_dataset(out).num_images == before.num_images


def test_an_appending_ingest_deletes_shards_no_descriptor_lists(tmp_path) -> None:
    root = f"file://{tmp_path}"
    out = storage.join(root, "ds")
    ingest_images(_image_folder(root, "old", 10, 0), out, shard_size=5, only_new=True)
    leftover = storage.join(out, "shards", "shard-00002.parquet")  # an interrupted append's shard
    storage.write_bytes(leftover, b"PAR1 half of a shard")
    grown = ingest_images(_image_folder(root, "new", 5, 100), out, shard_size=5, only_new=True)
    assert [shard.name for shard in grown.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert _ids(grown)[-5:] == [f"new-{i:03d}.png" for i in range(5)]
    assert len(storage.list_files(storage.join(out, "shards"))) == 3
