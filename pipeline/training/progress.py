"""From the workers to the driver: progress records and where each worker runs.

A tiny actor (the *sink*) that the workers send to and the driver drains: the driver's log shows
the training progress wherever the workers run, without Ray's worker log forwarding. Rank 0 sends
a record every ``log_every`` steps, at validations and at the last step; every rank, when it
starts (again, after a failure), sends its Ray node id and the step it continues from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WorkerStart:
    """A worker started: its ``rank``, its Ray ``node_id``, the ``step`` it continues from."""

    rank: int
    node_id: str
    step: int


def progress_sink_class() -> Any:
    """The sink actor class (built on demand: importing this module does not import Ray)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class ProgressSink:
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self.starts: list[WorkerStart] = []

        def put(self, record: dict[str, Any]) -> None:
            self.records.append(record)

        def take(self) -> list[dict[str, Any]]:
            records, self.records = self.records, []
            return records

        def started(self, start: WorkerStart) -> None:
            self.starts.append(start)

        def worker_starts(self) -> list[WorkerStart]:
            return list(self.starts)

    return ProgressSink


def poll_progress(sink: Any, report: Progress, stop: threading.Event, interval_s: float = 2.0) -> None:
    """Hand the sink's records to ``report`` every ``interval_s`` until ``stop`` is set (then once
    more). Best effort: training goes on when progress cannot be had or ``report`` fails."""
    import ray

    while True:
        finished = stop.wait(interval_s)
        try:
            records = ray.get(sink.take.remote(), timeout=30)
        except Exception as error:
            log.debug("training progress unavailable: %s", error)
            records = []
        for record in records:
            try:
                report(record)
            except Exception:
                log.exception("training progress callback failed")
        if finished:
            return


def format_progress(record: dict[str, Any]) -> str:
    """One line for a progress record: step, loss, lr, speed and, when present, validation AP."""
    line = (
        f"step {record['step']}/{record['total']}  epoch {record['epoch']}  loss {record['loss']:.3f}  "
        f"lr {record['lr']:.4f}  {_speed(record)}"
    )
    if "val_AP50" in record:
        line += f"  validation AP50 {record['val_AP50']:.3f} AP {record['val_AP']:.3f}"
    return line


def _speed(record: dict[str, Any]) -> str:
    """images/s per worker end to end (input included), and of the step alone."""
    step = record["images_per_s"]
    end_to_end = record.get("end_to_end_images_per_s", step)
    return f"{end_to_end:.1f} images/s per worker (step alone {step:.1f})"


def log_progress(record: dict[str, Any]) -> None:
    log.info(format_progress(record))
