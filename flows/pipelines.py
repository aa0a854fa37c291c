"""Prefect flows: the orchestration layer over ``pipeline/``.

Flows are thin. Each one validates its parameters (typed, so Prefect rejects bad ones before a run
starts), plans, calls the data plane through tasks, logs progress and a final summary, and records
what it produced as artifacts (a markdown table, and a link to the outputs). Tasks that touch storage
or the Ray cluster retry on *transient* failures only — a storage outage that outlived the storage
layer's own retries, a refused cluster connection — never on bad arguments or bad data, which fail
the run at once with the error that names the item.

Retrying is safe by construction: inference skips shards whose commit record exists, training
resumes from its latest checkpoint, ingest and evaluate rewrite whole objects atomically.

    ingest_flow              COCO / image prefix / synthetic → dataset of Parquet shards
    train_flow               Ray Train DDP → checkpoints + model.pt in object storage
    inference_flow           uncommitted shards → detections (Ray actors), exactly once per shard
    evaluate_flow            committed detections vs ground truth → COCO metrics
    train_and_evaluate_flow  train_flow, inference over a validation dataset, evaluate_flow
    detect_new_images_flow   ingest only new images (by source URI), infer only uncommitted shards
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

from pipeline import storage

StorageOptions = dict[str, Any] | None
# Seconds between task attempts after a transient failure (the storage layer has already retried
# for ~30 s by then). Tunable so tests do not wait minutes.
RETRY_DELAYS_S = [float(s) for s in os.environ.get("DETECTFLOW_TASK_RETRY_DELAYS_S", "10,30,60").split(",")]
LOG_EVERY_S = 10.0
# Set by the CLI to draw its progress bar from inference progress (the flow logs it either way); a
# module global, not a parameter: flow parameters must be JSON for the API.
progress_hook: Callable[[Any], None] | None = None


class ShardsFailed(RuntimeError):
    """Raised by :func:`inference_flow` after the other shards are done; ``summary`` is the run's."""

    def __init__(self, summary: dict[str, Any]):
        names = ", ".join(sorted(summary["failed"]))
        super().__init__(f"{len(summary['failed'])} shards failed ({names}); the others are committed")
        self.summary = summary


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt can help: storage still failing after its own retries, a lost
    connection, a timeout. Bad arguments, missing objects, bad data: no."""
    if isinstance(exc, storage.StorageError):
        return exc.transient
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:  # a cluster that is (re)starting: ray.init raises these while the GCS is unreachable
        from ray.exceptions import RaySystemError

        return isinstance(exc, RaySystemError)
    except ImportError:  # pragma: no cover - ray is a dependency
        return False


def _retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state carries the task's exception
        retry = is_transient(exc)
        get_run_logger().warning(
            "%s: %s — %s", task_.name, storage.redact(str(exc)), "retrying" if retry else "not retried"
        )
        return retry
    return False


RETRYING = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": _retry_if_transient,
    "cache_policy": NO_CACHE,
}


def _apply(storage_options: StorageOptions, *uris: str) -> None:
    """Storage options given as a flow parameter become the defaults of their protocols in this
    process (and are handed on to Ray actors by ``pipeline``). Credentials belong in the worker's
    environment (``AWS_*``) or a Prefect Secret, not in parameters, which the UI shows."""
    if storage_options:
        for protocol in {storage.protocol_of(u) for u in uris if u}:
            storage.set_default_storage_options(protocol, storage_options)


def _short(uri: str) -> str:
    uri = storage.redact(uri).rstrip("/")
    return "/".join(uri.split("/")[-2:])


def _run_name(template: str) -> Callable[[], str]:
    def name() -> str:
        params = current_flow_run.parameters
        values = {k: _short(v) if isinstance(v, str) and ("/" in v or ":" in v) else v for k, v in params.items()}
        return template.format_map(_Missing(values))

    return name


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def _throttled_logger(format_line: Callable[[Any], str]) -> Callable[[Any], None]:
    logger = get_run_logger()
    last = [time.monotonic()]

    def log(value: Any) -> None:
        if time.monotonic() - last[0] >= LOG_EVERY_S:
            last[0] = time.monotonic()
            logger.info(format_line(value))

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
    if uri.startswith("s3://") and not os.environ.get("AWS_ENDPOINT_URL"):
        return "https://s3.console.aws.amazon.com/s3/buckets/" + uri[len("s3://") :]
    return uri


# ------------------------------------------------------------------------------------- tasks


@task(name="ingest", **RETRYING)
def ingest_task(
    source: str,
    out_uri: str,
    images_uri: str | None,
    annotations_uri: str | None,
    num_images: int,
    seed: int,
    image_size: int,
    shard_size: int,
    only_new: bool,
) -> dict[str, Any]:
    from pipeline import ingest

    log = _throttled_logger(lambda done: f"ingest: {done} images read")
    if source == "coco":
        dataset = ingest.ingest_coco(images_uri, annotations_uri, out_uri, shard_size=shard_size, progress=log)
    elif source == "images":
        dataset = ingest.ingest_images(images_uri, out_uri, shard_size=shard_size, only_new=only_new, progress=log)
    else:
        dataset = ingest.ingest_synthetic(
            out_uri, num_images=num_images, seed=seed, image_size=image_size, shard_size=shard_size, progress=log
        )
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
def count_images_task(dataset_uri: str) -> int:
    """Images in the dataset at ``dataset_uri``; 0 when there is none yet."""
    from pipeline.dataset import descriptor_uri, open_dataset

    if not storage.exists(descriptor_uri(dataset_uri)):
        return 0
    return open_dataset(dataset_uri).num_images


@task(name="pending-shards", **RETRYING)
def pending_shards_task(data_uri: str, out_uri: str) -> list[str]:
    """Shards of the dataset without a commit record under ``out_uri``: the work of an inference run."""
    from pipeline.dataset import open_dataset
    from pipeline.outputs import OutputStore

    dataset = open_dataset(data_uri)
    committed = OutputStore(out_uri).committed_names() if storage.exists(out_uri) else set()
    return [s.name for s in dataset.shards if s.name not in committed]


@task(name="infer", **RETRYING)
def infer_task(
    data_uri: str,
    out_uri: str,
    model_uri: str,
    workers: int | None,
    batch_size: int,
    score_threshold: float | None,
    device: str,
    ray_address: str | None,
) -> dict[str, Any]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from pipeline.inference import run_inference

    artifact_id = create_progress_artifact(0.0, description="shards committed (incl. earlier runs)")
    log = _throttled_logger(
        lambda s: (
            f"infer: shards {s.shards_done + s.shards_skipped}/{s.shards_total}, {s.images} images "
            f"({s.errors} errors), {s.images_per_s:.1f} images/s"
        )
    )
    last = [0.0]

    def on_progress(summary: Any) -> None:
        log(summary)
        if progress_hook is not None:
            progress_hook(summary)
        if time.monotonic() - last[0] >= 2.0 and summary.shards_total:
            last[0] = time.monotonic()
            done = summary.shards_done + summary.shards_skipped
            update_progress_artifact(artifact_id, 100.0 * done / summary.shards_total)

    summary = run_inference(
        data_uri,
        out_uri,
        model_uri,
        workers=workers,
        batch_size=batch_size,
        score_threshold=score_threshold,
        device=device,
        ray_address=ray_address,
        progress=on_progress,
    )
    done = summary.shards_done + summary.shards_skipped
    update_progress_artifact(artifact_id, 100.0 * done / max(1, summary.shards_total))
    return summary.to_dict()


@task(name="train", **RETRYING)
def train_task(
    data_uri: str,
    model_out_uri: str,
    preset: str,
    num_classes: int | None,
    workers: int,
    epochs: int | None,
    steps: int | None,
    batch_size: int,
    lr: float,
    resume: bool,
    ray_address: str | None,
    checkpoint_every: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    from dataclasses import asdict

    from pipeline.training import format_progress, latest_checkpoint, train

    if current_task_run.run_count > 1 and latest_checkpoint(model_out_uri) is not None:
        resume = True  # a retried attempt continues from the checkpoint its predecessor wrote
    logger = get_run_logger()  # captured here: progress arrives on a polling thread
    summary = train(
        data_uri,
        model_out_uri,
        preset=preset,
        num_classes=num_classes,
        workers=workers,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        resume=resume,
        ray_address=ray_address,
        checkpoint_every=checkpoint_every,
        progress=lambda record: logger.info(format_progress(record)),
        **options,
    )
    return asdict(summary)


@task(name="evaluate", **RETRYING)
def evaluate_task(data_uri: str, out_uri: str) -> dict[str, Any]:
    from pipeline.evaluate import evaluate

    return evaluate(data_uri, out_uri)


# ------------------------------------------------------------------------------------- flows


@flow(name="ingest", flow_run_name=_run_name("ingest-{source} → {out_uri}"))
def ingest_flow(
    out_uri: str,
    source: Literal["coco", "images", "synthetic"] = "images",
    images_uri: str | None = None,
    annotations_uri: str | None = None,
    num_images: int = 256,
    seed: int = 0,
    image_size: int = 128,
    shard_size: int = 256,
    only_new: bool = False,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Ingest images into a dataset of Parquet shards: a COCO dataset (``images_uri`` +
    ``annotations_uri``), every image under ``images_uri`` (``only_new``: append the ones not in the
    dataset yet), or ``num_images`` synthetic ones."""
    if source in ("coco", "images") and not images_uri:
        raise ValueError(f"source {source!r} needs images_uri")
    if source == "coco" and not annotations_uri:
        raise ValueError("source 'coco' needs annotations_uri (the instances JSON)")
    if num_images < 1 or shard_size < 1 or image_size < 16:
        raise ValueError("num_images and shard_size must be ≥ 1, image_size ≥ 16")
    _apply(storage_options, out_uri, images_uri or "", annotations_uri or "")
    logger = get_run_logger()
    started = time.perf_counter()
    result = ingest_task(
        source, out_uri, images_uri, annotations_uri, num_images, seed, image_size, shard_size, only_new
    )
    result["seconds"] = time.perf_counter() - started
    counts = result["counts"]
    logger.info(
        "dataset %s: %d images in %d shards (%.1f s); rejected %d, undecodable %d, cleaned %d, skipped %d",
        result["uri"],
        result["images"],
        result["shards"],
        result["seconds"],
        counts.get("rejected", 0),
        counts.get("invalid", 0),
        counts.get("cleaned", 0),
        counts.get("skipped", 0),
    )
    create_markdown_artifact(
        _markdown_table(
            [
                ("dataset", f"`{result['uri']}`"),
                ("source", source),
                ("images", result["images"]),
                ("shards", result["shards"]),
                ("categories", ", ".join(result["categories"][:20]) or "—"),
                *((key, counts.get(key, 0)) for key in ("rejected", "invalid", "cleaned", "skipped")),
            ]
        ),
        key="ingest-summary",
        description=f"Dataset {result['uri']}",
    )
    create_link_artifact(_link(storage.join(out_uri, "dataset.json")), link_text="dataset.json", key="dataset")
    return result


