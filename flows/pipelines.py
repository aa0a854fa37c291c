"""Prefect flows: the orchestration layer over ``pipeline/``.

Every flow takes one parameter, the job's spec (``pipeline.jobs``): built and validated once by the
CLI or by Prefect from a deployment's JSON, recorded by the Prefect server as the run's parameters
(secrets masked or referenced, never their values), and handed unchanged to the tasks, and through
them to Ray actors and Ray Train workers. The first thing a flow does is resolve the spec's storage
references on this process, the driver (``env:NAME`` from its environment, ``prefect-secret:NAME``
from a Prefect Secret block): the resolved values travel on as arguments.

Flows are thin: plan, call the data plane through tasks, log progress and a summary, record what was
produced as artifacts. The retry budget is in docs/design.md: tasks retry only after a failure that
another attempt can cure (storage still unreachable after its own retries, a cluster that is
(re)starting) and never after bad arguments or bad data, which fail the run at once naming the item.
Retrying is safe by construction: inference skips committed shards, training resumes from its latest
checkpoint, ingest and evaluate rewrite whole objects atomically.

    ingest_flow              COCO / image prefix / synthetic → dataset of Parquet shards
    train_flow               Ray Train DDP → checkpoints + model.pt in object storage
    inference_flow           uncommitted shards → detections (Ray actors), exactly once per shard
    evaluate_flow            committed detections vs ground truth → COCO metrics
    train_and_evaluate_flow  train_flow, inference over the validation dataset, evaluate_flow
    detect_new_images_flow   ingest only new images (by source URI), infer only uncommitted shards
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

from pipeline import storage
from pipeline.jobs import DetectNewSpec, EvaluateSpec, InferenceSpec, IngestSpec, JobSpec, TrainSpec

Spec = TypeVar("Spec", bound=JobSpec)
Progress = Callable[[Any], None] | None
# Seconds between task attempts after a transient failure (the storage layer has already retried
# for ~40 s by then). Tunable so tests do not wait minutes.
RETRY_DELAYS_S = tuple(float(s) for s in os.environ.get("DETECTFLOW_TASK_RETRY_DELAYS_S", "10,30").split(","))
LOG_EVERY_S = 10.0


class ShardsFailed(RuntimeError):
    """Raised by :func:`inference_flow` after the other shards are done; ``summary`` is the run's."""

    def __init__(self, summary: dict[str, Any]):
        names = ", ".join(sorted(summary["failed"]))
        super().__init__(f"{len(summary['failed'])} shards failed ({names}); the others are committed")
        self.summary = summary


def task_retry_can_help(exc: BaseException) -> bool:
    """Whether another attempt of a whole task may succeed: storage still failing after its own
    retries, a lost connection, a cluster that is (re)starting. Bad arguments, missing objects,
    bad data: no."""
    if isinstance(exc, storage.StorageError):
        return exc.transient
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    from ray.exceptions import RaySystemError  # ray.init raises it while the GCS is unreachable

    return isinstance(exc, RaySystemError)


def _retry_condition(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state carries the task's exception
        retry = task_retry_can_help(exc)
        # A retry is news (a warning); a final failure is the caller's to report (at the CLI: the
        # error line), so the run's log keeps it without printing it twice.
        get_run_logger().log(
            logging.WARNING if retry else logging.INFO,
            "%s: %s — %s",
            task_.name,
            storage.redact(str(exc)),
            "retrying" if retry else "not retried",
        )
        return retry
    return False


RETRYING = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": list(RETRY_DELAYS_S),
    "retry_condition_fn": _retry_condition,
    "cache_policy": NO_CACHE,
}


def _prefect_secret(kind: str, name: str) -> str:
    """Resolves ``prefect-secret:NAME`` storage references (see pipeline.storage_config)."""
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get())
    except ValueError as exc:
        raise KeyError(f"no Prefect Secret block {name!r}") from exc


def resolved(spec: Spec) -> Spec:
    """``spec`` with its storage references resolved on this process, the flow run's driver."""
    return spec.resolved(_prefect_secret)


def _short(uri: str) -> str:
    uri = storage.redact(uri).rstrip("/")
    return "/".join(uri.split("/")[-2:])


