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
    _identity.json               what the output belongs to: one model (its id) and the settings that
                                 change rows (see "Identity" below)
    _manifest.json               the latest run: ids, settings, versions, its shards' states, the
                                 ledger (every shard accounted for, as ranges; totals) and a pointer
                                 to the previous run's final manifest
    _runs/<run_id>.json          each run's final manifest, kept: the chain of ``previous`` pointers

Commit protocol:

1. A worker writes ``detections/<shard>.parquet``, then ``images/<shard>.parquet`` (each atomically;
   the names are deterministic, so a rewrite replaces, never adds), *then* ``_commits/<shard>.json``.
   ``clear`` removes them in the reverse order (commit records, images, detections). Raw readers
   (DuckDB, Polars, Spark over the folders) that list ``images/`` first and ``detections/`` second
   therefore see every shard of the first listing in the second, each file whole.
2. A shard is committed iff its commit record exists. Readers (``query``, ``evaluate``) read the
   files of committed shards only, so a half-written shard is invisible.
3. A run skips committed shards and (re)writes the others from scratch, overwriting any partial
   files. Each image therefore appears exactly once in ``images`` whatever happened before: killed
   workers, killed drivers, storage outages, re-runs.
4. A committed shard is never rewritten: a run leaves it out of its plan, and the worker checks
   again right before it starts a shard (``ShardWorker.process``). ``write_shard`` itself always
   writes: the shards it is given are the uncommitted ones.

Ledger (what lets a nightly run cost what is new): a manifest carries the :class:`Ledger` of the
shards known committed — ranges of shard numbers, so it stays a few bytes whatever the history —
and totals over them. A run plans from it (:meth:`OutputStore.plan`): one listing of the record
names says what is committed, and only records the ledger does not hold yet are read (committed by
a run that died before its final manifest: adopted into the ledger), so the plan costs the new
shards plus a listing request per 1,000 shards, not a read of every record. Commit records stay the
truth: a shard is committed iff its record exists; a ledger naming a shard whose record is gone
(deleted by hand to have the shard redone) is rebuilt from the records.

Identity: an output prefix holds the detections of one model and one set of row-changing settings
(:class:`OutputIdentity`; ``pipeline.inference.output_identity`` says which settings). The first
run records it in ``_identity.json``, written only if absent (``storage.write_bytes_if_absent``),
so that of two runs starting at once exactly one claims the output. A run whose identity differs
is refused before it changes anything (:meth:`OutputStore.claim`); rewriting the output for another
model is an explicit :meth:`OutputStore.clear` first (``--replace``). An output written before
identities were recorded (commit records but no ``_identity.json``) belongs to the model id of its
commit records, its settings unknown; the first run of that model records its own settings.
"""

from __future__ import annotations

import bisect
import io
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .storage import StorageOptions

DETECTIONS = "detections"
IMAGES = "images"
COMMITS = "_commits"
MANIFEST = "_manifest.json"
RUNS = "_runs"
LEDGER_TOTALS = ("images", "detections", "errors")
IDENTITY = "_identity.json"
IDENTITY_FORMAT = "detectflow.output-identity/1"
# What a replacing run deletes, in this order: the manifest and its ledger first (the ledger must
# never name a shard whose record is gone), then the commit records, so that a reader never sees a
# committed shard whose files are gone; the identity last.
REPLACED = (MANIFEST, RUNS, COMMITS, IMAGES, DETECTIONS, "metrics.json", "pr_curve.png", IDENTITY)

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


FINAL_STATES = ("finished", "failed")


def run_path(run_id: str) -> str:
    """Where a run's final manifest is kept, relative to the output: ``_runs/<run_id>.json``."""
    return f"{RUNS}/{run_id}.json"


def to_parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a zstd-compressed Parquet file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass(frozen=True)
class OutputIdentity:
    """What an output prefix belongs to: the model (``model_id``, the sha256 prefix of its
    checkpoint) and the settings that change rows, by name. ``settings`` is None for an output
    written before identities were recorded: only its model is known."""

    model_id: str
    settings: dict[str, Any] | None

    def differences(self, other: OutputIdentity) -> dict[str, tuple[Any, Any]]:
        """Name → (this value, ``other``'s value) of what differs; settings count only when both
        are known."""
        differ = {"model_id": (self.model_id, other.model_id)} if self.model_id != other.model_id else {}
        if self.settings is not None and other.settings is not None:
            for name in sorted(set(self.settings) | set(other.settings)):
                mine, theirs = self.settings.get(name), other.settings.get(name)
                if mine != theirs:
                    differ[name] = (mine, theirs)
        return differ

    def to_json(self) -> dict[str, Any]:
        return {"format": IDENTITY_FORMAT, "model_id": self.model_id, "settings": self.settings}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> OutputIdentity:
        return cls(value["model_id"], value.get("settings"))


