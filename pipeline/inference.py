"""Batch inference: :func:`run_inference`, a small scheduler over one distributor contract.

The scheduler (:class:`InferenceRun`, in the driver) decides what runs and what a failure means; a
distributor (``pipeline.distributors``: Ray actors on a cluster, or this process) runs shards on
:class:`~pipeline.worker.ShardWorker` s and reports each attempt. Its steps:

- **plan** (on the dataset, opened once before the workers start): check the output bucket, read
  the model once for its id, claim the output for this model and its row-changing settings
  (:func:`output_identity`; another model's output is refused before anything under it changes, or
  deleted first with ``replace``), queue the shards outside the previous manifest's ledger that are
  not committed (``OutputStore.plan``: the cost follows the new shards, not the history), write the
  ``running`` manifest;
- **start** (beside the plan, on a thread of its own): the distributor's workers, at most one per
  shard, whose processes start, import and load the model while the plan runs;
- **submit**: keep every worker busy with up to two shards (one on the device, one being fetched
  or written);
- **handle_result**: count a committed (or meanwhile committed: skipped) shard;
- **handle_worker_death**: a worker process died (killed, node lost): replace it and requeue the
  shard, up to ``max_shard_attempts`` attempts per shard;
- **handle_task_error**: storage still failing after its own retries → requeue (same limit); a
  deterministic error (an unreadable Parquet file, say) → the shard is failed at once and the run
  finishes the others;
- **write_manifest**: every few seconds while running, and at the end with the states of this run's
  shards, the ledger (every shard accounted for, totals) and a pointer to the previous run's.

Exactly once: the plan skips committed shards, workers commit a shard only after writing both of
its files (and skip it if it was committed meanwhile), and a retried shard overwrites whatever
partial files a lost attempt left. A driver that dies leaves committed shards committed: the next
run continues from them.

One run per output at a time: :meth:`InferenceRun.run` holds the output's lease
(``OUT_URI/_lease.json``, ``pipeline.lease``); a second run waits ``spec.lease_wait_s`` for it or
is refused naming the holder, and a run whose lease is lost submits no more shards and fails.
"""

from __future__ import annotations

import logging
import platform
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import storage
from .dataset import Dataset, ShardInfo, class_mismatch, open_dataset
from .decode import DEFAULT_MAX_PIXELS
from .distributors import Completion, Distributor, ShardFailure, prepare_distributor, start_distributor
from .jobs import InferenceSpec
from .lease import Lease, lease_uri
from .outputs import Ledger, OutputIdentity, OutputStore
from .worker import ShardResult, model_id_of

log = logging.getLogger(__name__)

MANIFEST_INTERVAL_S = 5.0  # the running manifest's refresh period
WAIT_S = 1.0  # longest wait for a completion between progress reports
VERSIONED = ("torch", "torchvision", "ray", "pyarrow")
RECORD_FIELDS = ("run_id", "num_images", "num_detections", "num_errors", "timings", "node", "worker")


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


Progress = Callable[[RunSummary], None]


def run_inference(spec: InferenceSpec, *, progress: Progress | None = None) -> RunSummary:
    """Detect objects in every uncommitted shard of ``spec.data_uri``, writing to ``spec.out_uri``.
    ``progress`` is called with the summary so far about once a second."""
    return InferenceRun(spec, progress).run()


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def output_identity(spec: InferenceSpec, model_id: str) -> OutputIdentity:
    """What ``spec``'s output belongs to: the model and every setting that changes rows — the
    dataset, the score threshold, reduced precision, the decoder's pixel cap (a constant, recorded
    so that a version that changes it is noticed). Not workers, batch size, device, threads or
    executor: they change how fast, not what (tests/test_worker.py checks batching)."""
    settings = {
        "data_uri": storage.redact(spec.data_uri),
        "score_threshold": spec.score_threshold,
        "amp": spec.amp,
        "max_pixels": DEFAULT_MAX_PIXELS,
    }
    return OutputIdentity(model_id, settings)


def warn_on_class_mismatch(checkpoint: bytes, dataset: Dataset) -> None:
    """Log a warning when the model's class names are not the labelled dataset's categories."""
    if not dataset.has_labels:
        return
    from detector.checkpoint import checkpoint_class_names

    try:
        names = checkpoint_class_names(checkpoint)
    except ValueError:  # not a checkpoint: the workers say so, naming the model
        return
    warning = class_mismatch(dict(enumerate(names)), dataset) if names else None
    if warning:
        log.warning(warning)


def check_output(spec: InferenceSpec) -> None:
    """Refuse ``spec`` (a ValueError naming both models and the differing settings) when its output
    belongs to another model or other settings; writes nothing. For callers that find nothing left
    to run and so never plan."""
    model_id = model_id_of(storage.read_bytes(spec.model_uri, spec.storage))
    OutputStore(spec.out_uri, spec.storage).check_identity(output_identity(spec, model_id))