def _run_name(template: str) -> Callable[[], str]:
    """A flow-run name from the spec's fields, e.g. ``"infer {data_uri} → {out_uri}"``."""

    def name() -> str:
        spec = current_flow_run.parameters.get("spec") or {}
        if isinstance(spec, JobSpec):  # in-process calls pass the value itself
            spec = spec.public()
        if "inference" in spec:
            spec = {**spec["inference"], **spec}
        values = {k: _short(v) if isinstance(v, str) and ("/" in v or ":" in v) else v for k, v in spec.items()}
        return template.format_map(_Missing(values))

    return name


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def _throttled(log_line: Callable[[Any], str]) -> Callable[[Any], None]:
    logger = get_run_logger()
    last = [time.monotonic()]

    def log(value: Any) -> None:
        if time.monotonic() - last[0] >= LOG_EVERY_S:
            last[0] = time.monotonic()
            logger.info(log_line(value))

    return log


def _markdown_table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _link(uri: str) -> str:
    """A browsable form of a storage URI where one exists (local paths → file://)."""
    uri = storage.redact(storage.normalize(uri))
    if uri.startswith("gs://"):
        return "https://console.cloud.google.com/storage/browser/" + uri[len("gs://") :]
    return uri


# ------------------------------------------------------------------------------------- tasks


@task(name="ingest", **RETRYING)
def ingest_task(spec: IngestSpec) -> dict[str, Any]:
    from pipeline.ingest import ingest

    dataset = ingest(spec, progress=_throttled(lambda done: f"ingest: {done} images read"))
    return {
        "uri": storage.redact(dataset.uri),
        "images": dataset.num_images,
        "shards": len(dataset.shards),
        "categories": [c["name"] for c in dataset.categories],
        "counts": dict(dataset.counts),
        "rejected": dataset.rejected[:20],
        "invalid": dataset.invalid[:20],
        "cleaned": dataset.cleaned[:20],
    }


@task(name="count-images", **RETRYING)
def count_images_task(spec: IngestSpec) -> int:
    """Images in the dataset ``spec`` appends to; 0 when there is none yet."""
    from pipeline.dataset import descriptor_uri, open_dataset

    if not storage.exists(descriptor_uri(spec.out_uri), spec.storage):
        return 0
    return open_dataset(spec.out_uri, spec.storage).num_images


@task(name="pending-shards", **RETRYING)
def pending_shards_task(spec: InferenceSpec) -> list[str]:
    """Shards of the dataset without a commit record under the output: the work of the run (every
    shard when the run replaces the output). With none left, an output of another model or other
    settings is still refused here, not reported as done."""
    from pipeline.dataset import open_dataset
    from pipeline.inference import check_output
    from pipeline.outputs import OutputStore

    storage.ensure_bucket(spec.out_uri, spec.storage)  # the output's bucket before any input is read
    dataset = open_dataset(spec.data_uri, spec.storage)
    if spec.replace:
        return [s.name for s in dataset.shards]
    pending = OutputStore(spec.out_uri, spec.storage).plan([s.name for s in dataset.shards]).pending
    if not pending:
        check_output(spec)
    return pending


@task(name="infer", **RETRYING)
def infer_task(spec: InferenceSpec, on_progress: Progress = None) -> dict[str, Any]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from pipeline.inference import run_inference

    artifact_id = create_progress_artifact(0.0, description="shards committed (incl. earlier runs)")
    log = _throttled(
        lambda s: (
            f"infer: shards {s.shards_done + s.shards_skipped}/{s.shards_total}, {s.images} images "
            f"({s.errors} errors), {s.images_per_s:.1f} images/s"
        )
    )
    last = [0.0]

    def progress(summary: Any) -> None:
        log(summary)
        if on_progress is not None:
            on_progress(summary)
        if time.monotonic() - last[0] >= 2.0 and summary.shards_total:
            last[0] = time.monotonic()
            done = summary.shards_done + summary.shards_skipped
            update_progress_artifact(artifact_id, 100.0 * done / summary.shards_total)

    summary = run_inference(spec, progress=progress)
    done = summary.shards_done + summary.shards_skipped
    update_progress_artifact(artifact_id, 100.0 * done / max(1, summary.shards_total))
    return summary.to_dict()


@task(name="train", **RETRYING)
def train_task(spec: TrainSpec) -> dict[str, Any]:
    from pipeline.training import format_progress, latest_checkpoint, train
    from pipeline.training.recipe import describe_recipe

    if current_task_run.run_count > 1 and latest_checkpoint(spec.model_out_uri, spec.storage) is not None:
        spec = dataclasses.replace(spec, resume=True)  # a retried attempt continues from its predecessor
    logger = get_run_logger()  # captured here: progress arrives on a polling thread
    logger.info("recipe: %s", describe_recipe(spec))
    summary = train(spec, progress=lambda record: logger.info(format_progress(record)))
    return dataclasses.asdict(summary)


@task(name="evaluate", **RETRYING)
def evaluate_task(spec: EvaluateSpec) -> dict[str, Any]:
    from pipeline.evaluate import evaluate

    return evaluate(spec.data_uri, spec.out_uri, storage_options=spec.storage)


