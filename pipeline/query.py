"""SQL over inference outputs: DuckDB with views ``detections`` and ``images`` over the committed
output files only (a half-written shard is never visible).

Local files are handed to DuckDB's own Parquet reader as a list (no Python in the scan); files
elsewhere are read through fsspec (any URI the storage layer handles, S3 included) and handed to
DuckDB as Arrow datasets, which it scans lazily with projection and filter push-down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow.fs import FSSpecHandler, PyFileSystem

from . import storage
from .outputs import DETECTIONS, IMAGES, SCHEMAS, OutputStore
from .storage import StorageOptions


def open_views(out_uri: str, storage_options: StorageOptions | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``detections`` and ``images`` registered."""
    store = OutputStore(out_uri, storage_options)
    connection = duckdb.connect()
    for table in (DETECTIONS, IMAGES):
        files = store.committed_files(table)
        if files and storage.protocol_of(files[0]) == "file":  # DuckDB's own reader: no Python in the scan
            paths = [storage.filesystem(f)[1] for f in files]
            connection.read_parquet(paths).create_view(table)
            continue
        if files:
            fs, _ = storage.filesystem(files[0], storage_options)
            paths = [storage.filesystem(f, storage_options)[1] for f in files]
            source = pads.dataset(
                paths, schema=SCHEMAS[table], format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs))
            )
        else:
            source = SCHEMAS[table].empty_table()
        connection.register(table, source)
    return connection


def query(
    out_uri: str,
    sql: str,
    storage_options: StorageOptions | None = None,
    *,
    parameters: Sequence[Any] | None = None,
) -> pa.Table:
    """Run ``sql`` against the committed outputs at ``out_uri``; a bad query is a ``ValueError``.

    ``parameters`` fill the query's ``?`` placeholders (values are never spliced into the SQL).
    """
    connection = open_views(out_uri, storage_options)
    try:
        return connection.sql(sql, params=list(parameters) if parameters is not None else None).to_arrow_table()
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from exc
    finally:
        connection.close()
