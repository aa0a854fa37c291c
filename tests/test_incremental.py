"""Incremental bookkeeping: the known-keys index, the dataset's append log and its compaction,
listings after the last path seen, and the output ledger that plans a run without reading every
commit record. Small sizes only; bench/incremental.py measures the large ones."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from detector import build_detector, save_checkpoint
from pipeline import dataset as dataset_module
from pipeline import index, storage
from pipeline.dataset import DatasetWriter, compact, descriptor_uri, open_dataset, read_descriptor, read_shard
from pipeline.inference import run_inference
from pipeline.ingest import ingest_images
from pipeline.jobs import InferenceSpec
from pipeline.outputs import Ledger, OutputStore
from tests.test_outputs import output_tables


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (value, 10, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(root, paths: list[str]) -> None:
    for number, path in enumerate(paths):
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_png(number % 250))


def test_index_probes_runs_and_merges_size_tiered(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(index, "ROW_GROUP_ROWS", 100)
    folder = storage.normalize(tmp_path / "idx")
    big = index.write_run(folder, index.sorted_keys(f"k{i:05d}" for i in range(0, 2000, 2)), None)
    small = index.write_run(folder, index.sorted_keys(["k00001", "zz", None, "zz"]), None)
    assert (big.num_keys, small.num_keys) == (1000, 2), "distinct, non-null"
    candidates = ["k00000", "k00001", "k00003", "k01998", "nope", "zz"]
    assert index.probe(folder, [big, small], candidates) == {"k00000", "k00001", "k01998", "zz"}
    assert index.probe(folder, [big], []) == set()

    def run(keys: int) -> index.Run:
        return index.Run("x", keys)

    assert index.plan_merge([run(1000), run(100)]) == 0, "a big old run is left alone"
    assert index.plan_merge([run(1000), run(100), run(100)]) == 2
    assert index.plan_merge([run(1000), run(300), run(100)]) == 3, "the newer ones come near its size"
    merged = index.merge(folder, [big, small])
    assert merged.num_keys == 1002 and index.read_run(folder, merged).to_pylist()[:2] == ["k00000", "k00001"]


def test_appends_are_logged_compacted_and_read_back(tmp_path, monkeypatch) -> None:
    """Appends create log entries and leave dataset.json alone; the compaction folds them in and
    keeps only the newest entry; a reader of the old descriptor notices and reads again."""
    monkeypatch.setattr(dataset_module, "COMPACT_EVERY", 3)
    uri = storage.normalize(tmp_path / "d")
    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2)
    writer.add("a0", b"x", "file:///src/a0.jpg")
    writer.close()
    base = storage.read_bytes(descriptor_uri(uri))
    for night in (1, 2):
        writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
        assert not writer.add("a0", b"dup", "file:///src/other.jpg"), "an id already in the dataset"
        writer.add(f"a{night}", b"x", f"file:///src/a{night}.jpg")
        dataset = writer.close()
    assert storage.read_bytes(descriptor_uri(uri)) == base, "appends leave dataset.json as it was"
    assert (dataset.log_base, dataset.log_next, dataset.num_images) == (0, 2, 3)
    assert dataset.counts["rejected"] == 2 and len(dataset.index["source"]) == 3
    stale, _ = read_descriptor(uri)

    writer = DatasetWriter(uri, categories=[], source={"kind": "images"}, shard_size=2, append=True)
    writer.add("a3", b"x", "file:///src/a3.jpg")
    dataset = writer.close()  # the third entry: compacted
    assert (dataset.log_base, dataset.log_next, dataset.num_images) == (3, 3, 4)
    assert len(dataset.index["source"]) == 1 and dataset.index["source"][0].num_keys == 4, "runs merged"
    assert [storage.basename(u) for u in storage.list_files(storage.join(uri, "_log"))] == ["append-0000000002.json"]
    assert dataset_module._read_log(uri, stale.log_base, None) is None, "an old descriptor's reader reads again"
    ids = sorted(i for s in dataset.shards for i in read_shard(s.uri, ["image_id"]).column(0).to_pylist())
    assert ids == ["a0", "a1", "a2", "a3"] and open_dataset(uri).counts == dataset.counts
    assert not compact(uri), "nothing left to fold"


@pytest.mark.parametrize("storage_root", ["file", "memory", "s3"], indirect=True)
def test_listing_after_the_last_path(storage_root: str) -> None:
    """Only paths sorting after the given one; on local disk whole older folders are skipped, on S3
    with StartAfter, elsewhere by filtering."""
    prefix = storage.join(storage_root, "in")
    for path in ("2026/11/29/a.png", "2026/11/29/zz.png", "2026/11/30/a.png", "2026/11/30/b.png", "2026/12/01/a.png"):
        storage.write_bytes(f"{prefix}/{path}", b"x")
    after = storage.list_files(prefix, recursive=True, after="2026/11/30/a.png")
    assert after == [f"{prefix}/2026/11/30/b.png", f"{prefix}/2026/12/01/a.png"]
    assert storage.list_files(prefix, recursive=True, after="2026/12/01/a.png") == []
    assert storage.list_files(storage.join(storage_root, "missing"), recursive=True, after="a") == []


def test_detect_new_after_last_adds_only_later_paths_and_full_catches_stragglers(tmp_path) -> None:
    _images(tmp_path / "in", ["2026/11/29/a.png", "2026/11/29/b.png"])
    prefix, out = storage.normalize(tmp_path / "in"), storage.normalize(tmp_path / "ds")
    first = ingest_images(prefix, out, shard_size=2, only_new=True, listing="after-last")
    assert first.num_images == 2 and first.source["last_listed"] == "2026/11/29/b.png"
    _images(tmp_path / "in", ["2026/11/30/c.png", "2026/11/29/0-late.png"])
    second = ingest_images(prefix, out, shard_size=2, only_new=True, listing="after-last")
    assert second.num_images == 3 and second.source["last_listed"] == "2026/11/30/c.png", "the late file is not seen"
    assert ingest_images(prefix, out, shard_size=2, only_new=True, listing="after-last").num_images == 3
    full = ingest_images(prefix, out, shard_size=2, only_new=True, listing="full")
    ids = sorted(i for s in full.shards for i in read_shard(s.uri, ["image_id"]).column(0).to_pylist())
    assert ids == ["2026/11/29/0-late.png", "2026/11/29/a.png", "2026/11/29/b.png", "2026/11/30/c.png"]
    with pytest.raises(ValueError, match="listing must be"):
        ingest_images(prefix, out, only_new=True, listing="newest")


def test_plan_reads_only_records_the_ledger_lacks(tmp_path, monkeypatch) -> None:
    store = OutputStore(str(tmp_path / "out"))
    names = [f"shard-{i:05d}" for i in range(6)]
    for name in names[:3]:
        store.write_shard(name, *output_tables(name, [f"{name}/a", f"{name}/b"]), {"run_id": "r1"})
    plan = store.plan(names)  # no manifest: every record read, once
    assert plan.pending == names[3:] and plan.ledger.ranges == [[0, 2]] and plan.previous is None
    assert plan.ledger.totals == {"shards_committed": 3, "images": 6, "detections": 12, "errors": 0}
    store.write_manifest({"run_id": "r1", "state": "finished", "ledger": plan.ledger.to_json()})
    assert storage.exists(storage.join(store.uri, "_runs", "r1.json")), "the final manifest is kept"
    store.write_shard(names[4], *output_tables(names[4], ["x"]), {"run_id": "dead"})  # its run never finished

    reads: list[str] = []
    read_json = storage.read_json
    monkeypatch.setattr(storage, "read_json", lambda uri, options=None: reads.append(uri) or read_json(uri, options))
    plan = store.plan(names)
    assert [storage.basename(uri) for uri in reads] == ["_manifest.json", "shard-00004.json"], "no other record read"
    assert plan.pending == ["shard-00003", "shard-00005"] and plan.previous == "_runs/r1.json"
    assert plan.ledger.ranges == [[0, 2], [4, 4]] and plan.ledger.totals["images"] == 7
    assert "shard-00004" in plan.ledger and "shard-00003" not in plan.ledger

    storage.delete(store.commit_uri(names[0]))  # deleted by hand: to be redone
    plan = store.plan(names)
    assert plan.pending == ["shard-00000", "shard-00003", "shard-00005"]
    assert plan.ledger.ranges == [[1, 2], [4, 4]] and plan.ledger.totals["shards_committed"] == 3
    ledger = Ledger()
    ledger.add("odd-name", {"num_images": 2})
    assert "odd-name" in ledger and Ledger.from_json(ledger.to_json()).totals["images"] == 2


def test_a_nightly_run_records_its_shards_and_points_to_the_previous_run(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_detector("tiny", 3, class_names=["__background__", "a", "b"], box_score_thresh=0.0)
    save_checkpoint(model, tmp_path / "model.pt")
    _images(tmp_path / "in", ["d1/a.png", "d1/b.png"])
    prefix, data, out = (storage.normalize(tmp_path / name) for name in ("in", "ds", "out"))
    spec = InferenceSpec(data, out, str(tmp_path / "model.pt"), executor="local", device="cpu", workers=1)
    ingest_images(prefix, data, shard_size=2, only_new=True)
    first = run_inference(spec)
    _images(tmp_path / "in", ["d2/c.png"])
    ingest_images(prefix, data, shard_size=2, only_new=True, listing="after-last")
    second = run_inference(spec)

    manifest = OutputStore(out).read_manifest()
    assert second.shards_done == 1 and second.shards_skipped == 1
    assert list(manifest["shards"]) == ["shard-00001"], "this run's shards only"
    assert manifest["previous"] == f"_runs/{first.run_id}.json"
    assert manifest["ledger"]["ranges"] == [[0, 1]] and manifest["totals"]["images"] == 3
    assert storage.read_json(f"{out}/_runs/{second.run_id}.json") == manifest