# ------------------------------------------------------------------------------------- flows


@flow(name="ingest", flow_run_name=_run_name("ingest-{source} → {out_uri}"))
def ingest_flow(spec: IngestSpec) -> dict[str, Any]:
    """Ingest images into a dataset of Parquet shards: a COCO dataset (``images_uri`` +
    ``annotations_uri``), every image under ``images_uri`` (``only_new``: append the ones not in
    the dataset yet), or ``num_images`` synthetic ones."""
    spec = resolved(spec)
    started = time.perf_counter()
    result = ingest_task(spec)
    result["seconds"] = time.perf_counter() - started
    counts = result["counts"]
    get_run_logger().info(
        "dataset %s: %d images in %d shards (%.1f s); rejected %d, undecodable %d, cleaned %d, skipped %d",
        result["uri"],
        result["images"],
        result["shards"],
        result["seconds"],
        *(counts.get(key, 0) for key in ("rejected", "invalid", "cleaned", "skipped")),
    )
    rows = [
        ("dataset", f"`{result['uri']}`"),
        ("source", spec.source),
        ("images", result["images"]),
        ("shards", result["shards"]),
        ("categories", ", ".join(result["categories"][:20]) or "—"),
        *((key, counts.get(key, 0)) for key in ("rejected", "invalid", "cleaned", "skipped")),
    ]
    create_markdown_artifact(_markdown_table(rows), key="ingest-summary", description=f"Dataset {result['uri']}")
    create_link_artifact(_link(storage.join(spec.out_uri, "dataset.json")), link_text="dataset.json", key="dataset")
    return result


@flow(name="inference", flow_run_name=_run_name("infer {data_uri} → {out_uri}"))
def inference_flow(spec: InferenceSpec, on_progress: Progress = None) -> dict[str, Any]:
    """Detect objects in every shard of ``spec.data_uri`` not yet committed under ``spec.out_uri``:
    Ray actors holding the model, outputs committed once per shard. Shards that failed are named
    in the result's ``failed`` and make the flow run fail after the others are done.
    ``on_progress`` (in-process callers only, e.g. the CLI's progress bar) gets the run summary
    after every shard."""
    spec = resolved(spec)
    logger = get_run_logger()
    pending = pending_shards_task(spec)
    if not pending:
        logger.info(
            "every shard of %s is committed under %s: nothing to do", _short(spec.data_uri), _short(spec.out_uri)
        )
        return {"shards_done": 0, "images": 0, "detections": 0, "errors": 0, "failed": {}, "out_uri": spec.out_uri}
    logger.info("%d shards to process", len(pending))
    summary = infer_task(spec, on_progress)
    logger.info(
        "%d images (%d errors), %d detections in %d shards (%d committed before) at %.1f images/s; outputs %s",
        *(summary[k] for k in ("images", "errors", "detections", "shards_done", "shards_skipped", "images_per_s")),
        summary["out_uri"],
    )
    _inference_artifacts(summary, spec)
    if summary["failed"]:
        raise ShardsFailed(summary)
    return summary


def _inference_artifacts(summary: dict[str, Any], spec: InferenceSpec) -> None:
    shards = (
        f"{summary['shards_done']} done, {summary['shards_skipped']} already committed, "
        f"{len(summary['failed'])} failed of {summary['shards_total']}"
    )
    rows = [
        ("run", f"`{summary['run_id']}`"),
        ("model", f"`{summary['model_id']}`"),
        ("dataset", f"`{summary['data_uri']}`"),
        ("outputs", f"`{summary['out_uri']}`"),
        ("shards", shards),
        ("images", f"{summary['images']} ({summary['errors']} errors)"),
        ("detections", summary["detections"]),
        ("throughput", f"{summary['images_per_s']:.1f} images/s over {summary['seconds']:.1f} s"),
        ("actor restarts", summary["actor_restarts"]),
        *((f"failed `{name}`", error) for name, error in sorted(summary["failed"].items())),
    ]
    create_markdown_artifact(
        _markdown_table(rows), key="inference-summary", description=f"Inference run {summary['run_id']}"
    )
    create_link_artifact(_link(storage.join(spec.out_uri, "_manifest.json")), link_text="run manifest", key="outputs")