@flow(name="inference", flow_run_name=_run_name("infer {data_uri} → {out_uri}"))
def inference_flow(
    data_uri: str,
    out_uri: str,
    model_uri: str,
    workers: int | None = None,
    batch_size: int = 8,
    score_threshold: float | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    ray_address: str | None = None,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Detect objects in every shard of ``data_uri`` not yet committed under ``out_uri``: Ray actors
    holding the model, outputs committed once per shard. Shards that failed are named in the
    result's ``failed`` and make the flow run fail after the others are done."""
    if batch_size < 1 or (workers is not None and workers < 1):
        raise ValueError("batch_size and workers must be ≥ 1")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be within [0, 1], not {score_threshold}")
    _apply(storage_options, data_uri, out_uri, model_uri)
    logger = get_run_logger()
    pending = pending_shards_task(data_uri, out_uri)
    if not pending:
        logger.info("every shard of %s is committed under %s: nothing to do", _short(data_uri), _short(out_uri))
        return {"shards_done": 0, "images": 0, "detections": 0, "errors": 0, "failed": {}, "out_uri": out_uri}
    logger.info("%d shards to process", len(pending))
    summary = infer_task(data_uri, out_uri, model_uri, workers, batch_size, score_threshold, device, ray_address)
    logger.info(
        "%d images (%d errors), %d detections in %d shards (%d committed before) at %.1f images/s; outputs %s",
        summary["images"],
        summary["errors"],
        summary["detections"],
        summary["shards_done"],
        summary["shards_skipped"],
        summary["images_per_s"],
        summary["out_uri"],
    )
    create_markdown_artifact(
        _markdown_table(
            [
                ("run", f"`{summary['run_id']}`"),
                ("model", f"`{summary['model_id']}`"),
                ("dataset", f"`{summary['data_uri']}`"),
                ("outputs", f"`{summary['out_uri']}`"),
                (
                    "shards",
                    f"{summary['shards_done']} done, {summary['shards_skipped']} already committed, "
                    f"{len(summary['failed'])} failed of {summary['shards_total']}",
                ),
                ("images", f"{summary['images']} ({summary['errors']} errors)"),
                ("detections", summary["detections"]),
                ("throughput", f"{summary['images_per_s']:.1f} images/s over {summary['seconds']:.1f} s"),
                ("actor restarts", summary["actor_restarts"]),
                *((f"failed `{name}`", error) for name, error in sorted(summary["failed"].items())),
            ]
        ),
        key="inference-summary",
        description=f"Inference run {summary['run_id']}",
    )
    create_link_artifact(_link(storage.join(out_uri, "_manifest.json")), link_text="run manifest", key="outputs")
    if summary["failed"]:
        raise ShardsFailed(summary)
    return summary


@flow(name="train", flow_run_name=_run_name("train {preset} on {data_uri}"))
def train_flow(
    data_uri: str,
    model_out_uri: str,
    preset: str = "tiny",
    num_classes: int | None = None,
    workers: int = 2,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 0.02,
    resume: bool = False,
    ray_address: str | None = None,
    checkpoint_every: int = 100,
    options: dict[str, Any] | None = None,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Train ``preset`` with DDP on Ray Train; checkpoints, metrics.jsonl, loss_curves.png and the
    final model.pt land under ``model_out_uri``. ``options`` are further TrainConfig fields
    (warmup_steps, schedule, val_uri, val_every, target_ap50, …)."""
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    _apply(storage_options, data_uri, model_out_uri, *(v for v in (options or {}).values() if isinstance(v, str)))
    summary = train_task(
        data_uri,
        model_out_uri,
        preset,
        num_classes,
        workers,
        epochs,
        steps,
        batch_size,
        lr,
        resume,
        ray_address,
        checkpoint_every,
        dict(options or {}),
    )
    get_run_logger().info(
        "%d steps (%.2f epochs) in %.0f s, %.1f images/s per worker; loss %.3f → %.3f; model %s",
        summary["steps"],
        summary["epochs_seen"],
        summary["seconds"],
        summary["images_per_s_per_worker"],
        summary["first_loss"],
        summary["last_loss"],
        summary["model_uri"],
    )
    create_markdown_artifact(
        _markdown_table(
            [
                ("model", f"`{storage.redact(summary['model_uri'])}`"),
                ("preset", preset),
                ("steps", f"{summary['steps']} ({summary['epochs_seen']:.2f} epochs)"),
                ("workers", workers),
                ("loss", f"{summary['first_loss']:.3f} → {summary['last_loss']:.3f}"),
                ("images/s per worker", f"{summary['images_per_s_per_worker']:.1f}"),
                ("restarts", summary["restarts"]),
                ("time", f"{summary['seconds']:.0f} s"),
            ]
        ),
        key="training-summary",
        description=f"Training of {preset}",
    )
    create_link_artifact(_link(summary["model_uri"]), link_text="model.pt", key="model")
    return summary


@flow(name="evaluate", flow_run_name=_run_name("evaluate {out_uri} against {data_uri}"))
def evaluate_flow(data_uri: str, out_uri: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """COCO metrics (AP, AP50, AP75, APs/m/l, AR) of the committed detections under ``out_uri``
    against the ground truth of ``data_uri``; writes metrics.json and pr_curve.png there."""
    from pipeline.evaluate import SUMMARY_NAMES, format_metrics

    _apply(storage_options, data_uri, out_uri)
    metrics = evaluate_task(data_uri, out_uri)
    get_run_logger().info("\n%s", format_metrics(metrics))
    create_markdown_artifact(
        _markdown_table([(name, f"{metrics[name]:.3f}") for name in SUMMARY_NAMES]),
        key="coco-metrics",
        description=f"COCO metrics of {_short(out_uri)}",
    )
    create_table_artifact(
        [{"class": r["name"], "AP": round(r["AP"], 4), "AP50": round(r["AP50"], 4)} for r in metrics["per_class"]],
        key="per-class-ap",
        description="AP per class",
    )
    create_link_artifact(_link(storage.join(out_uri, "metrics.json")), link_text="metrics.json", key="metrics")
    return metrics


@flow(name="train-and-evaluate", flow_run_name=_run_name("train {preset} on {data_uri}, evaluate on {val_uri}"))
def train_and_evaluate_flow(
    data_uri: str,
    val_uri: str,
    model_out_uri: str,
    preset: str = "tiny",
    workers: int = 2,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 0.02,
    checkpoint_every: int = 100,
    options: dict[str, Any] | None = None,
    ray_address: str | None = None,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Train, detect over the validation dataset with the new model (outputs under
    ``model_out_uri/validation``), and score it. Returns the training summary and the metrics."""
    trained = train_flow(
        data_uri,
        model_out_uri,
        preset=preset,
        workers=workers,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        checkpoint_every=checkpoint_every,
        options=options,
        ray_address=ray_address,
        storage_options=storage_options,
    )
    # outputs per flow run: a validation run of an earlier model under the same prefix never counts
    out = storage.join(model_out_uri, "validation", f"run-{str(current_flow_run.id)[:8]}")
    inference_flow(val_uri, out, trained["model_uri"], ray_address=ray_address, storage_options=storage_options)
    metrics = evaluate_flow(val_uri, out, storage_options=storage_options)
    return {"training": trained, "metrics": {k: metrics[k] for k in ("AP", "AP50", "AP75")}}


@flow(name="detect-new-images", flow_run_name=_run_name("detect new images in {images_uri}"))
def detect_new_images_flow(
    images_uri: str,
    dataset_uri: str,
    out_uri: str,
    model_uri: str,
    shard_size: int = 256,
    workers: int | None = None,
    batch_size: int = 8,
    score_threshold: float | None = None,
    ray_address: str | None = None,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Incremental: append to ``dataset_uri`` only the images under ``images_uri`` whose source it
    does not hold, then detect only in shards not committed under ``out_uri``. Over an unchanged
    prefix it lists the prefix and does nothing else."""
    _apply(storage_options, images_uri, dataset_uri, out_uri, model_uri)
    logger = get_run_logger()
    before = count_images_task(dataset_uri)
    dataset = ingest_flow(dataset_uri, source="images", images_uri=images_uri, shard_size=shard_size, only_new=True)
    new_images = dataset["images"] - before
    logger.info("%d new images under %s (dataset now %d)", new_images, _short(images_uri), dataset["images"])
    summary = inference_flow(
        dataset_uri,
        out_uri,
        model_uri,
        workers=workers,
        batch_size=batch_size,
        score_threshold=score_threshold,
        ray_address=ray_address,
    )
    return {"new_images": new_images, "images_processed": summary["images"], "inference": summary}
