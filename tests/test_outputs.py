"""The output commit protocol on file://, memory:// and the real S3 server: a shard's files count
only once its commit record exists, partial writes are replaced, committed shards stay as they are."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector import build_detector, save_checkpoint
from pipeline import storage
from pipeline.inference import run_inference
from pipeline.ingest import ingest_synthetic
from pipeline.jobs import InferenceSpec
from pipeline.outputs import DETECTIONS_SCHEMA, IMAGES_SCHEMA, OutputStore, to_parquet_bytes
from pipeline.query import query


def output_tables(
    shard: str, image_ids: list[str], boxes_per_image: int = 2, run_id: str = "run-1"
) -> tuple[pa.Table, pa.Table]:
    """``images`` and ``detections`` tables of one shard: every image ok with ``boxes_per_image``
    boxes of label 1 ("circle") scored 0.5, 0.6, …"""
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
    rows = [(image_id, k) for image_id in image_ids for k in range(boxes_per_image)]
    detections = pa.table(
        {
            "image_id": [image_id for image_id, _ in rows],
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
    store.write_shard("shard-00000", *output_tables("shard-00000", ["a", "b"]), {"run_id": "run-1"})
    # An interrupted write: both files of shard 1 exist, its commit record does not.
    images, detections = output_tables("shard-00001", ["c", "d", "e"], boxes_per_image=5)
    storage.write_bytes(store.file_uri("images", "shard-00001"), to_parquet_bytes(images))
    storage.write_bytes(store.file_uri("detections", "shard-00001"), to_parquet_bytes(detections))

    assert store.committed_names() == {"shard-00000"}
    assert store.committed_files("images") == [store.file_uri("images", "shard-00000")]
    assert store.read_table("images").column("image_id").to_pylist() == ["a", "b"]
    assert store.read_table("detections").num_rows == 4
    counts = query(storage_root, "SELECT (SELECT count(*) FROM images) AS i, (SELECT count(*) FROM detections) AS d")
    assert counts.to_pylist() == [{"i": 2, "d": 4}]

    # The next run rewrites shard 1 from scratch and commits it: the partial files are replaced.
    store.write_shard(
        "shard-00001", *output_tables("shard-00001", ["c", "d", "e"], run_id="run-2"), {"run_id": "run-2"}
    )
    result = query(storage_root, "SELECT image_id, run_id FROM images ORDER BY image_id").to_pylist()
    assert [r["image_id"] for r in result] == ["a", "b", "c", "d", "e"]
    assert [r["run_id"] for r in result] == ["run-1"] * 2 + ["run-2"] * 3
    assert query(storage_root, "SELECT count(*) AS n FROM detections").to_pylist() == [{"n": 10}]
    record = store.committed_shards()["shard-00001"]
    assert record == {"run_id": "run-2", "shard": "shard-00001", "num_images": 3, "num_detections": 6}


def test_committed_shards_are_never_rewritten(storage_root: str) -> None:
    store = OutputStore(storage_root)
    store.write_shard("shard-00000", *output_tables("shard-00000", ["a"]), {"run_id": "run-1"})
    before = {table: storage.read_bytes(store.file_uri(table, "shard-00000")) for table in ("images", "detections")}

    # A re-run: every shard that is not committed is (re)written, the committed one is left alone
    # (the rule lives in the run's plan and in the worker: write_shard writes what it is given).
    for shard in ("shard-00000", "shard-00001"):
        if not store.is_committed(shard):
            store.write_shard(shard, *output_tables(shard, ["b"], run_id="run-2"), {"run_id": "run-2"})
    for table, data in before.items():
        assert storage.read_bytes(store.file_uri(table, "shard-00000")) == data
    records = store.committed_shards()
    assert records["shard-00000"]["run_id"] == "run-1" and records["shard-00001"]["run_id"] == "run-2"

    # Written anyway, a shard's files and record are replaced whole, never added to.
    store.write_shard("shard-00000", *output_tables("shard-00000", ["z"], run_id="run-3"), {"run_id": "run-3"})
    assert store.read_table("images", ["shard-00000"]).column("image_id").to_pylist() == ["z"]
    assert store.committed_shards()["shard-00000"]["run_id"] == "run-3"


def test_tables_keep_their_schemas_and_the_manifest_round_trips(storage_root: str) -> None:
    store = OutputStore(storage_root)
    assert store.read_manifest() is None
    assert store.read_table("detections").schema.equals(DETECTIONS_SCHEMA)
    images, detections = output_tables("shard-00000", ["a"], boxes_per_image=0)
    # Inputs with wider types (int64 counts, float64 boxes) are stored with the output schemas.
    store.write_shard("shard-00000", images, detections, {"run_id": "run-1"})
    assert store.read_table("images").schema.equals(IMAGES_SCHEMA)
    assert store.read_table("detections").schema.equals(DETECTIONS_SCHEMA)
    assert store.read_table("detections").num_rows == 0
    manifest = {"run_id": "run-1", "shards": {"shard-00000": {"state": "committed"}}, "totals": {"images": 1}}
    store.write_manifest(manifest)
    assert store.read_manifest() == manifest
    with pytest.raises(ValueError, match="unknown output table 'boxes'"):
        store.committed_files("boxes")


def test_a_raw_reader_polling_during_runs_never_sees_half_a_shard(tmp_path, monkeypatch) -> None:
    """A reader that globs ``images/`` and then ``detections/`` (as the README tells raw readers to)
    while a run writes the output, and while ``replace`` clears and rewrites it, finds every shard
    of its ``images/`` listing in its ``detections/`` listing, and every listed file whole. Each
    output write and delete is slowed down, so that a wrong order would be seen."""
    dataset = ingest_synthetic(f"file://{tmp_path}/data", num_images=12, image_size=48, shard_size=2)
    save_checkpoint(build_detector("tiny", 4), tmp_path / "model.pt")
    out = tmp_path / "out"
    for name in ("write_bytes", "delete"):
        original = getattr(storage, name)

        def slowed(uri, *args, _original=original, **kwargs):
            result = _original(uri, *args, **kwargs)
            if "/images" in uri or "/detections" in uri:
                time.sleep(0.05)
            return result

        monkeypatch.setattr(storage, name, slowed)
    stop, problems, sizes = threading.Event(), [], []

    def poll() -> None:
        while not stop.is_set():
            images = {path.stem for path in (out / "images").glob("*.parquet")}
            detections = {path.stem for path in (out / "detections").glob("*.parquet")}
            if not images <= detections:
                problems.append(f"in images/ only: {sorted(images - detections)}")
            for table, names in (("images", images), ("detections", detections)):
                for name in names:
                    try:
                        pq.read_metadata(out / table / f"{name}.parquet")
                    except FileNotFoundError:
                        pass  # removed since the listing (replace): gone whole
            sizes.append(len(images))
            time.sleep(0.002)

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    try:
        for replace in (False, True):
            spec = InferenceSpec(
                dataset.uri, f"file://{out}", str(tmp_path / "model.pt"), executor="local", replace=replace
            )
            assert run_inference(spec).shards_done == 6
    finally:
        stop.set()
        reader.join(timeout=10)
    assert problems == []
    assert {0, 6} <= set(sizes) and len(set(sizes)) >= 4  # it polled through both runs, mid-way too
