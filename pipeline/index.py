"""Sorted key indexes: the values a dataset already holds (its ``source`` URIs, its ``image_id`` s),
kept as sorted Parquet files that are probed, never loaded whole.

An index is a list of *runs* (files), oldest first, each a one-column Parquet file (``key``,
string) sorted ascending and written in row groups of ``ROW_GROUP_ROWS`` keys. A probe for some
candidate keys reads each run's footer (its row groups' min/max statistics), then only the row
groups whose range holds a candidate: for 100 new keys against 1M known ones that is a few footers
and a few row groups, not the whole index.

Runs grow by one per append (a few keys each) and are merged size-tiered (:func:`plan_merge`): the
newest runs are merged while the merged run is not much smaller than the next older one, so a key
is rewritten O(log n) times over the life of the dataset and an index of n keys has O(log n) runs.

Files are named by a random token (``<token>.parquet``): a writer that loses a race leaves an
unlisted file, never a half-overwritten one; who lists which runs is the dataset descriptor's and
its append log's business (``pipeline.dataset``).
"""

from __future__ import annotations

import bisect
import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .storage import StorageOptions

ROW_GROUP_ROWS = 8192
# A run is merged into the newer ones when it holds at most this many times their keys.
MERGE_RATIO = 4
SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False)])


@dataclass(frozen=True)
class Run:
    """One sorted file of an index: its name (relative to the index folder) and key count."""

    name: str
    num_keys: int

    def to_json(self) -> list:
        return [self.name, self.num_keys]

    @classmethod
    def from_json(cls, value: Sequence) -> Run:
        return cls(str(value[0]), int(value[1]))


def sorted_keys(values: Iterable[str | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Distinct non-null, non-empty ``values`` as a sorted Arrow string array (an Arrow array is
    filtered as a whole, without a Python loop)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        array = pc.drop_null(values.cast(pa.string()))
        array = pc.filter(array, pc.not_equal(array, ""))
    else:
        array = pa.array([v for v in values if v], type=pa.string())
    return pc.unique(array).sort() if len(array) else array


def write_run(folder: str, keys: pa.Array, storage_options: StorageOptions | None = None) -> Run:
    """A new run under ``folder`` holding ``keys`` (sorted, distinct: :func:`sorted_keys`)."""
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"key": keys}, schema=SCHEMA),
        buffer,
        row_group_size=ROW_GROUP_ROWS,
        compression="zstd",
        write_statistics=True,
    )
    run = Run(f"{uuid.uuid4().hex}.parquet", len(keys))
    storage.write_bytes(storage.join(folder, run.name), buffer.getvalue(), storage_options)
    return run


def read_run(folder: str, run: Run, storage_options: StorageOptions | None = None) -> pa.Array:
    """All keys of a run (merging reads them; probing does not)."""
    data = storage.read_bytes(storage.join(folder, run.name), storage_options)
    return pq.read_table(io.BytesIO(data)).column("key").combine_chunks()


def probe(
    folder: str, runs: Sequence[Run], candidates: Iterable[str], storage_options: StorageOptions | None = None
) -> set[str]:
    """The ``candidates`` that some run of the index holds. Each run costs its footer plus the row
    groups whose [min, max] holds a candidate (ranged reads)."""
    wanted = sorted(set(candidates))
    found: set[str] = set()
    for run in runs:
        if wanted and run.num_keys:
            found |= _probe_run(storage.join(folder, run.name), wanted, storage_options)
    return found


def _probe_run(uri: str, wanted: list[str], storage_options: StorageOptions | None) -> set[str]:
    fs, path = storage.filesystem(uri, storage_options)

    def read() -> set[str]:
        with fs.open(path, "rb", block_size=256 * 1024) as handle:
            parquet = pq.ParquetFile(handle)
            groups = [g for g in range(parquet.num_row_groups) if _holds_candidate(parquet, g, wanted)]
            if not groups:
                return set()
            keys = parquet.read_row_groups(groups, columns=["key"]).column("key")
            return set(pc.filter(keys, pc.is_in(keys, pa.array(wanted, type=pa.string()))).to_pylist())

    return storage.retrying(fs, read, uri=uri, what="probing the index")


def _holds_candidate(parquet: pq.ParquetFile, group: int, wanted: list[str]) -> bool:
    stats = parquet.metadata.row_group(group).column(0).statistics
    if stats is None or not stats.has_min_max:
        return True
    low = bisect.bisect_left(wanted, stats.min)
    return low < len(wanted) and wanted[low] <= stats.max


def plan_merge(runs: Sequence[Run]) -> int:
    """How many of the newest ``runs`` to merge into one (0, or ≥ 2): the newest, then older ones
    while each holds at most ``MERGE_RATIO`` times the keys taken so far. A big old run is left
    alone until the newer ones together come near its size (size-tiered, like an LSM tree)."""
    if not runs:
        return 0
    taken, keys = 1, runs[-1].num_keys
    while taken < len(runs) and runs[-taken - 1].num_keys <= MERGE_RATIO * max(keys, 1):
        keys += runs[-taken - 1].num_keys
        taken += 1
    return taken if taken >= 2 else 0


def merge(folder: str, runs: Sequence[Run], storage_options: StorageOptions | None = None) -> Run:
    """One new run holding the keys of ``runs`` (the old files are left for the caller to delete
    once no descriptor lists them)."""
    arrays = [read_run(folder, run, storage_options) for run in runs]
    keys = pa.concat_arrays(arrays) if arrays else pa.array([], type=pa.string())
    return write_run(folder, pc.unique(keys).sort(), storage_options)
