"""Datasets of image shards: Parquet files of encoded images (+ ground truth) and a JSON descriptor.

Layout at ``DATA_URI/``::

    dataset.json                  descriptor (compacted): categories, shards with row counts, source,
                                  every input that did not become a clean row, with the reason, the
                                  index runs, and where the append log continues (``log.next``)
    _log/append-0000000012.json   one entry per append since: its shards, additions, counts, runs
    _index/source/<token>.parquet the known-keys index (``pipeline.index``): sorted runs of the
    _index/image_id/<token>.parquet  sources and ids, probed by row-group statistics
    shards/shard-00000.parquet    rows: image_id, image (the stored bytes, never re-encoded), source,
    shards/shard-00001.parquet    width, height (as displayed; null when unknown), gt_boxes (xyxy),
    …                             gt_labels, gt_iscrowd (null for unlabelled data)

Shards are written whole and atomically, the descriptor (or the append's log entry) last: a reader
sees only complete shards, and an interrupted ingest leaves at most unlisted shard files that the
next ingest overwrites (or, appending, deletes). Writing a dataset where one exists (without
``append``) replaces it: once the new descriptor is written, shard files it does not list are
deleted. An append costs what it adds, not the dataset: it writes its shards, one index run per
column and one log entry, never the whole descriptor; every ``COMPACT_EVERY`` entries the log is
folded into ``dataset.json`` (:func:`compact`). Readers apply the entries after the descriptor.

Writers that share a dataset: the ingests hold a lease on ``DATA_URI/_lease.json``
(``pipeline.lease``), so one writes at a time. Appends are safe even without it: a new shard's name
is taken by creating its file only if absent (two appenders never share a name), and the log entry
is created only if absent at the sequence number after the newest one read; when another writer got
there first, the dataset is read again and this writer's shards are merged onto it, leaving out rows
whose ``image_id`` or source the other writer added meanwhile. The descriptor itself is replaced only
if it is still the version the writer read (compare-and-swap: replacing, compacting).

Images are stored as they were (no decoding or re-encoding at ingest), in row groups of at most
``ROW_GROUP_SIZE`` images and ``ROW_GROUP_MAX_BYTES`` so that readers can stream a shard. The image
column is stored uncompressed, the small columns with zstd: JPEG/PNG/WebP bytes do not compress
further (bench/io.py: zstd on a shard of 256 COCO photos saves 0.7 % of its 40 MB and takes 1.6×
the write time).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import index as keyindex
from . import storage
from .index import Run
from .lease import Lease
from .storage import StorageOptions

log = logging.getLogger(__name__)

FORMAT = "detectflow.dataset/1"
LOG_FORMAT = "detectflow.dataset-append/1"
DESCRIPTOR = "dataset.json"
SHARDS_DIR = "shards"
LOG_DIR = "_log"
INDEX_DIR = "_index"
INDEXED = ("source", "image_id")  # the columns with a known-keys index
# Appends logged since the last compaction after which an appender folds them into dataset.json.
COMPACT_EVERY = 16
# Images per shard. bench/io.py (bench/results/io.json) read the 328 COCO photos (52 MB) from the S3
# server as shards of 16/64/128/256 images: 1.06k/2.0k/1.8k/1.6k images/s — per-request overhead
# halves throughput at 16 and is amortised from 64 on. Within that plateau, 256 photos (~40 MB) make
# few objects per million images and a few seconds of GPU work per shard (cheap to retry), while a
# CPU actor still finishes one in under a minute, so progress and load balancing stay fine-grained.
DEFAULT_SHARD_SIZE = 256
ROW_GROUP_SIZE = 32
ROW_GROUP_MAX_BYTES = 64 * 1024 * 1024
# Read-ahead of a ranged read (s3fs's default block is 50 MB: the whole shard for a footer).
RANGE_READ_BLOCK_BYTES = 1024 * 1024
# Keep a list of at most this many names per descriptor list (counts are always exact).
MAX_LISTED = 1000
# Compare-and-swap attempts of a descriptor update before giving up (each merges a newer one).
DESCRIPTOR_ATTEMPTS = 5
LISTS = ("rejected", "invalid", "cleaned", "skipped")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("gt_boxes", pa.list_(pa.list_(pa.float32(), 4))),
        pa.field("gt_labels", pa.list_(pa.int32())),
        pa.field("gt_iscrowd", pa.list_(pa.bool_())),
    ]
)


def _parquet_leaf_paths(name: str, arrow_type: pa.DataType) -> list[str]:
    """Parquet's names of the leaf columns of a field (``gt_labels`` → ``gt_labels.list.element``):
    per-column writer options are keyed by them."""
    if pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _parquet_leaf_paths(f"{name}.list.element", arrow_type.value_type)
    return [name]


# The encoded images do not compress further; zstd on everything else.
SHARD_COMPRESSION = {
    path: ("none" if field.name == "image" else "zstd")
    for field in SHARD_SCHEMA
    for path in _parquet_leaf_paths(field.name, field.type)
}


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: ``name`` (``"shard-00003"``, also the name of its inference outputs), its
    full ``uri``, its row count and its size in bytes. The one type for "a shard" everywhere: the
    inference scheduler queues these and its workers process them."""

    name: str
    uri: str
    num_images: int
    num_bytes: int


