"""The ``detectflow`` command line (Typer). Commands validate their arguments at the edge, call the
data plane (``pipeline``) once, and print a summary. Errors are one clear line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from pipeline import storage
from pipeline.jobs import ClusterSpec, DetectNewSpec, EvaluateSpec, InferenceSpec, IngestSpec, TrainSpec
from pipeline.storage_config import StorageConfig

T = TypeVar("T")

app = typer.Typer(
    name="detectflow",
    help="Distributed batch object detection: ingest images into Parquet shards, train a Faster R-CNN "
    "on Ray, run batch inference, evaluate, query and look at the results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ingest_app = typer.Typer(
    help="Turn images in object storage into a dataset of Parquet image shards.", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")
server_app = typer.Typer(
    help="The local Prefect server that records detectflow's runs when no PREFECT_API_URL is configured.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show orchestration logs (Prefect, Ray) and tracebacks (also: DETECTFLOW_VERBOSE=1).",
        ),
    ] = False,
) -> None:
    from flows import console

    if verbose:
        os.environ["DETECTFLOW_VERBOSE"] = "1"
    console.configure(_verbose())


def _verbose() -> bool:
    return os.environ.get("DETECTFLOW_VERBOSE", "") not in ("", "0")


def _flows() -> Any:
    """``flows.pipelines``, imported after the Prefect API is settled: the user's (``PREFECT_API_URL``
    or profile), else the shared local server (started on first use; see flows.local_server), unless
    ``DETECTFLOW_LOCAL_SERVER=0`` asks for Prefect's own temporary server, one per command."""
    from flows import console, local_server

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # a temporary server's telemetry errors
    if local_server.configured_api_url() is None and os.environ.get("DETECTFLOW_LOCAL_SERVER") != "0":
        url = local_server.ensure(
            local_server.ServerPaths.default(), lambda line: typer.secho(line, fg=typer.colors.CYAN, err=True)
        )
        os.environ["PREFECT_API_URL"] = url
    import flows.pipelines as pipelines

    console.configure(_verbose())
    return pipelines


StorageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-S",
        help="fsspec storage option key=value for the object-store URIs of the command (repeatable), e.g. "
        "client_kwargs.endpoint_url=http://minio:9000, key=ID, secret=env:S3_SECRET (a secret may be given as "
        "env:NAME or prefect-secret:NAME; literal secrets are used but never recorded).",
    ),
]
RayAddress = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS or a local one).")
]
SharedFs = Annotated[
    bool,
    typer.Option(
        "--shared-fs",
        help="Local paths are on a filesystem every Ray node mounts (NFS, Lustre): allow them on a multi-node cluster.",
    ),
]
ShardSize = Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard.")]
Replace = Annotated[
    bool,
    typer.Option(
        "--replace",
        help="Delete what the output prefix holds and rewrite it from scratch (needed to write another model's "
        "or other settings' detections there: an output prefix holds one model and one set of settings).",
    ),
]
WaitForLease = Annotated[
    float,
    typer.Option(
        "--wait-for-lease",
        min=0.0,
        metavar="SECONDS",
        help="When another run holds what this one writes (an output, or a dataset being appended to or rewritten), "
        "wait up to this long for it to finish instead of stopping at once, naming it (a killed run's lease expires "
        "within a minute).",
    ),
]
ListingOption = Annotated[
    str,
    typer.Option(
        "--listing",
        help="full: list the whole prefix (default); after-last: list only paths sorting after the last one listed "
        "before (for date-partitioned prefixes such as incoming/2026/11/30/…; a file arriving under an earlier name is "
        "seen by the next full listing).",
    ),
]


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _storage(pairs: list[str] | None) -> StorageConfig:
    """The ``-S`` options of a command as the job's storage settings (secrets kept out of every
    record: see pipeline.storage_config)."""
    try:
        return StorageConfig.parse(pairs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--storage-option") from exc


def _cluster(ray_address: str | None, shared_fs: bool) -> ClusterSpec:
    return ClusterSpec(ray_address=ray_address, shared_filesystem=shared_fs, worker_logs=_verbose())


def _run(action: Callable[[], T], *, resume: str = "run the same command again to continue") -> T:
    """Run the command body (spec validation included). Expected failures become one line on stderr
    and exit code 1; anything else is one line too, with the traceback only under ``--verbose``. An
    interrupt (Ctrl-C, SIGTERM) leaves Ray and exits 130 with a line saying how to ``resume``."""
    try:
        return action()
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        _fail(f"error: {storage.redact(str(exc))}")
    except KeyboardInterrupt:
        from pipeline.cluster import disconnect

        disconnect()
        typer.secho(f"\ninterrupted: work already committed is kept; {resume}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a page of traceback
        _fail(f"error: {type(exc).__name__}: {storage.redact(str(exc))} (run with --verbose for the traceback)")


def _fail(line: str) -> NoReturn:
    if _verbose():
        traceback.print_exc()
    typer.secho(line, fg=typer.colors.RED, err=True)
    raise typer.Exit(1) from None


def _ingest(storage_option: list[str] | None, **fields: Any) -> None:
    """The ingest commands: build the spec (one line on a bad value), run the flow, print the summary."""
    options = _storage(storage_option)
    spec = _run(lambda: IngestSpec(storage=options, **fields))
    _print_dataset_summary(_run(lambda: _flows().ingest_flow(spec)))


def _print_dataset_summary(result: dict[str, Any]) -> None:
    typer.echo(f"dataset     {result['uri']}")
    typer.echo(f"images      {result['images']} in {result['shards']} shards ({result['seconds']:.1f} s)")
    categories = result["categories"]
    if categories:
        more = f" … (+{len(categories) - 10})" if len(categories) > 10 else ""
        typer.echo(f"categories  {len(categories)}: {', '.join(categories[:10])}{more}")
    counts = result["counts"]
    for key, title in (("rejected", "rejected"), ("invalid", "undecodable"), ("cleaned", "cleaned")):
        count = counts.get(key, 0)
        if count:
            typer.echo(f"{title:<11} {count}")
            for entry in result[key][:5]:
                typer.echo(f"  - {entry.get('input', entry.get('image_id'))}: {entry['reason']}")
            if count > 5:
                typer.echo(f"  … see {storage.join(result['uri'], 'dataset.json')}")
    if counts.get("skipped"):
        typer.echo(f"skipped     {counts['skipped']} files that are not images")


@ingest_app.command("coco")
def ingest_coco_command(
    out_uri: Annotated[str, typer.Argument(help="Where to write the dataset (URI or path).")],
    images: Annotated[str, typer.Option("--images", help="Folder/prefix holding the image files.")],
    annotations: Annotated[str, typer.Option("--annotations", help="COCO instances JSON.")],
    shard_size: ShardSize = 256,
    wait_for_lease: WaitForLease = 0.0,
    storage_option: StorageOption = None,
) -> None:
    """Ingest a COCO-format dataset (instances JSON + images) with its boxes and categories."""
    _ingest(
        storage_option,
        out_uri=out_uri,
        source="coco",
        images_uri=images,
        annotations_uri=annotations,
        shard_size=shard_size,
        lease_wait_s=wait_for_lease,
    )


@ingest_app.command("images")
def ingest_images_command(
    prefix_uri: Annotated[str, typer.Argument(help="Folder/prefix of image files (searched recursively).")],
    out_uri: Annotated[str, typer.Argument(help="Where to write the dataset.")],
    shard_size: ShardSize = 256,
    only_new: Annotated[
        bool, typer.Option("--only-new", help="Append only images whose source is not in the dataset yet.")
    ] = False,
    listing: ListingOption = "full",
    wait_for_lease: WaitForLease = 0.0,
    storage_option: StorageOption = None,
) -> None:
    """Ingest every image file under a prefix (jpg, png, webp, bmp, gif, tiff; any case), unlabelled."""
    _ingest(
        storage_option,
        out_uri=out_uri,
        source="images",
        images_uri=prefix_uri,
        shard_size=shard_size,
        only_new=only_new,
        listing=listing,
        lease_wait_s=wait_for_lease,
    )


@app.command("synth")
def synth_command(
    out_uri: Annotated[str, typer.Argument(help="Where to write the dataset.")],
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images to generate.")],
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed: same seed, same bytes.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Image side in pixels.")] = 128,
    shard_size: ShardSize = 256,
    wait_for_lease: WaitForLease = 0.0,
    storage_option: StorageOption = None,
) -> None:
    """Generate a synthetic dataset of simple shapes with exact boxes (deterministic by seed)."""
    _ingest(
        storage_option,
        out_uri=out_uri,
        source="synthetic",
        num_images=images,
        seed=seed,
        image_size=image_size,
        shard_size=shard_size,
        lease_wait_s=wait_for_lease,
    )


@app.command("query")
def query_command(
    out_uri: Annotated[str, typer.Argument(help="Outputs of an inference run.")],
    sql: Annotated[str, typer.Argument(help="SQL over the views `detections` and `images`.")],
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows to print in table format.")] = 50,
    storage_option: StorageOption = None,
) -> None:
    """Query committed outputs with DuckDB, e.g. "SELECT label_name, count(*) FROM detections GROUP BY 1"."""
    from pipeline.query import query

    options = _storage(storage_option).resolve()
    table = _run(lambda: query(out_uri, sql, options))
    if output_format is OutputFormat.json:
        typer.echo(json.dumps(table.to_pylist(), default=str, indent=2))
    elif output_format is OutputFormat.csv:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        _print_table(table, limit)


def _print_table(table: Any, limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(show_lines=False)
    for name in table.column_names:
        view.add_column(name)
    for row in table.slice(0, limit).to_pylist():
        view.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console()
    console.print(view)
    if table.num_rows > limit:
        console.print(f"… {table.num_rows - limit} more rows (use --limit or --format csv)")


@app.command("show")
def show_command(
    out_uri: Annotated[str, typer.Argument(help="Outputs of an inference run.")],
    image_ids: Annotated[
        list[str], typer.Option("--image-id", help="An image to draw (repeat it for a sheet of several).")
    ],
    out: Annotated[str, typer.Option("--out", help="PNG file (path or URI) to write.")],
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset holding the images (default: the run's).")
    ] = None,
    score_threshold: Annotated[
        float, typer.Option("--score-threshold", min=0.0, max=1.0, help="Draw boxes at least this sure.")
    ] = 0.5,
    columns: Annotated[int, typer.Option("--columns", min=1, help="Images per row of a sheet.")] = 4,
    storage_option: StorageOption = None,
) -> None:
    """Draw images with their detections (boxes, labels, scores) into a PNG; small images are enlarged."""
    from pipeline.show import render_sheet

    options = _storage(storage_option).resolve()
    drawn = _run(
        lambda: render_sheet(
            out_uri,
            image_ids,
            out,
            dataset_uri=dataset,
            score_threshold=score_threshold,
            columns=columns,
            storage_options=options,
        )
    )
    for image in drawn["images"]:
        typer.echo(f"drew {image['num_drawn']} detections of {image['image_id']} (shard {image['shard']})")
    typer.echo(f"wrote {storage.redact(out)}")


@app.command("evaluate")
def evaluate_command(
    data_uri: Annotated[str, typer.Argument(help="Labelled dataset (the ground truth).")],
    out_uri: Annotated[str, typer.Argument(help="Outputs of an inference run over it.")],
    storage_option: StorageOption = None,
) -> None:
    """COCO metrics (AP, AP50, AP75, APs/m/l, AR) of committed detections; writes metrics.json and pr_curve.png."""
    from pipeline.evaluate import format_metrics

    options = _storage(storage_option)
    spec = _run(lambda: EvaluateSpec(data_uri, out_uri, storage=options))
    metrics = _run(lambda: _flows().evaluate_flow(spec))
    typer.echo(format_metrics(metrics))
    typer.echo(f"\nwrote {storage.redact(storage.join(out_uri, 'metrics.json'))} and pr_curve.png")


@app.command("infer")
def infer_command(
    data_uri: Annotated[str, typer.Argument(help="Dataset of image shards.")],
    out_uri: Annotated[str, typer.Argument(help="Where to write detections/, images/ and the manifest.")],
    model: Annotated[str, typer.Option("--model", help="Detector checkpoint (URI or path).")],
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Ray actors (default: what the cluster offers).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    score_threshold: Annotated[
        float | None, typer.Option("--score-threshold", min=0.0, max=1.0, help="Keep detections at least this sure.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    local: Annotated[
        bool, typer.Option("--local", help="Run in this process, without Ray (a laptop, a debugger).")
    ] = False,
    replace: Replace = False,
    wait_for_lease: WaitForLease = 0.0,
    ray_address: RayAddress = None,
    shared_fs: SharedFs = False,
    storage_option: StorageOption = None,
) -> None:
    """Batch inference on Ray: every uncommitted shard → detections, exactly once per shard."""
    options = _storage(storage_option)
    spec = _run(
        lambda: InferenceSpec(
            data_uri,
            out_uri,
            model,
            workers=workers,
            batch_size=batch_size,
            score_threshold=score_threshold,
            device=device,
            executor="local" if local else "ray",
            replace=replace,
            lease_wait_s=wait_for_lease,
            cluster=_cluster(ray_address, shared_fs),
            storage=options,
        )
    )
    pipelines = _run(_flows)

    def run(on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        try:
            return pipelines.inference_flow(spec, on_progress)
        except pipelines.ShardsFailed as failed:
            return failed.summary

    summary = _run(lambda: _with_progress(run))
    _print_inference_summary(summary, out_uri)
    if summary["failed"]:
        for shard, error in sorted(summary["failed"].items()):
            typer.secho(f"failed      {shard}: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _print_inference_summary(summary: dict[str, Any], out_uri: str) -> None:
    if "run_id" not in summary:  # nothing was pending
        typer.echo(f"nothing to do: every shard is committed under {storage.redact(out_uri)}")
        return
    typer.echo(
        f"images      {summary['images']} ({summary['errors']} errors) in {summary['shards_done']} shards, "
        f"{summary['shards_skipped']} already committed\n"
        f"detections  {summary['detections']}\n"
        f"throughput  {summary['images_per_s']:.1f} images/s over {summary['seconds']:.1f} s\n"
        f"outputs     {summary['out_uri']}  (run {summary['run_id']}, model {summary['model_id']})\n"
        f'try         detectflow query {storage.redact(out_uri)} "SELECT label_name, count(*) AS n FROM detections '
        f'GROUP BY 1 ORDER BY n DESC"'
    )


@app.command("detect-new")
def detect_new_command(
    images_uri: Annotated[str, typer.Argument(help="Folder/prefix where new images arrive.")],
    dataset_uri: Annotated[str, typer.Argument(help="Dataset the new images are appended to.")],
    out_uri: Annotated[str, typer.Argument(help="Outputs of the detections.")],
    model: Annotated[str, typer.Option("--model", help="Detector checkpoint (URI or path).")],
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Ray actors.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    shard_size: ShardSize = 256,
    listing: ListingOption = "full",
    replace: Replace = False,
    wait_for_lease: WaitForLease = 0.0,
    ray_address: RayAddress = None,
    shared_fs: SharedFs = False,
    storage_option: StorageOption = None,
) -> None:
    """Incremental run (what the nightly deployment does): ingest only images not in the dataset yet,
    detect only in uncommitted shards. Over an unchanged prefix it does no work."""
    options = _storage(storage_option)

    def build() -> DetectNewSpec:
        inference = InferenceSpec(
            dataset_uri,
            out_uri,
            model,
            workers=workers,
            batch_size=batch_size,
            replace=replace,
            lease_wait_s=wait_for_lease,
            cluster=_cluster(ray_address, shared_fs),
            storage=options,
        )
        return DetectNewSpec(images_uri, inference, shard_size=shard_size, listing=listing)

    spec = _run(build)
    pipelines = _run(_flows)

    def run(on_progress: Callable[[Any], None] | None) -> dict[str, Any]:
        try:
            return pipelines.detect_new_images_flow(spec, on_progress)
        except pipelines.ShardsFailed as failed:
            return {"new_images": None, "inference": failed.summary}

    result = _run(lambda: _with_progress(run))
    if result["new_images"] is not None:
        typer.echo(f"new images  {result['new_images']}")
    _print_inference_summary(result["inference"], out_uri)
    if result["inference"].get("failed"):
        raise typer.Exit(1)


@app.command("train")
def train_command(
    data_uri: Annotated[str, typer.Argument(help="Labelled dataset of image shards.")],
    model_out_uri: Annotated[str, typer.Argument(help="Where checkpoints, metrics and model.pt go.")],
    preset: Annotated[str, typer.Option("--preset", help="Detector preset, e.g. tiny or resnet50_fpn.")],
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", min=2, help="Classes with background (default: the dataset's).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="DDP workers (Ray Train).")] = 2,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default 1 unless --steps).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps instead of epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per worker per step (default: the recipe's).")
    ] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="sgd or adamw (default: the recipe's).")] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", min=0.0, help="Learning rate per 16 images, scaled (default: the recipe's).")
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option("--warmup-steps", min=0, help="Warm-up steps (default: the recipe's images).")
    ] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="cosine or step (default: the recipe's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and data order.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    val: Annotated[str | None, typer.Option("--val", help="Validation dataset (mAP after training).")] = None,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")
    ] = 100,
    ray_address: RayAddress = None,
    shared_fs: SharedFs = False,
    storage_option: StorageOption = None,
) -> None:
    """Train a Faster R-CNN with DDP on Ray Train; checkpoints and metrics in object storage."""
    from pipeline.training.recipe import describe_recipe

    if val and (resume or num_classes is not None):
        raise typer.BadParameter("--val trains from scratch with the dataset's classes", param_hint="--val")
    options = _storage(storage_option)
    spec = _run(
        lambda: TrainSpec(
            data_uri,
            model_out_uri,
            preset=preset,
            num_classes=num_classes,
            workers=workers,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            warmup_steps=warmup_steps,
            schedule=schedule,
            seed=seed,
            resume=resume,
            val_uri=val,
            checkpoint_every=checkpoint_every,
            cluster=_cluster(ray_address, shared_fs),
            storage=options,
        )
    )
    typer.echo(f"recipe      {describe_recipe(spec)}")
    pipelines = _run(_flows)

    def run() -> dict[str, Any]:
        if val:
            return pipelines.train_and_evaluate_flow(spec)
        return {"training": pipelines.train_flow(spec), "metrics": None}

    result = _run(run, resume="add --resume to continue from the last checkpoint")
    _echo_training(result["training"], result["metrics"])


def _echo_training(summary: dict[str, Any], metrics: dict[str, Any] | None) -> None:
    """What a training run did: steps, speed, loss, where its model and metrics are, its nodes."""
    typer.echo(
        f"steps       {summary['steps']} ({summary['epochs_seen']:.2f} epochs) in {summary['seconds']:.0f} s, "
        f"{summary['end_to_end_images_per_s_per_worker']:.1f} images/s per worker "
        f"(step alone {summary['images_per_s_per_worker']:.1f})\n"
        f"loss        {summary['first_loss']:.3f} → {summary['last_loss']:.3f}\n"
        f"model       {storage.redact(summary['model_uri'])}\n"
        f"metrics     {storage.redact(summary['metrics_uri'])} (and loss_curves.png)\n"
        f"next        detectflow infer DATA_URI OUT_URI --model {storage.redact(summary['model_uri'])}"
    )
    nodes = summary.get("worker_nodes") or {}
    if nodes:
        typer.echo(f"workers     {len(nodes)} on {len(set(nodes.values()))} nodes")
    if metrics:
        typer.echo(f"validation  AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  AP75 {metrics['AP75']:.3f}")


def _with_progress(run: Callable[[Callable[[Any], None] | None], T]) -> T:
    """``run(on_progress)`` with a rich progress bar on a terminal; elsewhere a plain line every 10 s."""
    if not sys.stderr.isatty():
        return run(_progress_lines(10.0))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("shards", total=None, stats="")

        def update(summary: Any) -> None:
            bar.update(
                task,
                total=summary.shards_total,
                completed=summary.shards_done + summary.shards_skipped,
                stats=f"{summary.images_per_s:.1f} img/s, {summary.errors} errors",
            )

        return run(update)


def _progress_lines(every_s: float) -> Callable[[Any], None]:
    """A progress callback printing one line to stderr at most every ``every_s`` seconds."""
    last = [time.monotonic()]

    def update(summary: Any) -> None:
        if time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            typer.echo(
                f"progress    {summary.shards_done + summary.shards_skipped}/{summary.shards_total} shards, "
                f"{summary.images_per_s:.1f} images/s, {summary.errors} errors",
                err=True,
            )

    return update


@server_app.command("status")
def server_status_command() -> None:
    """Whether the local Prefect server runs, where, and which Prefect API commands use."""
    from flows import local_server

    configured = local_server.configured_api_url()
    info = local_server.running(local_server.ServerPaths.default())
    if configured:
        typer.echo(f"commands use the Prefect API configured here: {configured}")
    if info:
        typer.echo(f"local server running: {info['ui']} (pid {info['pid']}, since {info['started_at']})")
    else:
        typer.echo("no local server running")


@server_app.command("start")
def server_start_command() -> None:
    """Start the local Prefect server now (commands start it on first use anyway)."""
    from flows import local_server

    url = local_server.ensure(local_server.ServerPaths.default(), lambda line: typer.echo(line, err=True))
    typer.echo(f"local server running: {url}")


@server_app.command("stop")
def server_stop_command() -> None:
    """Stop the local Prefect server (its runs stay in Prefect's database for the next one)."""
    from flows import local_server

    info = local_server.stop(local_server.ServerPaths.default())
    typer.echo(f"stopped the local server at {info['ui']}" if info else "no local server was running")


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt once (the run stops cleanly: in-flight shards are
    abandoned, the manifest says ``interrupted``); a second one exits at once. A process started with
    SIGINT ignored (a background job) keeps ignoring it."""
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            os.write(2, b"\ninterrupted again: exiting now\n")
            os._exit(130)
        raise KeyboardInterrupt

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def main() -> None:
    with _interrupts():
        app()


if __name__ == "__main__":
    main()