@flow(name="train", flow_run_name=_run_name("train {preset} on {data_uri}"))
def train_flow(spec: TrainSpec) -> dict[str, Any]:
    """Train ``spec.preset`` with DDP on Ray Train; checkpoints, metrics.jsonl, loss_curves.png and
    the final model.pt land under ``spec.model_out_uri``."""
    spec = resolved(spec)
    summary = train_task(spec)
    get_run_logger().info(
        "%d steps (%.2f epochs) in %.0f s, %.1f images/s per worker (step alone %.1f); loss %.3f → %.3f; model %s",
        *(summary[k] for k in ("steps", "epochs_seen", "seconds", "end_to_end_images_per_s_per_worker")),
        summary["images_per_s_per_worker"],
        summary["first_loss"],
        summary["last_loss"],
        summary["model_uri"],
    )
    rows = [
        ("model", f"`{storage.redact(summary['model_uri'])}`"),
        ("preset", spec.preset),
        ("steps", f"{summary['steps']} ({summary['epochs_seen']:.2f} epochs)"),
        ("workers", spec.workers),
        ("loss", f"{summary['first_loss']:.3f} → {summary['last_loss']:.3f}"),
        ("images/s per worker", f"{summary['end_to_end_images_per_s_per_worker']:.1f}"),
        ("images/s per worker, step alone", f"{summary['images_per_s_per_worker']:.1f}"),
        ("restarts", summary["restarts"]),
        ("time", f"{summary['seconds']:.0f} s"),
    ]
    create_markdown_artifact(_markdown_table(rows), key="training-summary", description=f"Training of {spec.preset}")
    create_link_artifact(_link(summary["model_uri"]), link_text="model.pt", key="model")
    return summary


@flow(name="evaluate", flow_run_name=_run_name("evaluate {out_uri} against {data_uri}"))
def evaluate_flow(spec: EvaluateSpec) -> dict[str, Any]:
    """COCO metrics (AP, AP50, AP75, APs/m/l, AR) of the committed detections under ``spec.out_uri``
    against the ground truth of ``spec.data_uri``; writes metrics.json and pr_curve.png there."""
    from pipeline.evaluate import SUMMARY_NAMES, format_metrics

    spec = resolved(spec)
    metrics = evaluate_task(spec)
    get_run_logger().info("\n%s", format_metrics(metrics))
    create_markdown_artifact(
        _markdown_table([(name, f"{metrics[name]:.3f}") for name in SUMMARY_NAMES]),
        key="coco-metrics",
        description=f"COCO metrics of {_short(spec.out_uri)}",
    )
    create_table_artifact(
        [{"class": r["name"], "AP": round(r["AP"], 4), "AP50": round(r["AP50"], 4)} for r in metrics["per_class"]],
        key="per-class-ap",
        description="AP per class",
    )
    create_link_artifact(_link(storage.join(spec.out_uri, "metrics.json")), link_text="metrics.json", key="metrics")
    return metrics


@flow(name="train-and-evaluate", flow_run_name=_run_name("train {preset} on {data_uri}, evaluate on {val_uri}"))
def train_and_evaluate_flow(spec: TrainSpec) -> dict[str, Any]:
    """Train, detect over ``spec.val_uri`` with the new model (outputs under
    ``model_out_uri/validation/run-…``), and score it. Returns the training summary and metrics."""
    if not spec.val_uri:
        raise ValueError("train-and-evaluate needs val_uri: the labelled dataset to score the model on")
    spec = resolved(spec)
    trained = train_flow(spec)
    # outputs per flow run: a validation run of an earlier model under the same prefix never counts
    out = storage.join(spec.model_out_uri, "validation", f"run-{str(current_flow_run.id)[:8]}")
    common = {"out_uri": out, "storage": spec.storage}
    inference_flow(InferenceSpec(data_uri=spec.val_uri, model_uri=trained["model_uri"], cluster=spec.cluster, **common))
    metrics = evaluate_flow(EvaluateSpec(data_uri=spec.val_uri, **common))
    return {"training": trained, "metrics": {k: metrics[k] for k in ("AP", "AP50", "AP75")}}


@flow(name="detect-new-images", flow_run_name=_run_name("detect new images in {images_uri}"))
def detect_new_images_flow(spec: DetectNewSpec, on_progress: Progress = None) -> dict[str, Any]:
    """Incremental: append to the dataset only the images under ``spec.images_uri`` whose source it
    does not hold, then detect only in shards not committed under the output. Over an unchanged
    prefix it lists the prefix and does nothing else."""
    spec = resolved(spec)
    logger = get_run_logger()
    before = count_images_task(spec.ingest())
    dataset = ingest_flow(spec.ingest())
    new_images = dataset["images"] - before
    logger.info("%d new images under %s (dataset now %d)", new_images, _short(spec.images_uri), dataset["images"])
    summary = inference_flow(spec.inference, on_progress)
    return {"new_images": new_images, "images_processed": summary["images"], "inference": summary}