@dataclass
class Dataset:
    """A dataset as its descriptor describes it.

    ``categories``: ``[{"label": 1, "name": "person", "source_id": 1}, …]`` (labels ``1..K``;
    empty for unlabelled data). ``source``: how it was made (``{"kind": "coco" | "images" |
    "synthetic", …, "labelled": bool}``). The lists of inputs that need a second look hold at most
    ``MAX_LISTED`` entries each, ``counts`` has the exact numbers (``rows``, ``rejected``,
    ``invalid``, ``cleaned``, ``skipped``):

    - ``rejected``: ``[{"input", "reason"}]`` inputs that did not become rows (missing or unreadable
      files, duplicate ids, invalid annotations);
    - ``invalid``: ``[{"image_id", "reason"}]`` rows whose image header cannot be read (inference
      reports each as one error row);
    - ``cleaned``: ``[{"input", "reason"}]`` annotations that were repaired (clipped boxes);
    - ``skipped``: names of files under an image prefix that are not images.
    """

    uri: str
    categories: list[dict[str, Any]]
    shards: list[ShardInfo]
    source: dict[str, Any]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    cleaned: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    # The known-keys index (``pipeline.index``): column (``source``, ``image_id``) → its runs; a
    # dataset written before indexes existed has none until its first append builds them.
    index: dict[str, list[Run]] = field(default_factory=dict)
    log_base: int = 0  # the first append-log entry not folded into dataset.json
    log_next: int = 0  # the sequence number the next append takes

    @property
    def indexed(self) -> bool:
        """Whether the index covers every row (both columns)."""
        return set(self.index) == set(INDEXED) or not self.shards

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.shards)

    @property
    def class_names(self) -> list[str]:
        """Index = label; ``[0]`` is the background."""
        names = ["__background__"] * (max((c["label"] for c in self.categories), default=0) + 1)
        for category in self.categories:
            names[category["label"]] = category["name"]
        return names

    @property
    def num_classes(self) -> int:
        """Classes counting the background: ``K + 1``."""
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return bool(self.source.get("labelled")) and bool(self.categories)


def class_mismatch(model_names: dict[int, str], dataset: Dataset, *, every_class: bool = True) -> str | None:
    """A one-line warning when a model's classes (label → name) are not the labelled dataset's
    categories (label → name), or None when they agree (or the dataset has no labels). Detections
    are scored by label number, so a model of other classes scores 0 on every category. With
    ``every_class=False`` (names seen in detections: a subset) only the given labels are compared."""
    if not dataset.has_labels:
        return None
    expected = {label: name for label, name in enumerate(dataset.class_names) if label > 0}
    found = {label: name for label, name in model_names.items() if label > 0}
    labels = set(expected) | set(found) if every_class else set(found)
    differing = sorted(label for label in labels if expected.get(label) != found.get(label))
    if not differing:
        return None
    whose = "model" if every_class else "detections"
    examples = ", ".join(
        f"label {label} is {found.get(label, '(none)')!r} in the {whose}, "
        f"{expected.get(label, '(none)')!r} in the dataset"
        for label in differing[:2]
    )
    more = f" and {len(differing) - 2} more" if len(differing) > 2 else ""
    count = f"the model's {len(found)} classes" if every_class else "the classes of the detections"
    return (
        f"{count} are not the {len(expected)} categories of dataset {storage.redact(dataset.uri)}: "
        f"{examples}{more}; scores against its labels will be near 0"
    )


def descriptor_uri(uri: str) -> str:
    """The URI of the descriptor (``dataset.json``) of the dataset at ``uri``."""
    return storage.join(uri, DESCRIPTOR)


def log_uri(uri: str, seq: int) -> str:
    """The URI of append-log entry ``seq`` (``_log/append-0000000012.json``)."""
    return storage.join(uri, LOG_DIR, f"append-{seq:010d}.json")


def index_folder(uri: str, column: str) -> str:
    """``DATA_URI/_index/<column>``: the sorted runs of the known-keys index of ``column``."""
    return storage.join(uri, INDEX_DIR, column)


def shard_name(index: int) -> str:
    """``3 → "shard-00003"``."""
    return f"shard-{index:05d}"


def open_dataset(uri: str, storage_options: StorageOptions | None = None) -> Dataset:
    """The dataset at ``uri`` (its descriptor and the append-log entries after it); a clear error
    naming the URI when there is none."""
    found = read_descriptor(uri, storage_options)
    if found is None:
        raise FileNotFoundError(
            f"no dataset at {storage.redact(storage.normalize(uri))} (missing {DESCRIPTOR}; create one with "
            "`detectflow ingest` or `detectflow synth`)"
        )
    return found[0]


