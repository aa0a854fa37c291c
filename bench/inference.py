"""Batch inference throughput on this machine, same model and shards (in a real S3 server),
measured interleaved in one run:

- pipeline efficiency: end-to-end images/s (S3 shards → committed Parquet, Ray actors) ÷ model-only
  images/s (the same model on already-decoded, already-batched tensors, same threads);
- versus the Ray Data way (``read_parquet`` → ``map_batches`` with an actor class holding the model →
  ``write_parquet``, as in Ray's batch-inference docs);
- scaling: 1 vs 2 CPU actors at 1 thread each;
- memory: RSS of a shard worker after each of ≥ 20 shards.

``--gpu``: the shard worker in-process on the COCO photos, resnet50_fpn at 800 px, fp32 vs bf16 (no Ray).

    .venv/bin/python bench/inference.py [--quick] [--gpu]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from _common import median, write_result  # noqa: E402

from detector import build_detector, save_checkpoint  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.dataset import open_dataset, read_shard  # noqa: E402
from pipeline.decode import DecodedImage, decode_many  # noqa: E402
from pipeline.ingest import ingest_images  # noqa: E402
from pipeline.worker import ShardWorker, shard_tasks  # noqa: E402

COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset" / "images"


def realistic_model(preset: str, **overrides) -> torch.nn.Module:
    """Random weights with calibrated batch-norm and a few frequent classes: realistic numbers of
    proposals and detections (no pretrained weights exist offline)."""
    torch.manual_seed(0)
    model = build_detector(
        preset, 91, class_names=["__background__"] + [f"class{i}" for i in range(1, 91)], **overrides
    )
    generator = torch.Generator().manual_seed(0)
    model.backbone.train()
    with torch.no_grad():
        for _ in range(2):
            model.backbone(torch.rand(2, 3, 160, 160, generator=generator))
        model.rpn.head.cls_logits.weight.normal_(0, 1.0, generator=generator)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5, generator=generator)
        model.roi_heads.box_predictor.cls_score.bias[1:6] = 3.0
    return model.eval()


def model_only(
    model: torch.nn.Module, dataset_uri: str, batch_size: int, device: str = "cpu", amp: torch.dtype | None = None
) -> float:
    """images/s of the model alone on decoded, batched tensors already in memory."""
    batches, images = [], []
    for shard in open_dataset(dataset_uri).shards:
        table = read_shard(shard.uri, ["image_id", "image"])
        decoded = decode_many(list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())))
        images += [d.image.to(device).float().div(255) for d in decoded if isinstance(d, DecodedImage)]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    model = model.to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(batches[0][:1])
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches:
            if amp is not None:
                with torch.autocast("cuda", dtype=amp):
                    model(batch)
            else:
                model(batch)
        if device == "cuda":
            torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started)


def end_to_end(dataset_uri: str, out_uri: str, model_uri: str, workers: int, threads: int, batch_size: int) -> float:
    from pipeline.inference import run_inference

    summary = run_inference(
        dataset_uri,
        out_uri,
        model_uri,
        workers=workers,
        threads_per_worker=threads,
        batch_size=batch_size,
        device="cpu",
    )
    assert not summary.failed, summary.failed
    # Wall time of the whole run as the user sees it, actor start-up (model load) included.
    return summary.images / summary.seconds


def ray_data(dataset_uri: str, out_uri: str, model_uri: str, workers: int, threads: int, batch_size: int) -> float:
    """The way Ray's batch-inference docs do it: read_parquet → map_batches(actor class) → write_parquet."""
    import pyarrow as pa
    import ray

    from detector import load_checkpoint

    class Detector:
        def __init__(self):
            torch.set_num_threads(threads)
            self.model = load_checkpoint(io.BytesIO(storage.read_bytes(model_uri))).eval()

        def __call__(self, batch: pa.Table) -> pa.Table:
            ids = batch.column("image_id").to_pylist()
            decoded = decode_many(list(zip(ids, batch.column("image").to_pylist())), threads=1)
            ok = [d for d in decoded if isinstance(d, DecodedImage)]
            with torch.inference_mode():
                outs = self.model([d.image.float() / 255 for d in ok])
            rows = {"image_id": [], "label": [], "score": [], "x1": [], "y1": [], "x2": [], "y2": []}
            for d, out in zip(ok, outs):
                n = len(out["scores"])
                rows["image_id"] += [d.image_id] * n
                rows["label"] += out["labels"].tolist()
                rows["score"] += out["scores"].tolist()
                for k, column in zip(("x1", "y1", "x2", "y2"), out["boxes"].T):
                    rows[k] += column.tolist()
            return pa.table(rows)

    files = [s.uri for s in open_dataset(dataset_uri).shards]
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    started = time.perf_counter()
    images = sum(s.num_images for s in open_dataset(dataset_uri).shards)
    (
        # The actor pool takes every CPU: reads and writes must reserve none, or they are never
        # scheduled (Ray Data deadlocks with its defaults, and with fractional CPUs, on 2 CPUs).
        ray.data.read_parquet(paths, filesystem=fs, columns=["image_id", "image"], ray_remote_args={"num_cpus": 0})
        .map_batches(Detector, concurrency=workers, batch_size=batch_size, batch_format="pyarrow", num_cpus=threads)
        .write_parquet(
            storage.filesystem(out_uri)[1],
            filesystem=storage.filesystem(out_uri)[0],
            ray_remote_args={"num_cpus": 0},
        )
    )
    return images / (time.perf_counter() - started)


def rss_over_shards(model_uri: str, dataset_uri: str, out_uri: str) -> list[float]:
    worker = ShardWorker(model_uri, out_uri, batch_size=8, torch_threads=2)
    process = psutil.Process()
    samples = []
    for _ in worker.process_shards(shard_tasks(open_dataset(dataset_uri).shards)):
        samples.append(process.memory_info().rss / 1e6)
    worker.close()
    return samples


