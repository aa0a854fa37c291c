"""Distributors: how the inference scheduler's shards reach shard workers.

One contract (:class:`Distributor`), two implementations, the same per-shard worker
(:class:`~pipeline.worker.ShardWorker`) inside both — the shape of img2dataset's distributors:

- :class:`RayActors`: a pool of threaded Ray actors on the job's cluster, each holding a
  ``ShardWorker`` with the model resident (one GPU each when the cluster has GPUs and the job does
  not ask for the CPU). An actor that dies is replaced on request.
- :class:`LocalExecutor`: one ``ShardWorker`` in this process, fed by two threads; no Ray at all
  (a laptop, a debugger, a GPU box without a cluster).

Either way a worker holds up to :data:`IN_FLIGHT_PER_WORKER` shards at once: while one shard is on
the device, the other is fetched and decoded, or written. The scheduler (``pipeline.inference``)
decides what to run and when, and what to do about failures; a distributor only runs shards and
reports each as a :class:`Completion`. Errors of a shard come back as values
(:class:`ShardFailure`): Ray cannot carry every exception across processes.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from . import storage
from .dataset import ShardInfo
from .jobs import InferenceSpec
from .storage_config import secret_values
from .worker import ShardResult, ShardWorker

IN_FLIGHT_PER_WORKER = 2
ACTOR_PING_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ShardFailure:
    """Why a shard's attempt failed: ``message`` (redacted ``Type: message``), and whether another
    attempt is worth it (``retryable``: storage still failing after its own retries, or the worker
    process lost)."""

    message: str
    retryable: bool

    @classmethod
    def of(cls, exc: BaseException, secrets: set[str] | frozenset[str] = frozenset()) -> ShardFailure:
        retryable = isinstance(exc, storage.StorageError) and exc.transient
        return cls(storage.redact(f"{type(exc).__name__}: {exc}", secrets), retryable)


@dataclass(frozen=True)
class Completion:
    """A shard's attempt is over: it has a ``result``, or a ``failure``; ``worker_died`` says the
    worker process running it was lost (``worker``: which, as :meth:`Distributor.replace_worker`
    knows it)."""

    shard: ShardInfo
    worker: Hashable
    result: ShardResult | None = None
    failure: ShardFailure | None = None
    worker_died: bool = False


class Distributor(ABC):
    """Runs shards on workers. Use as a context manager: leaving it stops the workers."""

    @abstractmethod
    def has_room(self) -> bool:
        """Whether a worker can take another shard now."""

    @abstractmethod
    def submit(self, shard: ShardInfo) -> None:
        """Start ``shard`` on the least busy worker (call only when :meth:`has_room`)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Shards submitted and not yet reported."""

    @abstractmethod
    def wait(self, timeout_s: float) -> list[Completion]:
        """The attempts that ended, waiting up to ``timeout_s`` for one; ``[]`` on timeout."""

    @abstractmethod
    def replace_worker(self, worker: Hashable) -> bool:
        """After a ``worker_died`` completion: start a new worker in that one's place. False when
        there is nothing to replace (replaced already, after another of its shards reported)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the workers."""

    def __enter__(self) -> Distributor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_distributor(spec: InferenceSpec, run_id: str, num_shards: int) -> Distributor:
    """The distributor ``spec.executor`` names, its workers started for ``num_shards`` shards."""
    if spec.executor == "local":
        return LocalExecutor(spec, run_id)
    return RayActors.start(spec, run_id, num_shards)


def prepare_distributor(spec: InferenceSpec) -> None:
    """What must run on the caller's thread before :func:`start_distributor` may run on another:
    the Ray connection (a local cluster's processes die with the thread that starts them)."""
    if spec.executor == "ray":
        from .cluster import connect

        connect(spec.cluster)


def torch_threads(spec: InferenceSpec, device: str) -> int | None:
    """Torch threads of a Ray actor: the job's ``threads_per_worker``, else one per CPU actor (it
    asks Ray for that many CPUs) and torch's default on a GPU."""
    return spec.threads_per_worker or (1 if device == "cpu" else None)


# ------------------------------------------------------------------------------ in-process


class LocalExecutor(Distributor):
    """One :class:`ShardWorker` in this process; two threads call its ``process``, so one shard's
    fetch and write overlap another's detection (the worker's model lock serialises detection).
    ``spec.workers`` does not apply: there is one model, on this process's device."""

    WORKER = "local"

    def __init__(self, spec: InferenceSpec, run_id: str):
        self.worker = ShardWorker(spec, run_id=run_id)
        self.secrets = secret_values(spec.storage)
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT_PER_WORKER, thread_name_prefix="shard")
        self.futures: dict[Future, ShardInfo] = {}

    def has_room(self) -> bool:
        return len(self.futures) < IN_FLIGHT_PER_WORKER

    def submit(self, shard: ShardInfo) -> None:
        self.futures[self.pool.submit(self.worker.process, shard)] = shard

    @property
    def in_flight(self) -> int:
        return len(self.futures)

    def wait(self, timeout_s: float) -> list[Completion]:
        done, _ = wait_futures(list(self.futures), timeout=timeout_s, return_when=FIRST_COMPLETED)
        return [self._completion(future) for future in done]

    def _completion(self, future: Future) -> Completion:
        shard = self.futures.pop(future)
        error = future.exception()
        if error is not None:
            return Completion(shard, self.WORKER, failure=ShardFailure.of(error, self.secrets))
        return Completion(shard, self.WORKER, result=future.result())

    def replace_worker(self, worker: Hashable) -> bool:
        return False  # a worker in this process dies only with the driver

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ Ray actors