def read_descriptor(uri: str, storage_options: StorageOptions | None = None) -> tuple[Dataset, str] | None:
    """The dataset at ``uri`` — ``dataset.json`` with the append-log entries written since it was
    last compacted applied in order — and the version of ``dataset.json`` (for a compare-and-swap
    update); None when there is no dataset. A log whose first entry is past the descriptor's (a
    compaction happened between the two reads) makes it read both again."""
    uri = storage.normalize(uri)
    for _ in range(DESCRIPTOR_ATTEMPTS):
        try:
            data, version = storage.read_bytes_with_version(descriptor_uri(uri), storage_options)
        except storage.StorageError as exc:
            if exc.reason == storage.NOT_FOUND:
                return None
            raise
        dataset = _parse_descriptor(uri, data)
        entries = _read_log(uri, dataset.log_base, storage_options)
        if entries is not None:
            for entry in entries:
                _apply_entry(dataset, entry)
            return dataset, version
    raise ValueError(f"{storage.redact(descriptor_uri(uri))} kept being compacted while it was read; try again")


def _read_log(uri: str, start: int, storage_options: StorageOptions | None) -> list[dict[str, Any]] | None:
    """The log entries from ``start`` on (one listing, one read each); None when the first one
    present is past ``start``: entries were folded into a newer descriptor meanwhile. Entries are
    contiguous (each is created only if absent, at the sequence number after the newest one its
    writer read) and only ever deleted from the oldest, the newest one never."""
    listed = storage.list_files(storage.join(uri, LOG_DIR), storage_options, suffixes=(".json",))
    seqs = sorted(seq for name in listed if (seq := _log_seq(name)) is not None and seq >= start)
    if seqs and seqs[0] != start:
        return None
    return [storage.read_json(log_uri(uri, seq), storage_options) for seq in seqs]


def _log_seq(uri: str) -> int | None:
    name = storage.basename(uri)
    if not (name.startswith("append-") and name.endswith(".json")):
        return None
    digits = name[len("append-") : -len(".json")]
    return int(digits) if digits.isdigit() else None


def _apply_entry(dataset: Dataset, entry: dict[str, Any]) -> None:
    """One append on top of ``dataset``: its shards, its additions to the lists, the counts and
    source after it, its index runs (replacing the others when it rebuilt the index)."""
    dataset.shards += [_shard_info(dataset.uri, s) for s in entry["shards"]]
    for name in LISTS:
        added = entry.get("lists", {}).get(name, [])
        if name == "skipped" and entry.get("skipped_cleared"):
            dataset.skipped = []
        setattr(dataset, name, (getattr(dataset, name) + added)[:MAX_LISTED])
    dataset.counts = dict(entry["counts"])
    dataset.source = dict(entry["source"])
    for column, runs in entry.get("index", {}).items():
        mine = [Run.from_json(run) for run in runs]
        dataset.index[column] = mine if entry.get("index_rebuilt") else dataset.index.get(column, []) + mine
    dataset.updated_at = entry.get("updated_at", dataset.updated_at)
    dataset.log_next = entry["seq"] + 1


def _shard_info(uri: str, entry: dict[str, Any]) -> ShardInfo:
    return ShardInfo(
        entry["name"],
        storage.join(uri, SHARDS_DIR, f"{entry['name']}.parquet"),
        entry["num_images"],
        entry["num_bytes"],
    )


def _parse_descriptor(uri: str, data: bytes) -> Dataset:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{storage.redact(descriptor_uri(uri))} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{storage.redact(descriptor_uri(uri))} is not a {FORMAT} descriptor")
    log_base = int(payload.get("log", {}).get("next", 0))
    return Dataset(
        uri=uri,
        categories=payload["categories"],
        shards=[_shard_info(uri, s) for s in payload["shards"]],
        source=payload.get("source", {}),
        rejected=payload.get("rejected", []),
        invalid=payload.get("invalid", []),
        cleaned=payload.get("cleaned", []),
        skipped=payload.get("skipped", []),
        counts=payload.get("counts", {}),
        created_at=payload.get("created_at"),
        updated_at=payload.get("updated_at"),
        index={column: [Run.from_json(r) for r in runs] for column, runs in payload.get("index", {}).items()},
        log_base=log_base,
        log_next=log_base,
    )


