"""Outputs of an inference run, and the commit protocol that makes them exactly once per shard.

Layout at ``OUT_URI/``::

    detections/<shard>.parquet   one row per box:   image_id, shard, label, label_name, score,
                                                    x1, y1, x2, y2 (pixels of the displayed image),
                                                    run_id, model_id
    images/<shard>.parquet       one row per input image: image_id, shard, width, height,
                                                    status ("ok" | "error"), error (null when ok),
                                                    num_detections, run_id, model_id
    _commits/<shard>.json        the commit record of a shard: counts, run and model ids, timings,
                                 where it was done (node, worker)
    _manifest.json               the run: ids, settings, versions, per-shard state, totals, timings

Commit protocol:

1. A worker writes ``images/<shard>.parquet`` and ``detections/<shard>.parquet`` (each atomically;
   the names are deterministic, so a rewrite replaces, never adds), *then* ``_commits/<shard>.json``.
2. A shard is committed iff its commit record exists. Readers (``query``, ``evaluate``) read the
   files of committed shards only, so a half-written shard is invisible.
3. A run skips committed shards and (re)writes the others from scratch, overwriting any partial
   files. Each image therefore appears exactly once in ``images`` whatever happened before: killed
   workers, killed drivers, storage outages, re-runs.
4. A committed shard is never rewritten: a run leaves it out of its plan, and the worker checks
   again right before it starts a shard (``ShardWorker.process``). ``write_shard`` itself always
   writes: the shards it is given are the uncommitted ones.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .storage import StorageOptions

DETECTIONS = "detections"
IMAGES = "images"
COMMITS = "_commits"
MANIFEST = "_manifest.json"

DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("x1", pa.float32(), nullable=False),
        pa.field("y1", pa.float32(), nullable=False),
        pa.field("x2", pa.float32(), nullable=False),
        pa.field("y2", pa.float32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("num_detections", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)
SCHEMAS = {DETECTIONS: DETECTIONS_SCHEMA, IMAGES: IMAGES_SCHEMA}


def to_parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a zstd-compressed Parquet file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class OutputStore:
    """The outputs at ``out_uri`` and their commit protocol (see the module docstring)."""

    def __init__(self, out_uri: str, storage_options: StorageOptions | None = None):
        self.uri = storage.normalize(out_uri)
        self.storage_options = storage_options

    def file_uri(self, table: str, shard: str) -> str:
        """``OUT_URI/<table>/<shard>.parquet`` (deterministic: a rewrite replaces, never adds)."""
        return storage.join(self.uri, table, f"{shard}.parquet")

    def commit_uri(self, shard: str) -> str:
        """``OUT_URI/_commits/<shard>.json``: its presence is what makes the shard committed."""
        return storage.join(self.uri, COMMITS, f"{shard}.json")

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, MANIFEST)

    def committed_names(self) -> set[str]:
        """Names of the committed shards (one listing request)."""
        records = storage.list_files(storage.join(self.uri, COMMITS), self.storage_options, suffixes=(".json",))
        return {storage.basename(uri)[: -len(".json")] for uri in records}

    def committed_shards(self) -> dict[str, dict[str, Any]]:
        """Commit records of the committed shards, by shard name."""
        names = sorted(self.committed_names())
        with ThreadPoolExecutor(max_workers=8) as pool:
            records = pool.map(lambda n: storage.read_json(self.commit_uri(n), self.storage_options), names)
            return dict(zip(names, records))

    def is_committed(self, shard: str) -> bool:
        """Whether ``shard``'s commit record exists."""
        return storage.exists(self.commit_uri(shard), self.storage_options)

    def write_shard(self, shard: str, images: pa.Table, detections: pa.Table, record: dict[str, Any]) -> None:
        """Write a shard's two files (replacing any partial ones), then commit it with ``record``
        plus the shard's name and row counts."""
        images = images.cast(IMAGES_SCHEMA)
        detections = detections.cast(DETECTIONS_SCHEMA)
        storage.write_bytes(self.file_uri(IMAGES, shard), to_parquet_bytes(images), self.storage_options)
        storage.write_bytes(self.file_uri(DETECTIONS, shard), to_parquet_bytes(detections), self.storage_options)
        commit = {**record, "shard": shard, "num_images": images.num_rows, "num_detections": detections.num_rows}
        storage.write_json(self.commit_uri(shard), commit, self.storage_options)

    def committed_files(self, table: str) -> list[str]:
        """URIs of ``table``'s files (``"detections"`` or ``"images"``) of the committed shards."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown output table {table!r}; expected one of {sorted(SCHEMAS)}")
        return [self.file_uri(table, shard) for shard in sorted(self.committed_names())]

    def read_table(self, table: str, shards: Iterable[str] | None = None) -> pa.Table:
        """A table over the committed shards (or the given ones) only."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown output table {table!r}; expected one of {sorted(SCHEMAS)}")
        names = sorted(self.committed_names() if shards is None else shards)
        if not names:
            return SCHEMAS[table].empty_table()

        def read(shard: str) -> pa.Table:
            data = storage.read_bytes(self.file_uri(table, shard), self.storage_options)
            return pq.read_table(io.BytesIO(data)).cast(SCHEMAS[table])

        with ThreadPoolExecutor(max_workers=8) as pool:
            return pa.concat_tables(pool.map(read, names))

    def read_manifest(self) -> dict[str, Any] | None:
        """The run manifest, or None before any run wrote one."""
        if not storage.exists(self.manifest_uri, self.storage_options):
            return None
        return storage.read_json(self.manifest_uri, self.storage_options)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the run manifest (atomically)."""
        storage.write_json(self.manifest_uri, manifest, self.storage_options)
