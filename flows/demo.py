"""``make demo``: detectflow end to end on this machine, no server and no cloud.

Every step is a Prefect flow run (on Prefect's ephemeral local API unless ``PREFECT_API_URL`` names a
server) on a local Ray cluster, with a local folder as object storage (``--storage s3``: a SeaweedFS
S3 server started for the demo):

1. ingest: generate a synthetic dataset of shapes with exact boxes (train and held-out validation);
2. train: the ``tiny`` Faster R-CNN with 2 Ray Train workers (DDP), checkpoints in storage;
3. infer: batch inference over the validation shards with Ray actors, detections to Parquet;
4. evaluate: COCO mAP against the ground truth, metrics.json and a precision-recall PNG;
5. query the detections with DuckDB, draw eight images with their detections into a PNG.

    python -m flows.demo [--out demo-output] [--storage file|s3] [--steps 450]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The demo runs on whatever 2 cores it gets: one thread per Ray worker, set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No server and no cloud: Prefect's ephemeral server must not try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _say(step: str) -> None:
    print(f"\n\033[1m{step}\033[0m", flush=True)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="local folder for everything")
    parser.add_argument("--storage", choices=("file", "s3"), default="file")
    parser.add_argument("--steps", type=int, default=450, help="training steps (2 workers × 8 images)")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args()


def _s3_server():
    """A SeaweedFS S3 server for ``--storage s3`` (test support: tests/seaweed.py)."""
    from tests.seaweed import SeaweedS3

    server = SeaweedS3(tempfile.mkdtemp(prefix="detectflow-demo-s3-"))
    server.start()
    return server


def _run_jobs(args: argparse.Namespace, root: str, options: Any) -> dict[str, Any]:
    """Steps 1–4 as flow runs; returns the training summary, the inference summary and the metrics."""
    from flows.pipelines import evaluate_flow, inference_flow, ingest_flow, train_flow
    from pipeline.jobs import EvaluateSpec, InferenceSpec, IngestSpec, TrainSpec

    data, val, model_dir, detections = (f"{root}/{name}" for name in ("train", "val", "model", "detections"))
    _say(f"1/5  ingest: {args.train_images} + {args.val_images} synthetic images → Parquet shards")
    synthetic = {"source": "synthetic", "image_size": 128, "storage": options}
    ingest_flow(IngestSpec(data, num_images=args.train_images, seed=0, shard_size=256, **synthetic))
    ingest_flow(IngestSpec(val, num_images=args.val_images, seed=1, shard_size=50, **synthetic))

    _say(f"2/5  train: tiny Faster R-CNN, {args.workers} Ray Train workers (DDP), {args.steps} steps")
    # The tiny preset's recipe: AdamW, 8 images per worker, lr 0.001 per 16 images, warm-up, step decay
    spec = TrainSpec(data, model_dir, preset="tiny", workers=args.workers, steps=args.steps, storage=options)
    trained = train_flow(spec)

    _say("3/5  infer: Ray actors over the validation shards, detections committed per shard")
    summary = inference_flow(InferenceSpec(val, detections, trained["model_uri"], batch_size=16, storage=options))

    _say("4/5  evaluate: COCO metrics against the ground truth")
    metrics = evaluate_flow(EvaluateSpec(val, detections, storage=options))  # its log shows the metrics table
    return {"trained": trained, "summary": summary, "metrics": metrics, "val": val, "detections": detections}


def _query_and_draw(detections: str, val: str, png: Path, options: Any) -> str:
    """Step 5: a DuckDB query over the detections and a sheet of eight images; returns the first id."""
    from pipeline.query import query
    from pipeline.show import render_sheet

    _say("5/5  query and draw")
    sql = (
        "SELECT label_name, count(*) AS n, round(avg(score), 3) AS mean_score FROM detections "
        "WHERE score >= 0.5 GROUP BY 1 ORDER BY n DESC"
    )
    print(f"  {sql}")
    for row in query(detections, sql, options).to_pylist():
        print(f"    {row['label_name']:<10} {row['n']:>5}  mean score {row['mean_score']}")
    shown = query(detections, "SELECT image_id FROM images ORDER BY image_id LIMIT 8", options).column("image_id")
    shown = shown.to_pylist()
    render_sheet(detections, shown, str(png), dataset_uri=val, score_threshold=0.5, storage_options=options)
    return shown[0]


def main() -> None:
    args = _arguments()
    import ray

    from pipeline.storage_config import StorageConfig

    began = time.perf_counter()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)  # a demo starts clean: committed shards of an earlier run would be skipped
    out.mkdir(parents=True)
    server, options, root = None, StorageConfig(), out.as_uri()
    if args.storage == "s3":
        server = _s3_server()
        options = StorageConfig(server.storage_options())  # endpoint and credentials, as -S options would
        root = server.new_bucket("demo")
        print(f"S3 server (SeaweedFS) at {server.endpoint_url}, bucket {root}")
    png = out / "detections.png"
    try:
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="WARNING", log_to_driver=False
        )
        ran = _run_jobs(args, root, options)
        first = _query_and_draw(ran["detections"], ran["val"], png, options)
        ray.shutdown()
    finally:
        if server is not None:
            server.stop()
    _report(ran, time.perf_counter() - began, out, root, png, first, s3=server is not None)


def _report(ran: dict[str, Any], seconds: float, out: Path, root: str, png: Path, first: str, *, s3: bool) -> None:
    metrics, summary, detections = ran["metrics"], ran["summary"], ran["detections"]
    where = "the S3 bucket (server stopped)" if s3 else str(out)
    print(
        f"\n\033[1mmAP@0.5 {metrics['AP50']:.3f}\033[0m   mAP@[.5:.95] {metrics['AP']:.3f}   "
        f"({summary['images']} images, {summary['detections']} detections, {seconds:.0f} s in all)\n"
        f"\neverything is under {where}:\n"
        f"  train/, val/                 datasets (dataset.json + shards/*.parquet)\n"
        f"  model/model.pt               the trained detector; checkpoints/, metrics.jsonl, loss_curves.png\n"
        f"  detections/                  detections/ and images/ Parquet, _commits/, _manifest.json,\n"
        f"                               metrics.json, pr_curve.png\n"
        f"  {png.name:<28} eight validation images with their detections (score ≥ 0.5)\n"
    )
    if not s3:
        print(
            "next:\n"
            f'  detectflow query {detections} "SELECT * FROM detections WHERE score > 0.9 LIMIT 10"\n'
            f"  detectflow show {detections} --image-id {first} --out {out}/one.png\n"
            f"  detectflow ingest images YOUR_IMAGES/ {root}/mine && "
            f"detectflow infer {root}/mine {root}/mine-detections --model {ran['trained']['model_uri']}\n"
            "  README.md: your own images in S3, a Ray cluster, Prefect deployments"
        )
    if metrics["AP50"] < 0.8:
        print(f"warning: mAP@0.5 {metrics['AP50']:.3f} is below the 0.8 this demo usually reaches", file=sys.stderr)


if __name__ == "__main__":
    main()