def descriptor_payload(dataset: Dataset) -> dict[str, Any]:
    """``dataset.json`` for ``dataset`` with every append folded in (the log starts after them)."""
    return {
        "format": FORMAT,
        "categories": dataset.categories,
        "shards": [{"name": s.name, "num_images": s.num_images, "num_bytes": s.num_bytes} for s in dataset.shards],
        "num_images": dataset.num_images,
        "source": dataset.source,
        **{name: getattr(dataset, name) for name in LISTS},
        "counts": dataset.counts,
        "created_at": dataset.created_at,
        "updated_at": dataset.updated_at or _now(),
        "index": {column: [run.to_json() for run in runs] for column, runs in dataset.index.items()},
        "log": {"next": dataset.log_next},
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_shard(
    uri: str, columns: Sequence[str] | None = None, storage_options: StorageOptions | None = None
) -> pa.Table:
    """A whole shard (or some of its columns) as an Arrow table.

    With the ``image`` column (or all columns) the object is fetched in one request; without it
    only the footer and the chunks of the wanted columns are fetched (ranged reads), so that
    ground truth, ids or sources of a large dataset are read without downloading its images.
    """
    if columns is not None and "image" not in columns:
        return _read_columns(uri, list(columns), storage_options)
    data = storage.read_bytes(uri, storage_options)
    try:
        return pq.read_table(io.BytesIO(data), columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"shard {storage.redact(uri)} is not a readable Parquet file: {exc}") from exc


def _read_columns(uri: str, columns: list[str], storage_options: StorageOptions | None) -> pa.Table:
    fs, path = storage.filesystem(uri, storage_options)

    def read() -> pa.Table | pa.ArrowInvalid:
        with fs.open(path, "rb", block_size=RANGE_READ_BLOCK_BYTES) as handle:
            try:
                return pq.ParquetFile(handle).read(columns=columns)
            except pa.ArrowInvalid as exc:  # a bad file, not a storage failure: never retried
                return exc

    result = storage.retrying(fs, read, uri=uri, what="reading")
    if isinstance(result, pa.ArrowInvalid):
        raise ValueError(f"shard {storage.redact(uri)} is not a readable Parquet file: {result}") from result
    return result


def iter_shard_batches(
    uri: str,
    batch_size: int,
    columns: Sequence[str] | None = None,
    storage_options: StorageOptions | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream a shard in record batches of at most ``batch_size`` rows. The object is fetched in
    one request (retried as a whole on transient errors; shards are bounded in size), then decoded
    row group by row group."""
    data = storage.read_bytes(uri, storage_options)
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"shard {storage.redact(uri)} is not a readable Parquet file: {exc}") from exc
    yield from parquet.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def gt_targets(table: pa.Table | pa.RecordBatch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row: ``boxes [N,4] float32`` (xyxy), ``labels [N] int64``, ``iscrowd [N] bool``
    (empty arrays for rows without ground truth)."""
    boxes_col = table.column("gt_boxes").to_pylist()
    labels_col = table.column("gt_labels").to_pylist()
    crowd_col = table.column("gt_iscrowd").to_pylist()
    out = []
    for boxes, labels, crowd in zip(boxes_col, labels_col, crowd_col):
        labels = labels or []
        out.append(
            (
                np.asarray(boxes or [], dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
                np.asarray(crowd if crowd is not None else [False] * len(labels), dtype=bool),
            )
        )
    return out


def known_column(dataset: Dataset, column: str, storage_options: StorageOptions | None = None) -> set[str]:
    """All values of a string column (``image_id`` or ``source``) over the dataset's shards (only
    that column is fetched)."""
    return column_values(dataset.shards, column, storage_options)


def column_values(shards: Iterable[ShardInfo], column: str, storage_options: StorageOptions | None = None) -> set[str]:
    """All values of a string column over ``shards`` (only that column is fetched)."""
    values: set[str] = set()
    for shard in shards:
        values.update(v for v in read_shard(shard.uri, [column], storage_options).column(column).to_pylist() if v)
    return values


def known_sources(dataset: Dataset, storage_options: StorageOptions | None = None) -> set[str]:
    """Source URIs already in the dataset (incremental ingest skips them)."""
    return known_column(dataset, "source", storage_options)


def row_group_bounds(image_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of a shard's row groups: consecutive rows, at most
    ``ROW_GROUP_SIZE`` of them and (unless one image alone is larger) ``ROW_GROUP_MAX_BYTES`` of
    image bytes, so that a reader streaming row groups holds little whatever the image sizes."""
    bounds: list[tuple[int, int]] = []
    start, group_bytes = 0, 0
    for index, num_bytes in enumerate(image_sizes):
        full = index - start >= ROW_GROUP_SIZE or group_bytes + num_bytes > ROW_GROUP_MAX_BYTES
        if index > start and full:
            bounds.append((start, index))
            start, group_bytes = index, 0
        group_bytes += num_bytes
    if len(image_sizes) > start:
        bounds.append((start, len(image_sizes)))
    return bounds


class DatasetWriter:
    """Streams rows into shards of ``shard_size`` images; at most one shard is held in memory.

    ``append=True`` continues an existing dataset: new shards get the next free names (each taken
    by creating its file only if absent), an ``image_id`` already present is rejected rather than
    duplicated (looked up in the dataset's index: :meth:`reserve` looks up many at once), and the
    append is one new log entry, created only if absent, merging what another writer added meanwhile
    (see the module docstring). Without it, a dataset already at ``uri`` is
    replaced when the writer closes (the descriptor must still be the one read at the start).

    ``lease``: the held dataset lease of the run (``pipeline.lease``), verified before each shard
    and before the descriptor is written: a writer whose lease was lost stops with
    :class:`~pipeline.lease.LeaseLost` instead of writing on. Holding it, an appending writer also
    deletes shard files and index runs that nothing lists (left by an interrupted ingest, or merged
    away by a compaction).
    """

    def __init__(
        self,
        uri: str,
        *,
        categories: Sequence[dict[str, Any]],
        source: dict[str, Any],
        shard_size: int = DEFAULT_SHARD_SIZE,
        storage_options: StorageOptions | None = None,
        append: bool = False,
        lease: Lease | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard size must be ≥ 1, got {shard_size}")
        self.uri = storage.normalize(uri)
        self.shard_size = shard_size
        self.storage_options = storage_options
        self.append = append
        self.lease = lease
        self.categories = list(categories)
        self.source = dict(source)
        self.shards: list[ShardInfo] = []
        self.rejected: list[dict[str, Any]] = []
        self.invalid: list[dict[str, Any]] = []
        self.cleaned: list[dict[str, Any]] = []
        self.counts = {"rows": 0, "rejected": 0, "invalid": 0, "cleaned": 0, "skipped": 0}
        self.skipped: list[str] = []
        self.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.existing: Dataset | None = None  # the dataset found at the start (None: a new one)
        self._version: str | None = None  # of the descriptor this writer will replace
        self._base = Dataset(self.uri, self.categories, [], {}, counts=dict(self.counts))
        self._image_ids: set[str] = set()
        self._rows: list[dict[str, Any]] = []
        self._keys: dict[str, list[tuple[str, str | None]]] = {}  # new shard → its (image_id, source)s
        self._skipped_cleared = False
        self._replaced_shards: list[ShardInfo] = []
        self._next_seq = 0  # the append-log entry this writer will create
        self._probed: set[str] = set()  # image ids looked up in the dataset appended to …
        self._taken: set[str] = set()  # … and those found there
        self._rebuild: dict[str, pa.Array] | None = None  # every key of an unindexed dataset appended to
        self._index_chunks: list[pa.Table] = []  # image_id, source of the rows written (replacing)
        found = read_descriptor(self.uri, storage_options)
        if found is not None:
            self.existing, self._version = found
            self._next_seq = self.existing.log_next
            self._start_from(self.existing)
        if append and lease is not None:
            self._delete_unlisted()

    def _start_from(self, existing: Dataset) -> None:
        if not self.append:
            self._replaced_shards = existing.shards
            return
        if existing.categories != self.categories:
            raise ValueError(
                f"cannot append to {storage.redact(self.uri)}: its categories differ "
                f"({len(existing.categories)} there, {len(self.categories)} here)"
            )
        self._base = existing
        self.shards = list(existing.shards)
        self.rejected, self.invalid = list(existing.rejected), list(existing.invalid)
        self.cleaned, self.skipped = list(existing.cleaned), list(existing.skipped)
        self.counts.update(existing.counts)
        self.created_at = existing.created_at or self.created_at
        self.source = {**existing.source, **self.source}
        if not existing.indexed:  # written before indexes existed: this append builds them, once
            self._rebuild = {c: keyindex.sorted_keys(known_column(existing, c, self.storage_options)) for c in INDEXED}

    def held(self, column: str, values: Iterable[str]) -> set[str]:
        """Which of ``values`` the dataset appended to already holds in ``column`` (``source`` or
        ``image_id``): a probe of its index, not a load of the column."""
        values = {v for v in values if v}
        if self.existing is None or not self.append or not values:
            return set()
        if self._rebuild is not None:
            known = self._rebuild[column]
            return set(pc.filter(known, pc.is_in(known, pa.array(list(values), pa.string()))).to_pylist())
        folder = index_folder(self.uri, column)
        return keyindex.probe(folder, self.existing.index.get(column, []), values, self.storage_options)

    def reserve(self, image_ids: Iterable[str]) -> None:
        """Look up ``image_ids`` in the dataset appended to in one probe, before adding them (an
        id :meth:`add` meets unannounced is looked up alone)."""
        new = {i for i in image_ids if i not in self._probed}
        self._taken |= self.held("image_id", new)
        self._probed |= new

    def _in_dataset(self, image_id: str) -> bool:
        if self.existing is None or not self.append:
            return False
        if image_id not in self._probed:
            self.reserve([image_id])
        return image_id in self._taken

    def _delete_unlisted(self) -> None:
        """Shard files and index runs no descriptor lists: left by an interrupted ingest (the lease
        says no other writer is at work). Shards are listed from after the last of an unbroken
        ``shard-00000 …`` sequence: what an interrupted writer leaves lies past it."""
        names = {shard.name for shard in self.shards}
        unbroken = bool(names) and all(shard_name(i) in names for i in range(len(names)))
        after = f"{shard_name(len(names) - 1)}.parquet" if unbroken else None
        folder = storage.join(self.uri, SHARDS_DIR)
        for uri in storage.list_files(folder, self.storage_options, suffixes=(".parquet",), after=after):
            if storage.basename(uri)[: -len(".parquet")] not in names:
                storage.delete(uri, self.storage_options)
        for column in INDEXED if self.existing is not None else ():
            runs = {run.name for run in self.existing.index.get(column, [])}
            for uri in storage.list_files(index_folder(self.uri, column), self.storage_options, suffixes=(".parquet",)):
                if storage.basename(uri) not in runs:
                    storage.delete(uri, self.storage_options)

    def add(
        self,
        image_id: str,
        image: bytes,
        source: str | None,
        *,
        width: int | None = None,
        height: int | None = None,
        gt_boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
        gt_labels: Sequence[int] | np.ndarray | None = None,
        gt_iscrowd: Sequence[bool] | np.ndarray | None = None,
    ) -> bool:
        """Add one image; returns False (and records the rejection) for a duplicate ``image_id``."""
        if image_id in self._image_ids or self._in_dataset(image_id):
            self.reject(source or image_id, f"duplicate image_id {image_id!r}")
            return False
        self._image_ids.add(image_id)
        self._rows.append(
            {
                "image_id": image_id,
                "image": image,
                "source": source,
                "width": width,
                "height": height,
                "gt_boxes": None
                if gt_boxes is None
                else np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4).tolist(),
                "gt_labels": None if gt_labels is None else [int(v) for v in gt_labels],
                "gt_iscrowd": None if gt_iscrowd is None else [bool(v) for v in gt_iscrowd],
            }
        )
        self.counts["rows"] += 1
        if len(self._rows) >= self.shard_size:
            self._flush()
        return True

    def reject(self, item: str, reason: str) -> None:
        """An input that did not become a row."""
        self.counts["rejected"] += 1
        if len(self.rejected) < MAX_LISTED:
            self.rejected.append({"input": item, "reason": reason})

    def mark_invalid(self, image_id: str, reason: str) -> None:
        """A row whose image cannot be decoded (kept so that inference reports it as an error row)."""
        self.counts["invalid"] += 1
        if len(self.invalid) < MAX_LISTED:
            self.invalid.append({"image_id": image_id, "reason": reason})

    def clean(self, item: str, reason: str) -> None:
        """An annotation that was repaired (e.g. clipped to the image) rather than dropped."""
        self.counts["cleaned"] += 1
        if len(self.cleaned) < MAX_LISTED:
            self.cleaned.append({"input": item, "reason": reason})

    def skip(self, name: str) -> None:
        """A file that is not an input of this kind of dataset (e.g. not an image)."""
        self.counts["skipped"] += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(name)

    def clear_skipped(self) -> None:
        """Forget the skipped files: an incremental ingest lists its prefix again in full."""
        self.counts["skipped"] = 0
        self.skipped = []
        self._skipped_cleared = True

    def _flush(self) -> None:
        if not self._rows:
            return
        if self.lease is not None:
            self.lease.verify()
        table = pa.Table.from_pylist(self._rows, schema=SHARD_SCHEMA)
        data = _shard_bytes(table, [len(row["image"]) for row in self._rows])
        shard = self._write_shard(data, table.num_rows)
        if self.append:
            self._keys[shard.name] = [(row["image_id"], row["source"]) for row in self._rows]
        else:
            self._index_chunks.append(table.select(list(INDEXED)))
        self.shards.append(shard)
        self._rows = []

    def _write_shard(self, data: bytes, num_rows: int) -> ShardInfo:
        """Replacing: the next name, overwritten. Appending: the first free name from the next one
        on, taken by creating the file only if absent."""
        index, listed = len(self.shards), {shard.name for shard in self.shards}
        while True:
            name = shard_name(index)
            uri = storage.join(self.uri, SHARDS_DIR, f"{name}.parquet")
            if not self.append:
                storage.write_bytes(uri, data, self.storage_options)
                return ShardInfo(name, uri, num_rows, len(data))
            if name not in listed and storage.write_bytes_if_absent(uri, data, self.storage_options) is not None:
                return ShardInfo(name, uri, num_rows, len(data))
            index += 1

    def close(self) -> Dataset:
        """Write the last shard and then the descriptor (replacing) or an append-log entry
        (appending); returns the dataset."""
        self._flush()
        if self.lease is not None:
            self.lease.verify()
        for _ in range(DESCRIPTOR_ATTEMPTS):
            if self._commit():
                break
            if not self.append:
                raise ValueError(
                    f"{storage.redact(descriptor_uri(self.uri))} was changed by another writer while this one "
                    "replaced the dataset; nothing of it was listed: run the ingest again"
                )
            self._merge_newer()
        else:
            raise ValueError(
                f"{storage.redact(descriptor_uri(self.uri))} kept changing under other writers: gave up after "
                f"{DESCRIPTOR_ATTEMPTS} attempts to add this writer's shards; run the ingest again"
            )
        listed = {shard.name for shard in self.shards}
        for stale in self._replaced_shards:
            if stale.name not in listed:
                storage.delete(stale.uri, self.storage_options)
        dataset = open_dataset(self.uri, self.storage_options)
        if dataset.log_next - dataset.log_base >= COMPACT_EVERY and compact(self.uri, self.storage_options):
            dataset = open_dataset(self.uri, self.storage_options)
        return dataset

    def _commit(self) -> bool:
        """Appending to a dataset: create the next append-log entry (only if absent). Otherwise:
        write the descriptor if it is still the version this writer read (or still absent) and no
        append was logged since."""
        if self.append and self.existing is not None:
            entry = self._entry()
            data = json.dumps(entry, indent=2, sort_keys=True, default=str).encode()
            return (
                storage.write_bytes_if_absent(log_uri(self.uri, entry["seq"]), data, self.storage_options) is not None
            )
        if self._version is not None and _read_log(self.uri, self._next_seq, self.storage_options) != []:
            return False
        payload = descriptor_payload(self._as_dataset())
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        where = descriptor_uri(self.uri)
        if self._version is None:
            version = storage.write_bytes_if_absent(where, data, self.storage_options)
        else:
            version = storage.replace_bytes_if_version(where, data, self._version, self.storage_options)
        self._version = version or self._version
        if version is not None and self.existing is not None:
            _prune_log(self.uri, self._next_seq, self.storage_options)
        return version is not None

    def _as_dataset(self) -> Dataset:
        """What this writer wrote, as a whole dataset (replacing, or creating by appending)."""
        runs = {column: self._index_runs(column, self._own_keys(column)) for column in INDEXED}
        return Dataset(
            **{name: getattr(self, name) for name in ("uri", "categories", "shards", "source", *LISTS, "counts")},
            created_at=self.created_at,
            updated_at=_now(),
            index=runs,
            log_base=self._next_seq,
            log_next=self._next_seq,
        )

    def _entry(self) -> dict[str, Any]:
        """The append-log entry of this writer: its shards, its additions to the lists, the counts
        and source after it, the index runs of its rows (of every row when it builds the index)."""
        runs = {}
        for column in INDEXED:
            keys = self._own_keys(column)
            if self._rebuild is not None:
                keys = pa.concat_arrays([self._rebuild[column], keys])
            runs[column] = [run.to_json() for run in self._index_runs(column, keys)]
        lists = {name: getattr(self, name)[len(getattr(self._base, name)) :] for name in LISTS}
        if self._skipped_cleared:
            lists["skipped"] = self.skipped
        return {
            "format": LOG_FORMAT,
            "seq": self._next_seq,
            "shards": [
                {"name": s.name, "num_images": s.num_images, "num_bytes": s.num_bytes}
                for s in self.shards
                if s.name in self._keys
            ],
            "lists": lists,
            "skipped_cleared": self._skipped_cleared,
            "counts": self.counts,
            "source": self.source,
            "index": runs,
            "index_rebuilt": self._rebuild is not None,
            "updated_at": _now(),
        }

    def _own_keys(self, column: str) -> pa.Array:
        """``column``'s values of the rows this writer wrote, sorted and distinct."""
        if self.append:
            position = 0 if column == "image_id" else 1  # _keys holds (image_id, source)
            return keyindex.sorted_keys(key[position] for keys in self._keys.values() for key in keys)
        chunks = [piece for chunk in self._index_chunks for piece in chunk.column(column).chunks]
        return keyindex.sorted_keys(pa.chunked_array(chunks, pa.string()))

    def _index_runs(self, column: str, keys: pa.Array) -> list[Run]:
        if not len(keys):
            return []
        return [keyindex.write_run(index_folder(self.uri, column), keys, self.storage_options)]

    # ------------------------------------------------------------------ merging a newer descriptor

    def _merge_newer(self) -> None:
        """Another writer updated the descriptor since this one read it: read it again and put this
        writer's new shards, lists and counts on top of it. Rows whose ``image_id`` or source the
        other writer added meanwhile are taken out of this writer's shards."""
        found = read_descriptor(self.uri, self.storage_options)
        newer, version = found if found is not None else (Dataset(self.uri, self.categories, [], {}), None)
        self.existing, self._next_seq = (newer, newer.log_next) if found is not None else (None, 0)
        if found is not None and newer.categories != self.categories:
            raise ValueError(f"cannot append to {storage.redact(self.uri)}: its categories changed meanwhile")
        base_names, newer_names = {s.name for s in self._base.shards}, {s.name for s in newer.shards}
        added = [shard for shard in newer.shards if shard.name not in base_names]
        self._rebase(newer)
        taken_ids = column_values(added, "image_id", self.storage_options)
        taken_sources = column_values(added, "source", self.storage_options)
        if self._rebuild is not None:  # still unindexed: the index this writer builds covers the other's rows
            taken = {"image_id": taken_ids, "source": taken_sources}
            extend = {c: keyindex.sorted_keys([*self._rebuild[c].to_pylist(), *taken[c]]) for c in INDEXED}
            self._rebuild = None if newer.indexed else extend
        ours = [shard for shard in self.shards if shard.name in self._keys and shard.name not in newer_names]
        kept = [kept for shard in ours if (kept := self._without(shard, taken_ids, taken_sources)) is not None]
        self.shards = newer.shards + kept
        self._version = version
        log.warning(
            "%s was updated by another writer meanwhile (%d shards added): merged this writer's %d shards into it",
            storage.redact(descriptor_uri(self.uri)),
            len(added),
            len(kept),
        )

    def _rebase(self, newer: Dataset) -> None:
        """This writer's additions to the lists and counts, moved from the dataset it started from
        onto ``newer``."""
        own_skipped = self.counts["skipped"]
        for name in LISTS:
            mine = getattr(self, name)[len(getattr(self._base, name)) :]
            if not (name == "skipped" and self._skipped_cleared):  # cleared: this writer's listing only
                setattr(self, name, (list(getattr(newer, name)) + mine)[:MAX_LISTED])
        self.counts = {
            key: newer.counts.get(key, 0) + value - self._base.counts.get(key, 0) for key, value in self.counts.items()
        }
        if self._skipped_cleared:
            self.counts["skipped"] = own_skipped
        self._base = newer

    def _without(self, shard: ShardInfo, taken_ids: set[str], taken_sources: set[str]) -> ShardInfo | None:
        """``shard`` (one of this writer's) without the rows added by another writer meanwhile:
        rewritten when some are, deleted when all are (None). The same source is the same image,
        already in the dataset; a different image under a taken ``image_id`` is rejected."""
        keys = self._keys[shard.name]
        keep = [
            i for i, (image_id, source) in enumerate(keys) if image_id not in taken_ids and source not in taken_sources
        ]
        if len(keep) == len(keys):
            return shard
        kept_ids = {keys[i][0] for i in keep}
        dropped = {image_id for image_id, _ in keys if image_id not in kept_ids}
        for image_id, source in keys:
            if image_id in dropped and source not in taken_sources:
                self.reject(source or image_id, f"duplicate image_id {image_id!r} (added by another writer meanwhile)")
        self.counts["rows"] -= len(keys) - len(keep)
        base_invalid = len(self._base.invalid)
        mine = [entry for entry in self.invalid[base_invalid:] if entry["image_id"] not in dropped]
        self.counts["invalid"] -= len(self.invalid) - base_invalid - len(mine)
        self.invalid = self.invalid[:base_invalid] + mine
        self._keys[shard.name] = [keys[i] for i in keep]
        if not keep:
            storage.delete(shard.uri, self.storage_options)
            del self._keys[shard.name]
            return None
        table = read_shard(shard.uri, storage_options=self.storage_options).take(keep)
        data = _shard_bytes(table, pc.binary_length(table.column("image")).to_pylist())
        storage.write_bytes(shard.uri, data, self.storage_options)  # created by this writer: its own
        return ShardInfo(shard.name, shard.uri, table.num_rows, len(data))


def compact(uri: str, storage_options: StorageOptions | None = None) -> bool:
    """Fold the append log of the dataset at ``uri`` into ``dataset.json`` (compare-and-swap on
    its version) and merge its index runs size-tiered (``pipeline.index.plan_merge``); False when
    there was nothing to fold or another writer changed the descriptor first. Folded entries are
    deleted but the newest (see :func:`_read_log`); merged-away runs are left to the next leased
    append (:meth:`DatasetWriter._delete_unlisted`)."""
    found = read_descriptor(uri, storage_options)
    if found is None or found[0].log_next == found[0].log_base:
        return False
    dataset, version = found
    for column, runs in dataset.index.items():
        while (taken := keyindex.plan_merge(runs)) >= 2:
            runs = [*runs[:-taken], keyindex.merge(index_folder(dataset.uri, column), runs[-taken:], storage_options)]
        dataset.index[column] = runs
    data = json.dumps(descriptor_payload(dataset), indent=2, sort_keys=True, default=str).encode()
    if storage.replace_bytes_if_version(descriptor_uri(dataset.uri), data, version, storage_options) is None:
        return False
    _prune_log(dataset.uri, dataset.log_next, storage_options)
    return True


def _prune_log(uri: str, next_seq: int, storage_options: StorageOptions | None) -> None:
    """Delete the log entries a descriptor with ``log.next == next_seq`` has folded in, but the
    newest of them (readers of an older descriptor see it and know to read again)."""
    for listed in storage.list_files(storage.join(uri, LOG_DIR), storage_options, suffixes=(".json",)):
        seq = _log_seq(listed)
        if seq is not None and seq < next_seq - 1:
            storage.delete(listed, storage_options)


def _shard_bytes(table: pa.Table, image_sizes: Sequence[int]) -> bytes:
    """A shard file: ``table`` in row groups bounded by count and image bytes."""
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, SHARD_SCHEMA, compression=SHARD_COMPRESSION) as parquet:
        for start, stop in row_group_bounds(image_sizes):
            parquet.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    return buffer.getvalue()
