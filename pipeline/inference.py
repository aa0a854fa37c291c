"""Distributed batch inference: a pool of Ray actors, each wrapping a :class:`ShardWorker` with the
model resident on its device, fed shards dynamically by this driver.

Exactly once: the driver plans from the commit records (committed shards are skipped), workers
commit each shard only after writing both of its files, and a retried shard overwrites whatever
partial files a lost attempt left. Faults:

- an actor that dies (process killed, node lost) is replaced, and its shards go back to the queue,
  up to ``max_shard_attempts`` attempts per shard;
- a shard that fails for a deterministic reason (an unreadable Parquet file, say) is recorded as
  failed in the manifest with its error at once; the run finishes the other shards and reports it;
- a driver that dies leaves committed shards committed: the next run continues from them.

Each actor runs up to two shards at once (a threaded actor): while one is on the device, the next
is fetched and decoded, and outputs are written in the background.

Storage settings travel with the work: the driver's ``AWS_*`` environment and its default storage
options (the CLI's ``--storage-option``) are actor constructor arguments, so actors on a cluster
started elsewhere (``ray start``, a Ray job) reach the same store as the driver.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .dataset import open_dataset
from .outputs import OutputStore
from .storage import StorageOptions
from .worker import ShardTask, model_id_of, shard_tasks

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2
STORAGE_ENVIRONMENT_PREFIXES = ("AWS_",)


@dataclass
class RunSummary:
    run_id: str
    data_uri: str
    out_uri: str
    model_id: str
    shards_total: int
    shards_done: int = 0  # committed by this run
    shards_skipped: int = 0  # committed before this run
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    errors: int = 0
    detections: int = 0
    seconds: float = 0.0
    actor_restarts: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


Progress = Callable[[RunSummary], None] | None


def _actor_class():
    import ray

    @ray.remote(max_concurrency=IN_FLIGHT_PER_ACTOR, max_restarts=0)
    class InferenceActor:
        """A :class:`ShardWorker` in a Ray actor process."""

        def __init__(
            self,
            worker_kwargs: dict[str, Any],
            environment: dict[str, str],
            default_options: dict[str, dict[str, Any]],
        ):
            from .worker import ShardWorker

            # The driver's storage settings: an actor on a cluster started elsewhere (a Ray job, a
            # `ray start` head) does not inherit the driver's environment or its CLI options.
            os.environ.update(environment)
            for protocol, options in default_options.items():
                storage.set_default_storage_options(protocol, options)
            self.worker = ShardWorker(**worker_kwargs)

        def pid(self) -> int:
            return os.getpid()

        def process(self, name: str, uri: str) -> dict[str, Any]:
            return self.worker.process(ShardTask(name, uri)).to_dict()

    return InferenceActor


def connect(ray_address: str | None) -> None:
    """Connect to ``ray_address`` / ``RAY_ADDRESS`` (also set inside a Ray job), or start a local
    cluster."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address or os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False if not address else None,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )


def storage_environment() -> dict[str, str]:
    """The driver's storage settings in its environment (``AWS_*``: endpoint, region, credentials,
    profile), handed to the actors as constructor arguments — not ``runtime_env``, whose values
    the Ray dashboard shows."""
    return {name: value for name, value in os.environ.items() if name.startswith(STORAGE_ENVIRONMENT_PREFIXES)}


def _is_actor_death(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ActorUnavailableError))


def _is_retryable_task_error(exc: BaseException) -> bool:
    """A task error worth another attempt: storage still failing after its own retries."""
    cause = getattr(exc, "cause", None)
    return isinstance(cause, storage.StorageError) and cause.transient