@dataclass
class Ledger:
    """The shards an output's manifest accounts for: ``ranges`` of shard numbers (``shard-00012``
    → 12; ``[[0, 3905]]`` for 3,906 shards, inclusive), ``others`` for names of another form, and
    totals over them (``shards_committed``, ``images``, ``detections``, ``errors``)."""

    ranges: list[list[int]] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: {"shards_committed": 0, **dict.fromkeys(LEDGER_TOTALS, 0)})

    def __contains__(self, name: str) -> bool:
        number = _shard_number(name)
        if number is None:
            return name in self.others
        at = bisect.bisect_right(self.ranges, [number, float("inf")]) - 1
        return at >= 0 and self.ranges[at][0] <= number <= self.ranges[at][1]

    def add(self, name: str, record: dict[str, Any]) -> None:
        """Account for committed shard ``name`` with its record's counts (once)."""
        if name in self:
            return
        number = _shard_number(name)
        if number is None:
            self.others.append(name)
        else:
            at = bisect.bisect_left(self.ranges, [number, number])
            self.ranges.insert(at, [number, number])
            self.ranges = _merged(self.ranges)
        self.totals["shards_committed"] += 1
        for key in LEDGER_TOTALS:
            self.totals[key] += int(record.get(f"num_{key}", 0) or 0)

    def to_json(self) -> dict[str, Any]:
        return {"ranges": self.ranges, "others": self.others, "totals": dict(self.totals)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Ledger:
        return cls([list(r) for r in value["ranges"]], list(value.get("others", [])), dict(value["totals"]))


def _shard_number(name: str) -> int | None:
    digits = name[len("shard-") :] if name.startswith("shard-") else ""
    return int(digits) if digits.isdigit() else None


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for low, high in ranges:
        if out and low <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return out


@dataclass
class Plan:
    """What a run has to do (:meth:`OutputStore.plan`): the ``pending`` shards, the ``ledger``
    (the previous one plus shards found committed meanwhile) and ``previous``, the path (relative
    to the output) of the last final manifest, if any."""

    pending: list[str]
    ledger: Ledger
    previous: str | None


def _refusal(uri: str, differences: dict[str, tuple[Any, Any]]) -> str:
    listed = "; ".join(
        f"{name} {mine!r} (output) vs {theirs!r} (this run)" for name, (mine, theirs) in differences.items()
    )
    return (
        f"{storage.redact(uri)} holds the detections of another model or other settings: {listed}. "
        "An output prefix holds one model and one set of settings: write to a new output prefix, or pass "
        "--replace (spec replace=true) to delete these outputs and rewrite them from scratch"
    )


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
        """Commit records of the committed shards, by shard name (every record: O(all shards);
        the run's plan uses :meth:`plan` instead). A record deleted between the listing and its
        read is left out, as :meth:`records_of` does."""
        return self.records_of(self.committed_names())

    def records_of(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The commit records of those of ``names`` that are committed (a read per name)."""
        names = sorted(set(names))

        def read(name: str) -> dict[str, Any] | None:
            try:
                return storage.read_json(self.commit_uri(name), self.storage_options)
            except storage.StorageError as exc:
                if exc.reason == storage.NOT_FOUND:
                    return None
                raise

        with ThreadPoolExecutor(max_workers=8) as pool:
            return {name: record for name, record in zip(names, pool.map(read, names)) if record is not None}

    def plan(self, shards: Iterable[str]) -> Plan:
        """The shards of ``shards`` left to do and the ledger. Which shards are committed comes from
        one listing of ``_commits/`` (names only: a request per 1,000 shards); records are read
        only for committed shards the ledger does not hold yet (committed by a run that stopped
        before its final manifest). An output whose manifest has no ledger (none yet, or written by
        an older version), or whose ledger names a shard without a record (deleted by hand to have it
        redone), has every record read, once."""
        manifest = self.read_manifest() or {}
        previous = manifest.get("previous")
        if manifest.get("state") in FINAL_STATES:
            previous = run_path(manifest["run_id"])
        committed = self.committed_names()
        ledger = Ledger.from_json(manifest["ledger"]) if "ledger" in manifest else Ledger()
        held = {name for name in committed if name in ledger}
        if len(held) != ledger.totals["shards_committed"]:  # a held shard's record is gone: rebuild
            ledger, held = Ledger(), set()
        unaccounted = committed - held
        for name, record in sorted(self.records_of(unaccounted).items()):
            ledger.add(name, record)
        return Plan([name for name in shards if name not in committed], ledger, previous)

    def is_committed(self, shard: str) -> bool:
        """Whether ``shard``'s commit record exists."""
        return storage.exists(self.commit_uri(shard), self.storage_options)

    def write_shard(self, shard: str, images: pa.Table, detections: pa.Table, record: dict[str, Any]) -> None:
        """Write a shard's two files (replacing any partial ones), then commit it with ``record``
        plus the shard's name and row counts."""
        images = images.cast(IMAGES_SCHEMA)
        detections = detections.cast(DETECTIONS_SCHEMA)
        # detections before images (see the module docstring: what raw readers may rely on)
        storage.write_bytes(self.file_uri(DETECTIONS, shard), to_parquet_bytes(detections), self.storage_options)
        storage.write_bytes(self.file_uri(IMAGES, shard), to_parquet_bytes(images), self.storage_options)
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
        """Replace the run manifest (atomically); a final one (``finished``, ``failed``) is also
        kept as ``_runs/<run_id>.json``, where the next run's manifest points."""
        if manifest.get("state") in FINAL_STATES:
            storage.write_json(storage.join(self.uri, run_path(manifest["run_id"])), manifest, self.storage_options)
        storage.write_json(self.manifest_uri, manifest, self.storage_options)

    # ----------------------------------------------------------------------------- identity

    @property
    def identity_uri(self) -> str:
        return storage.join(self.uri, IDENTITY)

    def read_identity(self) -> OutputIdentity | None:
        """The output's identity: ``_identity.json``; else, for an output written before identities
        were recorded, the model id of its commit records (settings unknown); None for an output
        no run has claimed. An older output whose commit records name several models is refused."""
        if storage.exists(self.identity_uri, self.storage_options):
            return OutputIdentity.from_json(storage.read_json(self.identity_uri, self.storage_options))
        models = sorted({record.get("model_id") for record in self.committed_shards().values()} - {None})
        if len(models) > 1:
            raise ValueError(
                f"{storage.redact(self.uri)} already holds the detections of several models ({', '.join(models)}), "
                "written before output identities were recorded: write to a new output prefix, or pass --replace "
                "(spec replace=true) to delete these outputs and rewrite them from scratch"
            )
        return OutputIdentity(models[0], None) if models else None

    def check_identity(self, identity: OutputIdentity) -> OutputIdentity | None:
        """The recorded identity (None when unclaimed); a ValueError naming both models and every
        differing setting when it is not ``identity``. Writes nothing."""
        recorded = self.read_identity()
        if recorded is not None:
            differences = recorded.differences(identity)
            if differences:
                raise ValueError(_refusal(self.uri, differences))
        return recorded

    def claim(self, identity: OutputIdentity, *, run_id: str) -> None:
        """Make the output ``identity``'s, or refuse (:meth:`check_identity`) before any file under
        it changes. ``_identity.json`` is written only if absent: a run that loses the race to
        another run starting at the same moment is checked against the winner."""
        recorded = self.check_identity(identity)
        if recorded is not None and recorded.settings is not None:
            return
        record = {
            **identity.to_json(),
            "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        if storage.write_bytes_if_absent(self.identity_uri, data, self.storage_options) is None:
            self.check_identity(identity)

    def clear(self) -> None:
        """Delete the outputs (:data:`REPLACED`): the manifest and kept run manifests first (their
        ledger names committed shards), then commit records, so that no reader ever sees
        a committed shard whose files are gone, then images before detections (the reverse of
        their writing), the identity last. Other files under the prefix are left alone."""
        for name in REPLACED:
            storage.delete(storage.join(self.uri, name), self.storage_options)
