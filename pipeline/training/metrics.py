"""``MODEL_OUT/metrics.jsonl``: one JSON record per step (``step``, ``epoch``, ``loss`` and its
terms, ``lr``, ``images_per_s`` of the step alone, ``end_to_end_images_per_s`` with the wait for
the batch included and that wait, ``input_wait_s``; ``val_AP``/``val_AP50`` at validation steps),
written by rank 0 with each checkpoint and at the end."""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from ..storage import StorageOptions


def metrics_uri(model_out_uri: str) -> str:
    return storage.join(model_out_uri, "metrics.jsonl")


def load_metrics(model_out_uri: str, storage_options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """The records written so far ([] when there are none)."""
    uri = metrics_uri(model_out_uri)
    if not storage.exists(uri, storage_options):
        return []
    text = storage.read_bytes(uri, storage_options).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_metrics(model_out_uri: str, records: list[dict[str, Any]], storage_options: StorageOptions | None) -> None:
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    storage.write_bytes(metrics_uri(model_out_uri), data, storage_options)