class InferenceRun:
    """One run: plan, then submit and handle completions until no shard is left, then the final
    manifest. See the module docstring for the steps."""

    def __init__(self, spec: InferenceSpec, progress: Progress | None = None):
        self.spec = spec
        self.progress = progress
        self.run_id = new_run_id()
        self.store = OutputStore(spec.out_uri, spec.storage)
        self.queue: deque[ShardInfo] = deque()
        self.ledger = Ledger()  # the shards known committed: the previous manifest's, and this run's
        self.previous: str | None = None  # the previous run's final manifest (``_runs/<id>.json``)
        self.done: list[str] = []  # shards committed by this run
        self.attempts: dict[str, int] = {}
        self.started = time.perf_counter()
        self.last_manifest = time.monotonic()
        self.summary: RunSummary | None = None
        self.distributor: Distributor | None = None
        self.lease: Lease | None = None

    def run(self) -> RunSummary:
        """The whole run, holding the output's lease (``OUT_URI/_lease.json``) from before the plan
        to the final manifest; released also on error or interrupt."""
        what = f"inference of {storage.redact(self.spec.data_uri)}"
        lease = Lease(
            lease_uri(self.spec.out_uri),
            run_id=self.run_id,
            what=what,
            wait_s=self.spec.lease_wait_s,
            storage_options=self.spec.storage,
        )
        with lease:
            self.lease = lease
            dataset = open_dataset(self.spec.data_uri, self.spec.storage)
            starting = self.start_workers(len(dataset.shards))
            try:
                self.plan(dataset)
            except BaseException:
                starting.add_done_callback(lambda done: done.exception() or done.result().close())
                raise
            try:
                with starting.result() as distributor:
                    self.distributor = distributor
                    if self.queue:
                        self.schedule()
            except BaseException as exc:
                self.abandon(exc)
                raise
            return self.finish()

    def start_workers(self, num_shards: int) -> Future[Distributor]:
        """The distributor, started on a thread of its own: its worker processes start, import and
        load the model while the plan runs (at most one worker per shard of the dataset)."""
        prepare_distributor(self.spec)
        starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-workers")
        try:
            return starter.submit(start_distributor, self.spec, self.run_id, num_shards)
        finally:
            starter.shutdown(wait=False)

    # ------------------------------------------------------------------------------- steps

    def plan(self, dataset: Dataset) -> None:
        spec = self.spec
        storage.ensure_bucket(spec.out_uri, spec.storage)
        checkpoint = storage.read_bytes(spec.model_uri, spec.storage)  # fails fast on a missing model
        model_id = model_id_of(checkpoint)
        warn_on_class_mismatch(checkpoint, dataset)
        if spec.replace:
            self.store.clear()
        self.store.claim(output_identity(spec, model_id), run_id=self.run_id)
        plan = self.store.plan([shard.name for shard in dataset.shards])
        self.ledger, self.previous, pending = plan.ledger, plan.previous, set(plan.pending)
        self.queue = deque(shard for shard in dataset.shards if shard.name in pending)
        self.summary = RunSummary(
            self.run_id,
            storage.redact(dataset.uri),
            storage.redact(self.store.uri),
            model_id,
            shards_total=len(dataset.shards),
            shards_skipped=len(dataset.shards) - len(self.queue),
        )
        self.write_manifest("running")

    def schedule(self) -> None:
        self.submit()
        while self.distributor.in_flight:
            for completion in self.distributor.wait(WAIT_S):
                self.handle(completion)
            self.submit()
            self.report()

    def submit(self) -> None:
        """Fill the workers: up to two shards in flight each (the distributor knows its workers).
        A run whose lease was lost submits nothing more (:class:`~pipeline.lease.LeaseLost`)."""
        if self.lease is not None and self.queue and self.distributor.has_room():
            self.lease.verify()
        while self.queue and self.distributor.has_room():
            shard = self.queue.popleft()
            self.attempts[shard.name] = self.attempts.get(shard.name, 0) + 1
            self.distributor.submit(shard)

    def handle(self, completion: Completion) -> None:
        if completion.worker_died:
            self.handle_worker_death(completion)
        elif completion.failure is not None:
            self.handle_task_error(completion.shard, completion.failure)
        else:
            self.handle_result(completion.result)

    def handle_result(self, result: ShardResult) -> None:
        if result.skipped:  # committed by another run since the plan
            self.summary.shards_skipped += 1
            self.ledger.add(result.shard, self.store.records_of([result.shard]).get(result.shard, {}))
            return
        self.ledger.add(result.shard, asdict(result))
        self.done.append(result.shard)
        self.summary.shards_done += 1
        self.summary.images += result.num_images
        self.summary.errors += result.num_errors
        self.summary.detections += result.num_detections

    def handle_worker_death(self, completion: Completion) -> None:
        log.warning("a worker died while processing %s: %s", completion.shard.name, completion.failure.message)
        if self.distributor.replace_worker(completion.worker):
            self.summary.actor_restarts += 1
        self.retry_or_fail(completion.shard, completion.failure.message)

    def handle_task_error(self, shard: ShardInfo, failure: ShardFailure) -> None:
        if failure.retryable:
            log.warning("shard %s failed, will retry: %s", shard.name, failure.message)
            self.retry_or_fail(shard, failure.message)
            return
        self.summary.failed[shard.name] = failure.message
        log.error("shard %s failed: %s", shard.name, failure.message)

    def retry_or_fail(self, shard: ShardInfo, error: str) -> None:
        attempts = self.attempts[shard.name]
        if attempts < self.spec.max_shard_attempts:
            self.queue.appendleft(shard)
        else:
            self.summary.failed[shard.name] = f"gave up after {attempts} attempts: {error}"

    def report(self) -> None:
        self.summary.seconds = time.perf_counter() - self.started
        if self.progress is not None:
            self.progress(self.summary)
        if time.monotonic() - self.last_manifest > MANIFEST_INTERVAL_S:
            self.write_manifest("running")

    def write_manifest(self, state: str, *, final: bool = False) -> None:
        if self.lease is not None and final:  # the manifest belongs to the lease's holder
            self.lease.verify()
        elif self.lease is not None:
            self.lease.check()
        records = self.store.records_of(self.done) if final else None
        manifest = build_manifest(self.spec, self.summary, state=state, records=records, ledger=self.ledger)
        self.store.write_manifest({**manifest, "previous": self.previous})
        self.last_manifest = time.monotonic()

    def finish(self) -> RunSummary:
        self.summary.seconds = time.perf_counter() - self.started
        self.write_manifest("failed" if self.summary.failed else "finished", final=True)
        return self.summary

    def abandon(self, exc: BaseException) -> None:
        """The driver stops early (interrupted, refused by the cluster): say so in the manifest if
        storage lets us (and the output is still this run's)."""
        if self.lease is not None and self.lease.lost.is_set():
            return
        self.summary.seconds = time.perf_counter() - self.started
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
        manifest = build_manifest(self.spec, self.summary, state=state, ledger=self.ledger)
        manifest["previous"] = self.previous
        manifest["error"] = storage.redact(f"{type(exc).__name__}: {exc}", storage.secret_values(self.spec.storage))
        try:
            self.store.write_manifest(manifest)
        except Exception as write_error:  # noqa: BLE001 — the original error is the one to raise
            log.warning("could not record the stopped run in its manifest: %s", write_error)