class RayActors(Distributor):
    """A pool of threaded Ray actors (``max_concurrency`` :data:`IN_FLIGHT_PER_WORKER`), each a
    :class:`ShardWorker` built from the job's spec. A worker is named ``(slot, generation)``: the
    generation changes when the slot's actor is replaced."""

    def __init__(self, spec: InferenceSpec, run_id: str, *, num_actors: int, device: str):
        threads = torch_threads(spec, device)
        self.actor_class = _actor_class()
        self.actor_options = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": threads or 1}
        self.actor_args = (spec, run_id, device)
        self.secrets = secret_values(spec.storage)
        self.actors = [self._new_actor() for _ in range(num_actors)]
        self.generations = [0] * num_actors
        self.tasks: dict[Any, tuple[int, int, ShardInfo]] = {}  # ObjectRef → slot, generation, shard

    @classmethod
    def start(cls, spec: InferenceSpec, run_id: str, num_shards: int) -> RayActors:
        """Connect to the job's cluster, check that its nodes can reach the job's locations, and
        start one actor per GPU (else one per ``threads_per_worker`` CPUs), at most ``spec.workers``
        and ``num_shards``. Raises ``ValueError`` when the cluster cannot run the job."""
        from .cluster import check_locations, connect

        info = connect(spec.cluster)
        use_gpu = info.gpus > 0 and spec.device != "cpu"
        if spec.device == "cuda" and not use_gpu:
            raise ValueError("device cuda asked for, but the Ray cluster has no GPUs")
        check_locations(spec.uris(), spec.cluster, info)
        device = "cuda" if use_gpu else "cpu"
        capacity = info.gpus if use_gpu else max(1, info.cpus // (torch_threads(spec, device) or 1))
        num_actors = max(1, min(spec.workers or capacity, num_shards))
        return cls(spec, run_id, num_actors=num_actors, device=device)

    def _new_actor(self) -> Any:
        return self.actor_class.options(**self.actor_options).remote(*self.actor_args)

    def _load(self, slot: int) -> int:
        return sum(1 for task_slot, _, _ in self.tasks.values() if task_slot == slot)

    def has_room(self) -> bool:
        return any(self._load(slot) < IN_FLIGHT_PER_WORKER for slot in range(len(self.actors)))

    def submit(self, shard: ShardInfo) -> None:
        slot = min(range(len(self.actors)), key=self._load)
        self.tasks[self.actors[slot].process.remote(shard)] = (slot, self.generations[slot], shard)

    @property
    def in_flight(self) -> int:
        return len(self.tasks)

    def wait(self, timeout_s: float) -> list[Completion]:
        import ray

        ready, _ = ray.wait(list(self.tasks), num_returns=1, timeout=timeout_s)
        return [self._completion(ref) for ref in ready]

    def _completion(self, ref: Any) -> Completion:
        import ray
        import ray.exceptions as rex

        slot, generation, shard = self.tasks.pop(ref)
        worker = (slot, generation)
        try:
            outcome = ray.get(ref)
        except (rex.RayActorError, rex.WorkerCrashedError, rex.ActorUnavailableError) as exc:
            failure = ShardFailure(f"worker lost ({type(exc).__name__})", retryable=True)
            return Completion(shard, worker, failure=failure, worker_died=True)
        except Exception as exc:  # noqa: BLE001 — Ray's own failures; the shard's come back as values
            return Completion(shard, worker, failure=ShardFailure.of(exc, self.secrets))
        if isinstance(outcome, ShardFailure):
            return Completion(shard, worker, failure=outcome)
        return Completion(shard, worker, result=outcome)

    def replace_worker(self, worker: Hashable) -> bool:
        import ray

        slot, generation = worker  # type: ignore[misc]
        if generation != self.generations[slot] or not _actor_dead(self.actors[slot]):
            return False
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.generations[slot] += 1
        return True

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _actor_dead(actor: Any) -> bool:
    """Whether the actor process is gone (it fails to answer at once if so)."""
    import ray

    try:
        ray.get(actor.pid.remote(), timeout=ACTOR_PING_TIMEOUT_S)
        return False
    except Exception:  # noqa: BLE001 — any failure to answer means it is gone or unusable
        return True


def _actor_class() -> Any:
    """The Ray actor class (defined on use: the in-process path never imports Ray)."""
    import ray

    @ray.remote(max_concurrency=IN_FLIGHT_PER_WORKER, max_restarts=0)
    class InferenceActor:
        """A :class:`ShardWorker` in a Ray actor process; the job's spec arrives whole, as an argument."""

        def __init__(self, spec: InferenceSpec, run_id: str, device: str):
            import torch

            threads = torch_threads(spec, device)
            if threads:
                torch.set_num_threads(threads)
            self.secrets = secret_values(spec.storage)
            node = ray.get_runtime_context().get_node_id()
            self.worker = ShardWorker(spec, run_id=run_id, node=node, device=device)

        def pid(self) -> int:
            return os.getpid()

        def process(self, shard: ShardInfo) -> ShardResult | ShardFailure:
            try:
                return self.worker.process(shard)
            except Exception as exc:  # noqa: BLE001 — returned as a value for the scheduler to judge
                return ShardFailure.of(exc, self.secrets)

    return InferenceActor