def run_inference(
    data_uri: str,
    out_uri: str,
    model_uri: str,
    *,
    workers: int | None = None,
    batch_size: int = 8,
    score_threshold: float | None = None,
    device: str = "auto",
    amp: str = "auto",
    threads_per_worker: int | None = None,
    ray_address: str | None = None,
    max_shard_attempts: int = 3,
    storage_options: StorageOptions | None = None,
    progress: Progress = None,
    manifest_interval_s: float = 5.0,
) -> RunSummary:
    """Detect objects in every uncommitted shard of ``data_uri``, writing to ``out_uri``."""
    import ray

    started = time.perf_counter()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    dataset = open_dataset(data_uri, storage_options)
    storage.ensure_bucket(out_uri, storage_options)
    checkpoint = storage.read_bytes(model_uri, storage_options)  # fail fast on a missing model
    model_id = model_id_of(checkpoint)
    store = OutputStore(out_uri, storage_options)
    committed = store.committed_names()
    todo = deque(t for t in shard_tasks(dataset.shards) if t.name not in committed)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    summary = RunSummary(
        run_id,
        storage.redact(dataset.uri),
        storage.redact(store.uri),
        model_id,
        shards_total=len(dataset.shards),
        shards_skipped=len(dataset.shards) - len(todo),
    )
    settings = {
        "batch_size": batch_size,
        "score_threshold": score_threshold,
        "device": device,
        "amp": amp,
        "max_shard_attempts": max_shard_attempts,
    }
    manifest = _manifest(summary, data_uri, model_uri, settings, state="running")
    store.write_manifest(manifest)
    if not todo:
        summary.seconds = time.perf_counter() - started
        store.write_manifest(
            _manifest(summary, data_uri, model_uri, settings, state="finished", committed=store.committed_shards())
        )
        return summary

    connect(ray_address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    use_gpu = gpus > 0
    if device == "cuda" and not use_gpu:
        raise ValueError("--device cuda asked for, but the Ray cluster has no GPUs")
    capacity = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // (threads_per_worker or 1))
    num_actors = min(workers or capacity, len(todo))
    threads = threads_per_worker or (None if use_gpu else 1)
    worker_kwargs = {
        "model_uri": model_uri,
        "out_uri": out_uri,
        "run_id": run_id,
        "device": "cuda" if use_gpu else "cpu",
        "batch_size": batch_size,
        "score_threshold": score_threshold,
        "amp": amp,
        "torch_threads": threads,
        "storage_options": dict(storage_options) if storage_options else None,
    }
    actor_options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": threads or 1}
    actor_class = _actor_class()
    environment = storage_environment()
    default_options = storage.default_storage_options()

    def new_actor():
        return actor_class.options(**actor_options).remote(worker_kwargs, environment, default_options)

    actors = {index: new_actor() for index in range(num_actors)}
    in_flight: dict[Any, tuple[int, ShardTask]] = {}
    attempts: dict[str, int] = {}
    last_manifest = time.monotonic()

    def submit() -> None:
        for index, actor in actors.items():
            while todo and sum(1 for a, _ in in_flight.values() if a == index) < IN_FLIGHT_PER_ACTOR:
                task = todo.popleft()
                attempts[task.name] = attempts.get(task.name, 0) + 1
                in_flight[actor.process.remote(task.name, task.uri)] = (index, task)

    def retry_or_fail(task: ShardTask, error: str) -> None:
        if attempts[task.name] < max_shard_attempts:
            todo.appendleft(task)
        else:
            summary.failed[task.name] = f"gave up after {attempts[task.name]} attempts: {error}"

    try:
        submit()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                index, task = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 — classified below
                    if _is_actor_death(exc):
                        log.warning("actor %d died while processing %s: %s", index, task.name, type(exc).__name__)
                        if actors.get(index) is not None and _actor_dead(actors[index]):
                            ray.kill(actors[index], no_restart=True)
                            actors[index] = new_actor()
                            summary.actor_restarts += 1
                        retry_or_fail(task, type(exc).__name__)
                    elif _is_retryable_task_error(exc):
                        retry_or_fail(task, str(getattr(exc, "cause", exc)))
                    else:
                        cause = getattr(exc, "cause", None) or exc
                        summary.failed[task.name] = storage.redact(f"{type(cause).__name__}: {cause}")
                        log.error("shard %s failed: %s", task.name, summary.failed[task.name])
                    continue
                if not result["skipped"]:
                    summary.shards_done += 1
                    summary.images += result["num_images"]
                    summary.errors += result["num_errors"]
                    summary.detections += result["num_detections"]
                else:
                    summary.shards_skipped += 1
            submit()
            summary.seconds = time.perf_counter() - started
            if progress is not None:
                progress(summary)
            if time.monotonic() - last_manifest > manifest_interval_s:
                store.write_manifest(_manifest(summary, data_uri, model_uri, settings, state="running"))
                last_manifest = time.monotonic()
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
    summary.seconds = time.perf_counter() - started
    state = "failed" if summary.failed else "finished"
    store.write_manifest(
        _manifest(summary, data_uri, model_uri, settings, state=state, committed=store.committed_shards())
    )
    return summary


def _actor_dead(actor: Any) -> bool:
    """Whether the actor process is gone (a second call fails at once if so)."""
    import ray

    try:
        ray.get(actor.pid.remote(), timeout=10)
        return False
    except Exception:  # noqa: BLE001 — any failure to answer means it is gone or unusable
        return True


def _manifest(
    summary: RunSummary,
    data_uri: str,
    model_uri: str,
    settings: dict[str, Any],
    *,
    state: str,
    committed: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    import pyarrow
    import ray
    import torch
    import torchvision

    manifest = {
        "run_id": summary.run_id,
        "state": state,
        "data_uri": storage.redact(storage.normalize(data_uri)),
        "model_uri": storage.redact(model_uri),
        "model_id": summary.model_id,
        "settings": settings,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
        },
        "this_run": summary.to_dict(),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if committed is not None:
        manifest["shards"] = {
            name: {
                "state": "committed",
                **{k: record.get(k) for k in ("run_id", "num_images", "num_detections", "num_errors", "timings")},
            }
            for name, record in sorted(committed.items())
        }
        for name, error in summary.failed.items():
            manifest["shards"][name] = {"state": "failed", "error": error}
        manifest["totals"] = {
            "shards_committed": len(committed),
            "images": sum(r.get("num_images", 0) for r in committed.values()),
            "detections": sum(r.get("num_detections", 0) for r in committed.values()),
            "errors": sum(r.get("num_errors", 0) for r in committed.values()),
        }
    return manifest
