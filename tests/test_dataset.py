"""The image-shard dataset: descriptor, shards, streaming reads, appends and replacement, on
file://, memory:// and the real S3 server."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import dataset as dataset_module
from pipeline import storage
from pipeline.dataset import (
    SHARD_SCHEMA,
    DatasetWriter,
    gt_targets,
    iter_shard_batches,
    known_sources,
    open_dataset,
    read_shard,
    row_group_bounds,
)
from pipeline.ingest import ingest_synthetic


def _parquet_metadata(uri: str) -> pq.FileMetaData:
    return pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri))).metadata


def test_synthetic_dataset_is_deterministic_and_split_into_shards(storage_root: str) -> None:
    first = ingest_synthetic(storage.join(storage_root, "a"), num_images=23, seed=3, image_size=64, shard_size=10)
    second = ingest_synthetic(storage.join(storage_root, "b"), num_images=23, seed=3, image_size=64, shard_size=10)
    other_seed = ingest_synthetic(storage.join(storage_root, "c"), num_images=10, seed=4, image_size=64, shard_size=10)
    assert [s.num_images for s in first.shards] == [10, 10, 3]
    assert first.num_images == 23 and first.has_labels
    assert first.class_names[0] == "__background__" and first.num_classes == len(first.categories) + 1
    for a, b in zip(first.shards, second.shards):
        assert storage.read_bytes(a.uri) == storage.read_bytes(b.uri)
    assert storage.read_bytes(first.shards[0].uri) != storage.read_bytes(other_seed.shards[0].uri)

    reopened = open_dataset(storage.join(storage_root, "a"))
    assert [s.name for s in reopened.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [s.num_bytes for s in reopened.shards] == [storage.size(s.uri) for s in first.shards]
    table = read_shard(reopened.shards[2].uri)
    assert table.schema.equals(SHARD_SCHEMA)
    assert table.column("image_id").to_pylist() == [f"synth-3-{i:07d}" for i in range(20, 23)]
    assert table.column("image")[0].as_py().startswith(b"\x89PNG")
    boxes, labels, crowd = gt_targets(table)[0]
    assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4) and len(labels) > 0
    assert labels.dtype == np.int64 and labels.min() >= 1 and labels.max() < reopened.num_classes
    assert crowd.dtype == bool and not crowd.any()
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 64


def test_column_reads_and_streaming_batches(storage_root: str) -> None:
    dataset = ingest_synthetic(storage.join(storage_root, "d"), num_images=70, image_size=32, shard_size=70)
    uri = dataset.shards[0].uri
    metadata = _parquet_metadata(uri)
    assert metadata.num_row_groups == 3  # 32 + 32 + 6 images
    image_column = SHARD_SCHEMA.get_field_index("image")
    assert metadata.row_group(0).column(image_column).compression == "UNCOMPRESSED"
    assert metadata.row_group(0).column(SHARD_SCHEMA.get_field_index("gt_boxes")).compression == "ZSTD"

    ids = read_shard(uri, ["image_id", "gt_labels"])
    assert ids.column_names == ["image_id", "gt_labels"] and ids.num_rows == 70
    batches = list(iter_shard_batches(uri, batch_size=16, columns=["image_id", "image"]))
    assert [b.num_rows for b in batches] == [16, 16, 16, 16, 6]
    assert [i for b in batches for i in b.column("image_id").to_pylist()] == ids.column("image_id").to_pylist()


def test_row_groups_are_bounded_by_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert row_group_bounds([1] * 70) == [(0, 32), (32, 64), (64, 70)]
    assert row_group_bounds([]) == []
    monkeypatch.setattr(dataset_module, "ROW_GROUP_MAX_BYTES", 100)
    # 60+60 > 100 splits; a single image larger than the cap gets a group of its own.
    assert row_group_bounds([60, 30, 60, 150, 10, 10]) == [(0, 2), (2, 3), (3, 4), (4, 6)]

    writer = DatasetWriter("memory://detectflow-test-rowgroups", categories=[], source={}, shard_size=8)
    for index in range(8):
        writer.add(f"i{index}", bytes(60), None)
    dataset = writer.close()
    try:
        assert _parquet_metadata(dataset.shards[0].uri).num_row_groups == 8
        assert read_shard(dataset.shards[0].uri).column("image_id").to_pylist() == [f"i{i}" for i in range(8)]
    finally:
        storage.delete("memory://detectflow-test-rowgroups")


def test_missing_or_invalid_dataset_is_a_clear_error(storage_root: str) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset at .*nothing-here"):
        open_dataset(storage.join(storage_root, "nothing-here"))
    storage.write_bytes(storage.join(storage_root, "broken", "dataset.json"), b"{not json")
    with pytest.raises(ValueError, match="broken/dataset.json is not valid JSON"):
        open_dataset(storage.join(storage_root, "broken"))
    storage.write_json(storage.join(storage_root, "other", "dataset.json"), {"format": "something/else"})
    with pytest.raises(ValueError, match="is not a detectflow.dataset/1 descriptor"):
        open_dataset(storage.join(storage_root, "other"))
    storage.write_bytes(storage.join(storage_root, "bad.parquet"), b"PAR1 this is not parquet")
    for columns in (None, ["image_id"]):
        with pytest.raises(ValueError, match="bad.parquet is not a readable Parquet file"):
            read_shard(storage.join(storage_root, "bad.parquet"), columns)


def test_append_continues_numbering_and_rejects_duplicate_ids(storage_root: str) -> None:
    uri = storage.join(storage_root, "d")
    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2)
    for index in range(3):
        writer.add(f"img{index}", b"x", f"file:///src/img{index}.jpg")
    assert not writer.add("img0", b"again", "file:///src/copy-of-img0.jpg")
    writer.skip("notes.txt")
    first = writer.close()
    assert first.num_images == 3 and first.counts["rejected"] == 1 and first.skipped == ["notes.txt"]

    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
    assert not writer.add("img1", b"y", "file:///src/other.jpg")  # already in the dataset
    assert writer.add("img9", b"z", "file:///src/img9.jpg")
    dataset = writer.close()
    assert [s.name for s in dataset.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert dataset.num_images == 4 and dataset.counts["rows"] == 4
    assert dataset.rejected == [
        {"input": "file:///src/copy-of-img0.jpg", "reason": "duplicate image_id 'img0'"},
        {"input": "file:///src/other.jpg", "reason": "duplicate image_id 'img1'"},
    ]
    assert dataset.skipped == ["notes.txt"], "an append keeps what the descriptor listed"
    assert known_sources(dataset) == {f"file:///src/img{i}.jpg" for i in (0, 1, 2, 9)}
    assert read_shard(dataset.shards[0].uri).column("image").to_pylist() == [b"x", b"x"], "old shards untouched"

    with pytest.raises(ValueError, match="its categories differ"):
        DatasetWriter(uri, categories=[{"label": 1, "name": "cat", "source_id": 1}], source={}, append=True)


def test_writing_over_a_dataset_replaces_it(storage_root: str) -> None:
    uri = storage.join(storage_root, "d")
    ingest_synthetic(uri, num_images=5, image_size=32, shard_size=2)
    assert len(storage.list_files(storage.join(uri, "shards"))) == 3
    smaller = ingest_synthetic(uri, num_images=2, seed=1, image_size=32, shard_size=2)
    assert [s.name for s in smaller.shards] == ["shard-00000"]
    assert storage.list_files(storage.join(uri, "shards")) == [smaller.shards[0].uri]
    assert read_shard(smaller.shards[0].uri).column("image_id").to_pylist() == ["synth-1-0000000", "synth-1-0000001"]


def test_writer_holds_at_most_one_shard(tmp_path) -> None:
    writer = DatasetWriter(str(tmp_path / "d"), categories=[], source={}, shard_size=4)
    for index in range(10):
        writer.add(f"i{index}", bytes(10), None)
        assert len(writer._rows) < 4
        assert len(writer.shards) == (index + 1) // 4
    assert writer.close().num_images == 10
    with pytest.raises(ValueError, match="shard size must be ≥ 1"):
        DatasetWriter(str(tmp_path / "e"), categories=[], source={}, shard_size=0)


def test_concurrent_appends_without_a_lease_keep_every_row_once(storage_root: str) -> None:
    """Two appending writers that both read the same descriptor: their shards get distinct names,
    and the second to close merges into the first's descriptor instead of overwriting it; a row the
    first added meanwhile (same source) is not added twice, another image under a taken id is
    rejected."""
    uri = storage.join(storage_root, "d")
    base = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2)
    for index in range(4):
        base.add(f"b{index}", b"b", f"file:///src/b{index}.jpg")
    base.close()
    first = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
    second = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
    for index in range(5):  # interleaved: both write shards at once
        first.add(f"a{index}", b"a", f"file:///src/a{index}.jpg")
        second.add(f"c{index}", b"c", f"file:///src/c{index}.jpg")
    first.add("same", b"s", "file:///src/same.jpg")
    second.add("same", b"s", "file:///src/same.jpg")  # the same image, added by both
    second.add("a0", b"other", "file:///elsewhere/a0.jpg")  # another image under a taken id
    assert first.close().num_images == 10
    dataset = second.close()

    ids = [i for shard in dataset.shards for i in read_shard(shard.uri, ["image_id"]).column(0).to_pylist()]
    expected = {f"{p}{i}" for p, n in (("b", 4), ("a", 5), ("c", 5)) for i in range(n)} | {"same"}
    assert len(ids) == len(set(ids)) == dataset.num_images == dataset.counts["rows"] == len(expected)
    assert set(ids) == expected
    names = [shard.name for shard in dataset.shards]
    assert len(set(names)) == len(names) and names[:2] == ["shard-00000", "shard-00001"]
    assert dataset.rejected == [
        {"input": "file:///elsewhere/a0.jpg", "reason": "duplicate image_id 'a0' (added by another writer meanwhile)"}
    ]
    assert dataset.counts["rejected"] == 1
    listed = {shard.uri for shard in dataset.shards}
    assert set(storage.list_files(storage.join(uri, "shards"))) == listed, "no unlisted shard files left"
    assert read_shard(dataset.shards[0].uri).column("image").to_pylist() == [b"b", b"b"], "old shards untouched"


def test_replacing_a_dataset_that_changed_meanwhile_fails(tmp_path) -> None:
    uri = str(tmp_path / "d")
    ingest_synthetic(uri, num_images=2, image_size=32, shard_size=2)
    replacing = DatasetWriter(uri, categories=[], source={}, shard_size=2)
    appending = DatasetWriter(uri, categories=open_dataset(uri).categories, source={}, shard_size=2, append=True)
    appending.add("new", b"n", None)
    appending.close()
    appended = storage.read_bytes(storage.join(uri, "dataset.json"))
    replacing.add("x", b"x", None)
    with pytest.raises(ValueError, match="was changed by another writer while this one replaced the dataset"):
        replacing.close()
    assert storage.read_bytes(storage.join(uri, "dataset.json")) == appended, "the newer descriptor stays"