# ------------------------------------------------------------------------------ manifest


def build_manifest(
    spec: InferenceSpec,
    summary: RunSummary,
    *,
    state: str,
    records: dict[str, dict[str, Any]] | None = None,
    ledger: Ledger | None = None,
) -> dict[str, Any]:
    """The run's ``_manifest.json``: ids, ``state`` (``running``, ``finished``, ``failed``: some
    shard failed, ``interrupted``: Ctrl-C or SIGTERM, ``stopped``: the driver stopped early on an
    error), the output's identity, the job's settings (no secrets: ``spec.public()``), versions, this
    run's summary; given the commit records of this run's shards, their states (and the failed
    ones'); given the ledger, it and its totals over every shard."""
    manifest = {
        "run_id": summary.run_id,
        "state": state,
        "data_uri": storage.redact(spec.data_uri),
        "model_uri": storage.redact(spec.model_uri),
        "model_id": summary.model_id,
        "identity": output_identity(spec, summary.model_id).to_json(),
        "settings": _settings(spec),
        "versions": _versions(),
        "this_run": summary.to_dict(),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if records is not None:
        manifest["shards"] = _shard_states(records, summary.failed)
    if ledger is not None:
        manifest["ledger"] = ledger.to_json()
        manifest["totals"] = dict(ledger.totals)
    return manifest


def _settings(spec: InferenceSpec) -> dict[str, Any]:
    """``spec.public()`` with its locations redacted (user info, signed query strings)."""
    public = spec.public()
    return {name: storage.redact(value) if name.endswith("_uri") else value for name, value in public.items()}


def _shard_states(committed: dict[str, dict[str, Any]], failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per shard: ``committed`` with its record's run, counts, timings and where it was done
    (``node``, ``worker``), or ``failed`` with the error."""
    shards = {
        name: {"state": "committed", **{key: record.get(key) for key in RECORD_FIELDS}}
        for name, record in sorted(committed.items())
    }
    for name, error in failed.items():
        shards[name] = {"state": "failed", "error": error}
    return shards


def _versions() -> dict[str, str | None]:
    """Versions of what computed the outputs (read from package metadata: no import of Ray)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
