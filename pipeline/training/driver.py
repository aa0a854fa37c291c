"""The driver of a training job: check everything that can fail before a worker starts, connect to
the cluster, run the Ray Train workers (``loop``) with the progress sink drained into the log,
then draw the loss curves and summarise the run."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..cluster import check_locations, connect
from ..dataset import Dataset, open_dataset
from ..jobs import TrainSpec
from .checkpoints import FORMAT, latest_checkpoint, model_uri
from .loop import train_loop_per_worker
from .metrics import load_metrics, metrics_uri
from .plan import TrainPlan
from .plots import loss_curves_png
from .progress import Progress, WorkerStart, log_progress, poll_progress, progress_sink_class
from .stream import steps_per_epoch


@dataclass
class TrainSummary:
    """A finished run. ``restarts``: times the worker group was started again after a failure;
    ``worker_nodes``: rank → the Ray node id it last ran on; ``resumed_from``: the step each start
    of the worker group continued from (``[0]`` for a fresh run without failures). Speeds are
    medians over rank 0's steps (the first left out): ``images_per_s_per_worker`` of the step
    alone, ``end_to_end_images_per_s_per_worker`` with the wait for input included."""

    model_uri: str
    steps: int
    epochs_seen: float
    seconds: float
    first_loss: float
    last_loss: float
    images_per_s_per_worker: float
    end_to_end_images_per_s_per_worker: float
    restarts: int
    metrics_uri: str
    worker_nodes: dict[int, str] = field(default_factory=dict)
    resumed_from: list[int] = field(default_factory=list)


def preflight(spec: TrainSpec) -> tuple[Dataset, int]:
    """Every check that can fail before a worker starts; returns the dataset and the class count
    (with the background). Raises ``ValueError`` or ``StorageError`` naming the cause."""
    storage.ensure_bucket(spec.model_out_uri, spec.storage)
    dataset = _labelled(spec.data_uri, spec)
    classes = spec.num_classes or dataset.num_classes
    if classes < dataset.num_classes:
        raise ValueError(f"--num-classes {classes} is below the dataset's {dataset.num_classes} (with background)")
    if spec.val_uri is not None:
        _labelled(spec.val_uri, spec)
    existing = latest_checkpoint(spec.model_out_uri, spec.storage)
    if existing is None:
        return dataset, classes
    where = storage.redact(spec.model_out_uri)
    if not spec.resume:
        raise ValueError(f"{where} already holds checkpoints: pass --resume to continue, or choose another output")
    if existing.get("format") != FORMAT:
        raise ValueError(f"the checkpoints in {where} are not {FORMAT} checkpoints: choose another output")
    preset, recorded = existing["config"]["preset"], existing["plan"]["num_classes"]
    if preset != spec.preset or recorded != classes:
        raise ValueError(
            f"the checkpoint in {where} is of preset {preset!r} with {recorded} classes, "
            f"not {spec.preset!r} with {classes}"
        )
    optimizer = existing["config"].get("optimizer") or "sgd"  # checkpoints from before the choice: SGD
    if optimizer != spec.optimizer:
        raise ValueError(
            f"the checkpoint in {where} was trained with {optimizer}, not {spec.optimizer}: "
            f"resume with --optimizer {optimizer}"
        )
    return dataset, classes


def _labelled(uri: str, spec: TrainSpec) -> Dataset:
    dataset = open_dataset(uri, spec.storage)
    if not dataset.has_labels:
        raise ValueError(f"dataset {storage.redact(dataset.uri)} has no labels: training needs boxes (ingest coco)")
    return dataset


def train(spec: TrainSpec, *, progress: Progress | None = None) -> TrainSummary:
    """Run the training job ``spec`` on its Ray cluster with ``spec.workers`` DDP workers.

    ``progress`` gets rank 0's progress records (see ``progress``; default: this module's log).
    The caller resolves the storage references (``spec.resolved()``); resolving again here is a
    no-op that also covers library callers who did not."""
    spec = spec.resolved()
    dataset, classes = preflight(spec)
    info = connect(spec.cluster)
    check_locations(spec.uris(), spec.cluster, info)
    names = dataset.class_names + [f"class{i}" for i in range(dataset.num_classes, classes)]
    plan = TrainPlan(num_classes=classes, class_names=tuple(names), use_gpu=info.gpus >= spec.workers)
    started = time.perf_counter()
    starts = _fit(spec, plan, progress or log_progress)
    seconds = time.perf_counter() - started
    metrics = load_metrics(spec.model_out_uri, spec.storage)
    if not metrics:
        raise RuntimeError("training produced no metrics")
    png = loss_curves_png(metrics)
    storage.write_bytes(storage.join(spec.model_out_uri, "loss_curves.png"), png, spec.storage)
    later = metrics[1:] or metrics
    resumed_from = [start.step for start in starts if start.rank == 0]
    return TrainSummary(
        model_uri=model_uri(spec),
        steps=metrics[-1]["step"],
        epochs_seen=metrics[-1]["step"] / steps_per_epoch(dataset, spec.workers, spec.batch_size),
        seconds=seconds,
        first_loss=float(np.mean([m["loss"] for m in metrics[:5]])),
        last_loss=float(np.mean([m["loss"] for m in metrics[-5:]])),
        images_per_s_per_worker=float(np.median([m["images_per_s"] for m in later])),
        end_to_end_images_per_s_per_worker=float(
            np.median([m.get("end_to_end_images_per_s", m["images_per_s"]) for m in later])
        ),
        restarts=max(0, len(resumed_from) - 1),
        metrics_uri=metrics_uri(spec.model_out_uri),
        worker_nodes={start.rank: start.node_id for start in sorted(starts, key=lambda start: start.rank)},
        resumed_from=resumed_from,
    )


def _fit(spec: TrainSpec, plan: TrainPlan, report: Progress) -> list[WorkerStart]:
    """Run the workers to the end, their progress handed to ``report`` as it comes; the workers'
    starts, in order. Ray Train restarts the worker group up to ``spec.max_failures`` times."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sink = progress_sink_class().remote()
    run_dir = tempfile.mkdtemp(prefix="detectflow-raytrain-")  # Ray Train's own records; no checkpoints
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "plan": plan, "progress_sink": sink},
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=None if plan.use_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(
            name=f"detectflow-train-{int(time.time())}",
            storage_path=run_dir,
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
    )
    stop = threading.Event()
    poller = threading.Thread(target=poll_progress, args=(sink, report, stop), name="train-progress", daemon=True)
    poller.start()
    try:
        result = _fit_off_main_thread(trainer)
        starts = ray.get(sink.worker_starts.remote(), timeout=30)
    finally:
        stop.set()
        poller.join(timeout=30)
        ray.kill(sink)
        shutil.rmtree(run_dir, ignore_errors=True)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    return starts


def _fit_off_main_thread(trainer: Any) -> Any:
    """``trainer.fit()`` on a helper thread. On the main thread Ray Train replaces the process's
    SIGINT handler with its own (abort, then exit 0 or 1 with no word); here an interrupt reaches
    the caller as KeyboardInterrupt, and leaving Ray (``cluster.disconnect``) stops the run's
    actors. The last checkpoint stays: ``--resume`` continues from it."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
