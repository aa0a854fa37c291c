"""Nightly incremental runs against a large history: does the cost follow what is new?

For each size (10k, 100k, 1M existing images) the script builds, once, under ``--root``:

- an image prefix in the documented date-partitioned layout (``incoming/YYYY/MM/DD/img-NNNNNNN.png``,
  1,000 files a day; every file is a hard link of one tiny PNG: the listing is real, the bytes are
  not the point);
- the dataset of those images, written by the pipeline's own ``DatasetWriter`` (256 per shard,
  with its known-keys index);
- its outputs, written by ``OutputStore.write_shard`` (3 detections per image, a commit record per
  shard) and claimed for the bench model; one inference run over it records the ledger.

Then it runs the nightly job in a fresh process each time, the steps of ``detect_new_images_flow``
without Prefect (count images, incremental ingest with ``--listing after-last``, pending shards,
inference with the local executor and a tiny model): ``--repeats`` nights with 100 new images in a
new day folder, as many over the unchanged prefix, one unchanged night with a full listing. Per run:
wall time (process start and imports excluded), driver peak RSS (``VmHWM``) and RSS before the run
(after imports), storage operations by kind (GET/PUT/LIST/HEAD/DELETE counted at
``pipeline.storage``; on S3 also the HTTP requests by operation), metadata bytes written
(everything but image shards and output Parquet). Last, the query of the issue over the outputs,
through ``pipeline.query`` and (local disk) with DuckDB reading the files directly. The same on
SeaweedFS S3 for ``--s3-sizes`` (built each time: the server's data lives in a temporary folder).
For comparison, ``before``: the O(history) steps a nightly run took before (every shard's source and
id columns into sets, every commit record read), timed on the same state.

    .venv/bin/python bench/incremental.py [--sizes 10000 100000 1000000] [--s3-sizes 10000 100000]
                                          [--root /tmp/df-incremental] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
from _common import median, write_result  # noqa: E402

from pipeline import storage  # noqa: E402

PER_DAY = 1000
SHARD_SIZE = 256
DETECTIONS_PER_IMAGE = 3
LABELS = ("circle", "square", "triangle")
QUERY = "SELECT label_name, count(*) AS n FROM detections GROUP BY 1"


def day_folder(day: int) -> str:
    return (datetime.date(2020, 1, 1) + datetime.timedelta(days=day)).strftime("%Y/%m/%d")


def image_paths(first: int, count: int) -> list[str]:
    return [f"{day_folder(i // PER_DAY)}/img-{i:07d}.png" for i in range(first, first + count)]


def tiny_png() -> bytes:
    from pipeline.ingest import encode_png

    return encode_png(np.full((3, 8, 8), 128, dtype=np.uint8))


def put_images(prefix: str, relative: list[str]) -> None:
    """The image files: on local disk hard links of one tiny PNG (a fresh copy every 50,000 links:
    ext4 allows 65,000), on S3 objects (16 uploads at a time)."""
    data = tiny_png()
    if storage.protocol_of(prefix) != "file":
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda path: storage.write_bytes(f"{prefix}/{path}", data), relative))
        return
    folder = Path(storage.filesystem(prefix)[1])
    for number, path in enumerate(relative):
        if number % 50_000 == 0:
            origin = folder.parent / f"tiny-{os.urandom(4).hex()}.png"
            origin.write_bytes(data)
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(origin, target)


def paths_of(root: str) -> dict[str, str]:
    return {name: storage.join(root, name) for name in ("incoming", "dataset", "out", "model.pt", "state.json")}


def make_model() -> bytes:
    """A tiny detector with random weights (the same bytes every time)."""
    import io

    import torch

    from detector import build_detector, save_checkpoint

    torch.manual_seed(0)
    model = build_detector("tiny", len(LABELS) + 1, class_names=["__background__", *LABELS], box_score_thresh=0.0)
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    return buffer.getvalue()


def inference_spec(where: dict[str, str]):
    from pipeline.jobs import InferenceSpec

    return InferenceSpec(
        where["dataset"],
        where["out"],
        where["model.pt"],
        executor="local",
        device="cpu",
        workers=1,
        threads_per_worker=1,
    )


def output_tables(shard: str, ids: list[str], run_id: str, model_id: str) -> tuple[pa.Table, pa.Table]:
    n = len(ids)
    images = pa.table(
        {
            "image_id": ids,
            "shard": [shard] * n,
            "width": [8] * n,
            "height": [8] * n,
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "num_detections": [DETECTIONS_PER_IMAGE] * n,
            "run_id": [run_id] * n,
            "model_id": [model_id] * n,
        }
    )
    k = n * DETECTIONS_PER_IMAGE
    labels = np.arange(k, dtype=np.int32) % len(LABELS) + 1
    coords = np.tile(np.array([1.0, 1.0, 6.0, 6.0], dtype=np.float32), (k, 1))
    detections = pa.table(
        {
            "image_id": np.repeat(np.array(ids, dtype=object), DETECTIONS_PER_IMAGE),
            "shard": [shard] * k,
            "label": labels,
            "label_name": [LABELS[label - 1] for label in labels],
            "score": np.linspace(0.1, 0.9, k, dtype=np.float32),
            **{name: coords[:, i] for i, name in enumerate(("x1", "y1", "x2", "y2"))},
            "run_id": [run_id] * k,
            "model_id": [model_id] * k,
        }
    )
    return images, detections


def build_state(root: str, size: int) -> dict:
    """The existing state of ``size`` images under ``root`` (kept between invocations)."""
    from pipeline.dataset import DatasetWriter
    from pipeline.inference import output_identity, run_inference
    from pipeline.outputs import OutputStore
    from pipeline.worker import model_id_of

    where = paths_of(root)
    if storage.exists(where["state.json"]):
        return storage.read_json(where["state.json"])
    started = time.perf_counter()
    storage.write_bytes(where["model.pt"], make_model())
    relative = image_paths(0, size)
    put_images(where["incoming"], relative)
    source = {"kind": "images", "prefix": where["incoming"], "labelled": False, "last_listed": relative[-1]}
    writer = DatasetWriter(where["dataset"], categories=[], source=source, shard_size=SHARD_SIZE)
    image = tiny_png()
    for path in relative:
        writer.add(path, image, f"{where['incoming']}/{path}", width=8, height=8)
    dataset = writer.close()
    spec = inference_spec(where)
    model_id = model_id_of(storage.read_bytes(spec.model_uri))
    store = OutputStore(where["out"])
    store.claim(output_identity(spec, model_id), run_id="bench-build")
    for number, shard in enumerate(dataset.shards):
        ids = relative[number * SHARD_SIZE : (number + 1) * SHARD_SIZE]
        record = {"run_id": "bench-build", "model_id": model_id, "timings": {}, "node": "bench", "worker": "bench"}
        store.write_shard(shard.name, *output_tables(shard.name, ids, "bench-build", model_id), record)
    run_inference(spec)  # everything committed: reads every record once and records the ledger
    state = {"size": size, "next_image": size, "build_s": time.perf_counter() - started}
    storage.write_json(where["state.json"], state)
    return state


# ------------------------------------------------------------------------- the nightly run


def count_requests(counts: Counter) -> None:
    """Wrap ``pipeline.storage``'s operations (and the ranged reads of index probes and column
    reads) to count requests by kind and metadata bytes written."""
    from pipeline import dataset, index

    kinds = {
        "read_bytes": "GET",
        "read_bytes_with_version": "GET",
        "version_of": "GET",
        "write_bytes": "PUT",
        "write_bytes_if_absent": "PUT",
        "replace_bytes_if_version": "PUT",
        "list_files": "LIST",
        "exists": "HEAD",
        "delete": "DELETE",
        "delete_if_version": "DELETE",
    }

    def wrap(module, name: str, kind: str):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            counts[kind] += 1
            if kind == "PUT":
                uri, data = args[0], args[1]
                bulk = any(part in uri for part in ("/shards/", "/detections/", "/images/"))
                counts["bytes_written_data" if bulk else "bytes_written_metadata"] += len(data)
            return original(*args, **kwargs)

        setattr(module, name, counted)

    for name, kind in kinds.items():
        wrap(storage, name, kind)
    wrap(index, "_probe_run", "GET")
    wrap(dataset, "_read_columns", "GET")


def count_s3_requests(counts: Counter) -> None:
    """Count the HTTP requests of every S3 client s3fs makes, by operation (``s3:ListObjectsV2``…)."""
    import s3fs

    original = s3fs.S3FileSystem.set_session

    async def set_session(self, *args, **kwargs):
        client = await original(self, *args, **kwargs)
        if not getattr(client, "_bench_counted", False):
            client.meta.events.register("before-call.s3", lambda model, **_: counts.update([f"s3:{model.name}"]))
            client._bench_counted = True
        return client

    s3fs.S3FileSystem.set_session = set_session


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``: of its own address space; ``ru_maxrss`` would
    carry the parent's over ``fork``/``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def nightly(root: str, listing: str) -> dict:
    """The steps of ``detect_new_images_flow`` (without Prefect), counted and timed."""
    from pipeline.dataset import open_dataset
    from pipeline.inference import check_output, run_inference
    from pipeline.ingest import ingest
    from pipeline.jobs import DetectNewSpec
    from pipeline.outputs import OutputStore

    where = paths_of(root)
    spec = DetectNewSpec(where["incoming"], inference_spec(where), shard_size=SHARD_SIZE, listing=listing)
    counts: Counter = Counter()
    count_requests(counts)
    count_s3_requests(counts)
    rss_start = psutil.Process().memory_info().rss
    started = time.perf_counter()
    before = open_dataset(spec.inference.data_uri).num_images  # count-images
    ingested = ingest(spec.ingest())  # ingest (only new)
    ingest_s = time.perf_counter() - started
    storage.ensure_bucket(spec.inference.out_uri)  # pending-shards
    names = [shard.name for shard in open_dataset(spec.inference.data_uri).shards]
    pending = OutputStore(spec.inference.out_uri).plan(names).pending
    processed = 0
    if pending:
        processed = run_inference(spec.inference).images  # infer
    else:
        check_output(spec.inference)
    return {
        "listing": listing,
        "existing_images": before,
        "new_images": ingested.num_images - before,
        "images_processed": processed,
        "wall_s": time.perf_counter() - started,
        "ingest_s": ingest_s,
        "rss_start_mb": rss_start / 1e6,
        "load_average_1m": os.getloadavg()[0],  # the machine is shared: other work competes for its 2 cores
        "peak_rss_mb": peak_rss() / 1e6,
        "requests": {k: v for k, v in sorted(counts.items()) if not k.startswith("bytes")},
        "metadata_bytes_written": counts["bytes_written_metadata"],
        "data_bytes_written": counts["bytes_written_data"],
    }


def before(root: str) -> dict:
    """The three O(history) steps of a nightly run before incremental bookkeeping, timed with the
    functions that remain: every shard's ``source`` and ``image_id`` column into Python sets (what
    ``--only-new`` and the appending writer did), every commit record read (the final manifest)."""
    from pipeline.dataset import known_column, open_dataset
    from pipeline.outputs import OutputStore

    where = paths_of(root)
    dataset = open_dataset(where["dataset"])
    rss_start = psutil.Process().memory_info().rss
    started = time.perf_counter()
    sources, ids = known_column(dataset, "source"), known_column(dataset, "image_id")
    sets_s = time.perf_counter() - started
    rss_sets = psutil.Process().memory_info().rss - rss_start
    started = time.perf_counter()
    records = OutputStore(where["out"]).committed_shards()
    return {
        "known_sources_and_ids_s": sets_s,
        "sets_rss_mb": rss_sets / 1e6,
        "values": len(sources) + len(ids),
        "read_every_commit_record_s": time.perf_counter() - started,
        "commit_records": len(records),
        "load_average_1m": os.getloadavg()[0],
    }


def run_nightly(root: str, listing: str) -> dict:
    """:func:`nightly` in a fresh process (an honest peak RSS)."""
    command = [sys.executable, __file__, "--nightly", root, "--listing", listing]  # listing "before": the old steps
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nightly run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_new_images(root: str, count: int) -> None:
    where = paths_of(root)
    state = storage.read_json(where["state.json"])
    first = ((state["next_image"] + PER_DAY - 1) // PER_DAY) * PER_DAY  # a new day folder
    put_images(where["incoming"], image_paths(first, count))
    storage.write_json(where["state.json"], {**state, "next_image": first + count})


# ---------------------------------------------------------------------------------- query


def listing_times(root: str) -> dict:
    """The prefix listed alone: after the last path listed, and in full."""
    from pipeline.dataset import open_dataset

    where = paths_of(root)
    last = open_dataset(where["dataset"]).source["last_listed"]
    started = time.perf_counter()
    after = storage.list_files(where["incoming"], recursive=True, after=last)
    after_s = time.perf_counter() - started
    started = time.perf_counter()
    everything = storage.list_files(where["incoming"], recursive=True)
    return {
        "after_last_s": after_s,
        "after_last_files": len(after),
        "full_s": time.perf_counter() - started,
        "full_files": len(everything),
    }


def query_times(root: str, repeats: int = 3) -> dict:
    """The query through ``pipeline.query`` and (local disk) DuckDB reading the files directly."""
    import duckdb

    from pipeline.query import query

    out = paths_of(root)["out"]
    ours, direct = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        counted = {row["label_name"]: row["n"] for row in query(out, QUERY).to_pylist()}
        ours.append(time.perf_counter() - started)
        if storage.protocol_of(out) == "file":
            files = storage.filesystem(storage.join(out, "detections"))[1] + "/*.parquet"
            started = time.perf_counter()
            duckdb.sql(f"SELECT label_name, count(*) FROM read_parquet('{files}') GROUP BY 1").fetchall()
            direct.append(time.perf_counter() - started)
    times = {"pipeline_query_s": median(ours), "rows": sum(counted.values())}
    return {**times, "duckdb_direct_s": median(direct)} if direct else times


def measure(root: str, size: int, new: int, full_listing: bool, repeats: int) -> dict:
    """``repeats`` nights with ``new`` images, then ``repeats`` over the unchanged prefix (medians
    and every run recorded), a full listing once, the query."""
    state = build_state(root, size)
    entry: dict = {"existing": size, "build_s": state["build_s"], "new_runs": [], "unchanged_runs": []}
    for _ in range(repeats):
        add_new_images(root, new)
        entry["new_runs"].append(run_nightly(root, "after-last"))
    for _ in range(repeats):
        entry["unchanged_runs"].append(run_nightly(root, "after-last"))
    for kind in ("new", "unchanged"):
        runs = entry[f"{kind}_runs"]
        entry[kind] = {
            "wall_s": median([run["wall_s"] for run in runs]),
            "peak_rss_mb": median([run["peak_rss_mb"] for run in runs]),
            "peak_over_start_mb": median([run["peak_rss_mb"] - run["rss_start_mb"] for run in runs]),
        }
    if full_listing:
        entry["unchanged_full_listing"] = run_nightly(root, "full")
        entry["before"] = run_nightly(root, "before")
    entry["listing"] = listing_times(root)
    entry["query"] = query_times(root)
    print(json.dumps(entry), flush=True)
    return entry


def targets(local: list[dict]) -> dict:
    """The issue's targets, from the local-disk figures at 100k and 1M existing images."""
    by_size = {entry["existing"]: entry for entry in local}
    if not {100_000, 1_000_000} <= set(by_size):
        return {}
    small, large = by_size[100_000], by_size[1_000_000]
    query = large["query"]
    return {
        "wall_1m_over_100k": large["new"]["wall_s"] / small["new"]["wall_s"],
        "peak_rss_1m_over_100k": large["new"]["peak_rss_mb"] / small["new"]["peak_rss_mb"],
        "peak_over_start_1m_over_100k": large["new"]["peak_over_start_mb"] / small["new"]["peak_over_start_mb"],
        "unchanged_1m_s": large["unchanged"]["wall_s"],
        "query_1m_over_direct": query["pipeline_query_s"] / query["duckdb_direct_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--s3-sizes", type=int, nargs="*", default=[], help="on SeaweedFS S3 (built each time)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/df-incremental"))
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--result", default="incremental", help="name of the result file in bench/results/")
    parser.add_argument("--full-listing-up-to", type=int, default=1_000_000)
    parser.add_argument("--nightly", help=argparse.SUPPRESS)
    parser.add_argument("--listing", default="after-last", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nightly is not None:
        print(json.dumps(before(args.nightly) if args.listing == "before" else nightly(args.nightly, args.listing)))
        return
    repeats = args.repeats
    local = [
        measure(
            storage.normalize(args.root / f"n{size}"), size, args.new, size <= args.full_listing_up_to, args.repeats
        )
        for size in args.sizes
    ]
    s3 = []
    if args.s3_sizes:
        from tests.seaweed import SeaweedS3

        with SeaweedS3(tempfile.mkdtemp(prefix="df-incremental-s3-")) as server:
            server.apply_env()
            for size in args.s3_sizes:
                s3.append(measure(f"{server.new_bucket('incremental')}/n{size}", size, args.new, True, repeats))
    result = {"new_images_per_night": args.new, "repeats": args.repeats, "local_disk": local, "seaweedfs_s3": s3}
    write_result(args.result, {**result, "targets": targets(local)})


if __name__ == "__main__":
    main()