def cpu_bench(args: argparse.Namespace, work: Path) -> dict:
    import ray

    from pipeline.seaweed import SeaweedS3

    result: dict = {}
    with SeaweedS3(work / "seaweed") as server:
        server.apply_env()
        bucket = server.new_bucket("bench")
        dataset_uri = bucket + "/coco"
        shard_size = 16
        dataset = ingest_images(f"file://{COCO_IMAGES}", dataset_uri, shard_size=shard_size)
        if args.quick:
            dataset.shards = dataset.shards[:4]
        preset = "mobilenet_v3_large_320_fpn"
        model = realistic_model(preset)
        local = work / "model.pt"
        save_checkpoint(model, local)
        model_uri = bucket + "/model.pt"
        storage.write_bytes(model_uri, local.read_bytes())
        result["setting"] = {
            "preset": preset,
            "images": dataset.num_images,
            "shards": len(dataset.shards),
            "shard_size": shard_size,
            "batch_size": args.batch_size,
            "storage": "SeaweedFS S3",
        }
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        figures: dict[str, list[float]] = {
            "model_only_2threads": [],
            "e2e_1actor_2threads": [],
            "e2e_2actors_1thread": [],
            "e2e_1actor_1thread": [],
            "ray_data_2actors_1thread": [],
            "model_only_1thread": [],
        }
        repeats = 1 if args.quick else 2
        for r in range(repeats):
            torch.set_num_threads(2)
            figures["model_only_2threads"].append(model_only(model, dataset_uri, args.batch_size))
            figures["e2e_1actor_2threads"].append(
                end_to_end(dataset_uri, f"{bucket}/o{r}a", model_uri, 1, 2, args.batch_size)
            )
            figures["e2e_2actors_1thread"].append(
                end_to_end(dataset_uri, f"{bucket}/o{r}b", model_uri, 2, 1, args.batch_size)
            )
            figures["ray_data_2actors_1thread"].append(
                ray_data(dataset_uri, f"{bucket}/o{r}c", model_uri, 2, 1, args.batch_size)
            )
            figures["e2e_1actor_1thread"].append(
                end_to_end(dataset_uri, f"{bucket}/o{r}d", model_uri, 1, 1, args.batch_size)
            )
            torch.set_num_threads(1)
            figures["model_only_1thread"].append(model_only(model, dataset_uri, args.batch_size))
            print({k: round(v[-1], 2) for k, v in figures.items()}, flush=True)
        ray.shutdown()
        torch.set_num_threads(2)
        med = {k: median(v) for k, v in figures.items()}
        result["images_per_s"] = med
        result["runs"] = figures
        result["pipeline_efficiency_1actor_2threads"] = med["e2e_1actor_2threads"] / med["model_only_2threads"]
        result["pipeline_efficiency_2actors_1thread"] = med["e2e_2actors_1thread"] / med["model_only_2threads"]
        result["versus_ray_data_2actors"] = med["e2e_2actors_1thread"] / med["ray_data_2actors_1thread"]
        result["scaling_2actors_vs_1actor_1thread"] = med["e2e_2actors_1thread"] / med["e2e_1actor_1thread"]

        # Memory over ≥ 20 shards: tiny images through the tiny model keep this quick.
        from pipeline.ingest import ingest_synthetic

        small = ingest_synthetic(bucket + "/rss", num_images=24 * 8, image_size=96, shard_size=8)
        tiny = build_detector("tiny", 4)
        save_checkpoint(tiny, local)
        storage.write_bytes(bucket + "/tiny.pt", local.read_bytes())
        samples = rss_over_shards(bucket + "/tiny.pt", small.uri, bucket + "/rss-out")
        result["worker_rss_mb_per_shard"] = samples
        result["worker_rss_growth_mb_shard5_to_last"] = samples[-1] - samples[4]
    return result


def gpu_bench(args: argparse.Namespace, work: Path) -> dict:
    dataset_uri = f"file://{work}/coco"
    ingest_images(f"file://{COCO_IMAGES}", dataset_uri, shard_size=64)
    model = realistic_model("resnet50_fpn")
    save_checkpoint(model, work / "model.pt")
    result = {"setting": {"preset": "resnet50_fpn", "min_size": 800, "device": torch.cuda.get_device_name(0)}}
    for name, amp in (("fp32", "off"), ("bf16", "bf16")):
        rates = []
        for r in range(2):
            worker = ShardWorker(
                str(work / "model.pt"),
                f"file://{work}/out-{name}-{r}",
                device="cuda",
                batch_size=args.batch_size,
                amp=amp,
                decode_threads=8,
            )
            started = time.perf_counter()
            images = sum(res.num_images for res in worker.process_shards(shard_tasks(open_dataset(dataset_uri).shards)))
            torch.cuda.synchronize()
            rates.append(images / (time.perf_counter() - started))
            worker.close()
        result[f"e2e_images_per_s_{name}"] = max(rates)
        result[f"model_only_images_per_s_{name}"] = model_only(
            model, dataset_uri, args.batch_size, "cuda", torch.bfloat16 if amp == "bf16" else None
        )
        print(name, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="in-process shard worker on CUDA, fp32 vs bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-infer-"))
    try:
        result = gpu_bench(args, work) if args.gpu else cpu_bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = "inference_gpu" if args.gpu else "inference"
    write_result(
        name + ("_quick" if args.quick else ""),
        {k: (v if not isinstance(v, np.generic) else float(v)) for k, v in result.items()},
    )


if __name__ == "__main__":
    main()
