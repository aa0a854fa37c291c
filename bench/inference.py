"""Batch inference throughput on this machine, same model and shards (COCO photos in a real S3
server), every configuration measured in each repeat (interleaved) in one run:

- pipeline efficiency: end-to-end images/s (S3 shards → committed Parquet, Ray actors) ÷ model-only
  images/s (the same model on decoded images already in memory, batched as the worker batches them,
  on the same compute: one process with the same torch threads, or as many processes as actors,
  running at once); over the whole run (actor start-up and model load included) and in steady state
  (first shard committed → last). The photos are stored ``--copies`` times (1312 images by default),
  so that a run lasts about a minute and its fixed cost (~4 s: actor process, imports, model load,
  first-batch warm-up) weighs as in a batch job rather than dominating a 15 s one;
- versus the Ray Data way (``read_parquet`` → ``map_batches`` with an actor-pool class holding the
  model → ``write_parquet``, as in Ray's batch-inference docs), same model, shards and actors;
- scaling: 1 vs 2 CPU actors at 1 torch thread each;
- memory: peak and current RSS of one actor after each of 24 shards.

``--efficiency``: only the default layout (2 actors × 1 thread) against the model alone on the same
compute, whole run and steady state (a shorter run for that one figure).

``--gpu``: the in-process executor (one shard worker, two threads, no Ray) on CUDA, COCO photos,
resnet50_fpn at 800 px, fp32 vs bf16: throughput, efficiency, and how well bf16 keeps fp32's
confident detections.

    .venv/bin/python bench/inference.py [--quick] [--gpu] [--batch-size B]
"""

from __future__ import annotations

import argparse
import io
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from _common import median, write_result  # noqa: E402

from detector import build_detector, save_checkpoint  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.dataset import open_dataset, read_shard  # noqa: E402
from pipeline.decode import DecodedImage, decode_many  # noqa: E402
from pipeline.distributors import LocalExecutor  # noqa: E402
from pipeline.ingest import ingest_images  # noqa: E402
from pipeline.jobs import InferenceSpec  # noqa: E402

BACKGROUND_BIAS = 1.0
TIMELINE: list[dict[str, float]] = []  # per end-to-end run: first shard committed, whole run (seconds)
COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset" / "images"


def realistic_model(preset: str, **overrides) -> torch.nn.Module:
    """Random weights with calibrated batch-norm, a spread of box-classifier logits and a background
    bias: ~20 detections per COCO photo at the default score threshold (a trained detector gives
    10–50), not 0 or the cap of 100 (no pretrained weights exist offline)."""
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
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 2.0, generator=generator)
        model.roi_heads.box_predictor.cls_score.bias.zero_()
        model.roi_heads.box_predictor.cls_score.bias[0] = BACKGROUND_BIAS
    return model.eval()


def decoded_batches(dataset_uri: str, batch_size: int, device: str = "cpu") -> list[list[torch.Tensor]]:
    """The dataset's images decoded into memory and batched as the shard worker batches them (per
    shard, similar aspect ratios together)."""
    batches: list[list[torch.Tensor]] = []
    for shard in open_dataset(dataset_uri).shards:
        table = read_shard(shard.uri, ["image_id", "image"])
        decoded = decode_many(list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())))
        images = sorted(
            (item.image.to(device) for item in decoded if isinstance(item, DecodedImage)),
            key=lambda image: image.shape[1] / image.shape[2],
        )
        batches += [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    return batches


def model_only(
    model: torch.nn.Module,
    batches: list[list[torch.Tensor]],
    device: str = "cpu",
    amp: torch.dtype | None = None,
    start_together: Any = None,
) -> tuple[int, float]:
    """(images, seconds) of the model alone over ``batches`` (decoded, in memory), as the worker
    runs it (channels_last, inference mode, uint8 → float on the fly). ``start_together``: a
    barrier waited on before the clock starts, for runs in several processes at once."""
    model = model.to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        model([batches[0][0].float().div(255)])
        if device == "cuda":
            torch.cuda.synchronize()
        if start_together is not None:
            start_together.wait()
        started = time.perf_counter()
        for batch in batches:
            model([image.float().div(255) for image in batch])
        if device == "cuda":
            torch.cuda.synchronize()
    return sum(len(batch) for batch in batches), time.perf_counter() - started


def warm_up(model: torch.nn.Module, batches: list[list[torch.Tensor]]) -> None:
    """An untimed pass over the first quarter of ``batches``: oneDNN builds its kernels per input
    shape on first use, and the model-only figures are the denominators of the efficiency, so they
    are measured warm (the actors pay their own warm-up inside the run)."""
    model_only(model, batches[: max(1, len(batches) // 4)])


def _model_only_part(model_path: str, dataset_uri: str, part: int, parts: int, batch_size: int, barrier, results):
    """One of ``parts`` processes of :func:`model_only_processes`: every ``parts``-th batch, 1 thread."""
    torch.set_num_threads(1)
    from detector import load_checkpoint

    model = load_checkpoint(model_path).eval()
    batches = decoded_batches(dataset_uri, batch_size)[part::parts]
    warm_up(model, batches)
    results.put(model_only(model, batches, start_together=barrier))


def model_only_processes(model_path: str, dataset_uri: str, processes: int, batch_size: int) -> float:
    """images/s of the model alone in ``processes`` single-threaded processes running at once, each
    on its share of the batches: the compute that as many single-threaded actors have."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_model_only_part, args=(model_path, dataset_uri, part, processes, batch_size, barrier, results)
        )
        for part in range(processes)
    ]
    for worker in workers:
        worker.start()
    parts = []
    while len(parts) < processes:
        try:
            parts.append(results.get(timeout=5))
        except queue.Empty:
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if failed:
                for worker in workers:
                    worker.kill()
                raise RuntimeError(f"a model-only process failed (exit codes {failed})") from None
    for worker in workers:
        worker.join()
    return sum(images for images, _ in parts) / max(seconds for _, seconds in parts)


def rate(images_and_seconds: tuple[int, float]) -> float:
    images, seconds = images_and_seconds
    return images / seconds


def end_to_end(
    dataset_uri: str, out_uri: str, model_uri: str, workers: int, threads: int, batch_size: int
) -> tuple[float, float]:
    """images/s of ``run_inference`` (S3 shards → committed Parquet): over the whole run as the user
    sees it (actor start-up and model load included), and in steady state (images committed after
    the first shard ÷ time from its commit to the last; optimistic by up to one shard's work over
    few shards, since the next shard is already in flight when the first commits)."""
    from pipeline.inference import run_inference

    first: dict[str, float] = {}

    def progress(summary) -> None:
        if summary.shards_done and "seconds" not in first:
            first.update(seconds=summary.seconds, images=summary.images)

    spec = InferenceSpec(
        dataset_uri,
        out_uri,
        model_uri,
        workers=workers,
        threads_per_worker=threads,
        batch_size=batch_size,
        device="cpu",
    )
    summary = run_inference(spec, progress=progress)
    assert not summary.failed, summary.failed
    steady_images = summary.images - first["images"]
    steady = steady_images / (summary.seconds - first["seconds"]) if steady_images else float("nan")
    TIMELINE.append({"first_commit_s": first["seconds"], "run_s": summary.seconds, "images": summary.images})
    return summary.images / summary.seconds, steady


def ray_data(dataset_uri: str, out_uri: str, model_uri: str, workers: int, threads: int, batch_size: int) -> float:
    """The way Ray's batch-inference docs do it: read_parquet → map_batches(actor class) → write_parquet."""
    import pyarrow as pa
    import ray

    from detector import load_checkpoint

    class Detector:
        """The model resident in a Ray Data actor; channels_last as in our worker, so that the
        comparison measures the data plane, not the memory format."""

        def __init__(self):
            torch.set_num_threads(threads)
            model = load_checkpoint(io.BytesIO(storage.read_bytes(model_uri))).eval()
            self.model = model.to(memory_format=torch.channels_last)

        def __call__(self, batch: pa.Table) -> pa.Table:
            image_ids = batch.column("image_id").to_pylist()
            decoded = decode_many(list(zip(image_ids, batch.column("image").to_pylist())), threads=1)
            images = [item for item in decoded if isinstance(item, DecodedImage)]
            with torch.inference_mode():
                outputs = self.model([item.image.float() / 255 for item in images])
            columns: dict[str, list] = {
                "image_id": [],
                "label": [],
                "score": [],
                "x1": [],
                "y1": [],
                "x2": [],
                "y2": [],
            }
            for image, output in zip(images, outputs):
                columns["image_id"] += [image.image_id] * len(output["scores"])
                columns["label"] += output["labels"].tolist()
                columns["score"] += output["scores"].tolist()
                for name, values in zip(("x1", "y1", "x2", "y2"), output["boxes"].T):
                    columns[name] += values.tolist()
            return pa.table(columns)

    shards = open_dataset(dataset_uri).shards
    fs, _ = storage.filesystem(shards[0].uri)
    paths = [storage.filesystem(shard.uri)[1] for shard in shards]
    images = sum(shard.num_images for shard in shards)
    started = time.perf_counter()
    # The actors ask for half a CPU each (they still run ``threads`` torch threads): at a full CPU
    # each they would hold every CPU of the 2-CPU cluster and Ray Data's read tasks, which need a
    # CPU, would never be scheduled (the run hangs).
    (
        ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths))
        .select_columns(["image_id", "image"])
        .map_batches(
            Detector,
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        .write_parquet(storage.filesystem(out_uri)[1], filesystem=storage.filesystem(out_uri)[0])
    )
    return images / (time.perf_counter() - started)


def _peak_and_current_rss_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of a process in MB: its peak resident set so far, and its current one."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


def actor_rss_over_shards(dataset_uri: str, out_uri: str, model_uri: str) -> list[dict[str, float]]:
    """Peak and current RSS of the one inference actor of a run, after each shard it commits."""
    from pipeline.inference import run_inference

    samples: list[dict[str, float]] = []

    def actor_pid() -> int | None:
        for child in psutil.Process().children(recursive=True):
            try:
                if "InferenceActor" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        return None

    def progress(summary) -> None:
        if summary.shards_done > len(samples):
            pid = actor_pid()
            if pid is not None:
                peak, current = _peak_and_current_rss_mb(pid)
                samples.append({"shards": summary.shards_done, "peak_mb": peak, "rss_mb": current})

    spec = InferenceSpec(dataset_uri, out_uri, model_uri, workers=1, threads_per_worker=1, batch_size=8, device="cpu")
    summary = run_inference(spec, progress=progress)
    assert not summary.failed, summary.failed
    return samples


def _upload_images(prefix_uri: str, count: int | None, copies: int = 1) -> int:
    """The first ``count`` COCO photos (all when None), ``copies`` times, under
    ``prefix_uri/copy-K/``; returns how many objects."""
    files = sorted(COCO_IMAGES.iterdir())[:count]
    for copy in range(copies):
        for file in files:
            storage.write_bytes(f"{prefix_uri}/copy-{copy}/{file.name}", file.read_bytes())
    return len(files) * copies


def cpu_bench(args: argparse.Namespace, work: Path) -> dict:
    import ray

    from pipeline.ingest import ingest_synthetic
    from tests.seaweed import SeaweedS3

    result: dict = {}
    with SeaweedS3(work / "seaweed") as server:
        server.apply_env()
        bucket = server.new_bucket("bench")
        shard_size = 32
        _upload_images(bucket + "/photos", 48 if args.quick else None, 1 if args.quick else args.copies)
        dataset = ingest_images(bucket + "/photos", bucket + "/coco", shard_size=shard_size)
        dataset_uri = dataset.uri
        preset = "mobilenet_v3_large_320_fpn"
        model = realistic_model(preset)
        local = work / "model.pt"
        save_checkpoint(model, local)
        model_uri = bucket + "/model.pt"
        storage.write_bytes(model_uri, local.read_bytes())
        result["setting"] = {
            "preset": preset,
            "weights": "random, calibrated batch-norm, ~20 detections per photo (no pretrained weights offline)",
            "images": dataset.num_images,
            "source": f"COCO val2017 photos, each stored {1 if args.quick else args.copies} times",
            "shards": len(dataset.shards),
            "shard_size": shard_size,
            "batch_size": args.batch_size,
            "storage": "SeaweedFS S3 on loopback (same 2 cores)",
            "cluster": "local Ray, 2 CPUs",
        }
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        batches = decoded_batches(dataset_uri, args.batch_size)  # meanwhile Ray's start-up settles
        torch.set_num_threads(2)
        warm_up(model, batches)
        figures: dict[str, list[float]] = {}
        steady: dict[str, list[float]] = {}
        for repeat in range(1 if args.quick else args.repeats):
            torch.set_num_threads(2)
            figures.setdefault("model_only_1process_2threads", []).append(rate(model_only(model, batches)))
            for name, actors, threads in (
                ("e2e_1actor_2threads", 1, 2),
                ("e2e_2actors_1thread", 2, 1),
                ("ray_data_2actors_1thread", 2, 1),
                ("e2e_1actor_1thread", 1, 1),
            ):
                out_uri = f"{bucket}/out-{repeat}-{name}"
                if name.startswith("ray_data"):
                    figures.setdefault(name, []).append(
                        ray_data(dataset_uri, out_uri, model_uri, actors, threads, args.batch_size)
                    )
                else:
                    wall, steady_rate = end_to_end(dataset_uri, out_uri, model_uri, actors, threads, args.batch_size)
                    figures.setdefault(name, []).append(wall)
                    steady.setdefault(name, []).append(steady_rate)
            torch.set_num_threads(1)
            figures.setdefault("model_only_1process_1thread", []).append(rate(model_only(model, batches)))
            figures.setdefault("model_only_2processes_1thread", []).append(
                model_only_processes(str(local), dataset_uri, 2, args.batch_size)
            )
            torch.set_num_threads(2)
            print({k: round(v[-1], 2) for k, v in figures.items()}, flush=True)
        del batches

        med = {k: median(v) for k, v in figures.items()}
        med_steady = {k: median(v) for k, v in steady.items()}
        result["images_per_s"] = med
        result["images_per_s_steady_state"] = med_steady
        result["runs"] = figures
        result["runs_steady_state"] = steady
        # Each end-to-end configuration against the model alone on the same compute.
        same_compute = {
            "e2e_1actor_2threads": "model_only_1process_2threads",
            "e2e_2actors_1thread": "model_only_2processes_1thread",
            "e2e_1actor_1thread": "model_only_1process_1thread",
        }
        result["pipeline_efficiency"] = {
            name: {
                "versus": baseline,
                "whole_run": med[name] / med[baseline],
                "steady_state": med_steady[name] / med[baseline],
            }
            for name, baseline in same_compute.items()
        }
        result["versus_ray_data_2actors_1thread"] = med["e2e_2actors_1thread"] / med["ray_data_2actors_1thread"]
        result["scaling_2actors_vs_1actor_at_1thread"] = {
            "whole_run": med["e2e_2actors_1thread"] / med["e2e_1actor_1thread"],
            "steady_state": med_steady["e2e_2actors_1thread"] / med_steady["e2e_1actor_1thread"],
            "model_only_2processes_vs_1": med["model_only_2processes_1thread"] / med["model_only_1process_1thread"],
        }

        # Memory over ≥ 20 shards through one actor: tiny images and the tiny model keep it quick.
        small = ingest_synthetic(bucket + "/rss", num_images=24 * 8, image_size=96, shard_size=8)
        save_checkpoint(build_detector("tiny", 4), local)
        storage.write_bytes(bucket + "/tiny.pt", local.read_bytes())
        samples = actor_rss_over_shards(small.uri, bucket + "/rss-out", bucket + "/tiny.pt")
        ray.shutdown()
        result["actor_rss_per_shard"] = samples
        if len(samples) >= 2:
            settled = samples[len(samples) // 4]
            result["actor_peak_rss_growth_mb_after_first_quarter"] = samples[-1]["peak_mb"] - settled["peak_mb"]
    return result


def _agreement(reference_uri: str, candidate_uri: str, min_score: float = 0.0) -> dict[str, float]:
    """How well ``candidate``'s detections reproduce ``reference``'s (those with score ≥
    ``min_score``): the fraction with a same-label candidate box at IoU ≥ 0.9, and the largest
    score difference over those matches. With random weights the scores crowd near the threshold,
    where reduced precision moves detections across it: a pessimistic figure for a trained model."""
    from torchvision.ops import box_iou

    from pipeline.outputs import OutputStore

    def by_image(uri: str) -> dict[str, list[dict]]:
        rows: dict[str, list[dict]] = {}
        for row in OutputStore(uri).read_table("detections").to_pylist():
            rows.setdefault(row["image_id"], []).append(row)
        return rows

    reference, candidate = by_image(reference_uri), by_image(candidate_uri)
    confident = matched = 0
    worst_score_difference = 0.0
    for image_id, rows in reference.items():
        wanted = [row for row in rows if row["score"] >= min_score]
        others = candidate.get(image_id, [])
        confident += len(wanted)
        if not wanted or not others:
            continue
        boxes = [[row["x1"], row["y1"], row["x2"], row["y2"]] for row in wanted]
        other_boxes = [[row["x1"], row["y1"], row["x2"], row["y2"]] for row in others]
        ious = box_iou(torch.tensor(boxes), torch.tensor(other_boxes))
        for index, row in enumerate(wanted):
            for other_index in torch.nonzero(ious[index] >= 0.9).flatten().tolist():
                if others[other_index]["label"] == row["label"]:
                    matched += 1
                    worst_score_difference = max(
                        worst_score_difference, abs(others[other_index]["score"] - row["score"])
                    )
                    break
    return {
        "confident_detections": confident,
        "matched_fraction": matched / confident if confident else float("nan"),
        "max_score_difference": worst_score_difference,
    }


def in_process_images(spec: InferenceSpec, shards: list) -> tuple[int, float]:
    """(images, seconds) of ``shards`` through the in-process executor, fed as ``run_inference``
    feeds it (up to two shards in flight), timed from the model on the device to the last commit."""
    with LocalExecutor(spec, run_id="bench") as executor:
        pending, images = list(shards), 0
        started = time.perf_counter()
        while pending or executor.in_flight:
            while pending and executor.has_room():
                executor.submit(pending.pop(0))
            for completion in executor.wait(timeout_s=60):
                assert completion.result is not None, completion.failure
                images += completion.result.num_images
        torch.cuda.synchronize()
        return images, time.perf_counter() - started


def gpu_bench(args: argparse.Namespace, work: Path) -> dict:
    """The in-process executor on CUDA, COCO photos from local disk, resnet50_fpn at 800 px:
    end-to-end and model-only images/s in fp32 and bf16 (interleaved), and how well bf16 keeps the
    fp32 detections."""
    photos = work / "photos"
    photos.mkdir()
    for file in sorted(COCO_IMAGES.iterdir())[: 64 if args.quick else None]:
        shutil.copy(file, photos / file.name)
    dataset = ingest_images(f"file://{photos}", f"file://{work}/coco", shard_size=64)
    model = realistic_model("resnet50_fpn")
    save_checkpoint(model, work / "model.pt")
    result: dict = {
        "setting": {
            "preset": "resnet50_fpn",
            "min_size": model.config.min_size,
            "images": dataset.num_images,
            "shards": len(dataset.shards),
            "batch_size": args.batch_size,
            "device": torch.cuda.get_device_name(0),
        }
    }
    precisions = {"fp32": ("off", None), "bf16": ("bf16", torch.bfloat16)}
    end_to_end_runs: dict[str, list[float]] = {name: [] for name in precisions}
    model_only_runs: dict[str, list[float]] = {name: [] for name in precisions}
    batches = decoded_batches(dataset.uri, args.batch_size, "cuda")
    for repeat in range(1 if args.quick else 3):
        for name, (amp, dtype) in precisions.items():
            spec = InferenceSpec(
                dataset.uri,
                f"file://{work}/out-{name}-{repeat}",
                str(work / "model.pt"),
                batch_size=args.batch_size,
                device="cuda",
                amp=amp,
                executor="local",
            )
            end_to_end_runs[name].append(rate(in_process_images(spec, dataset.shards)))
            model_only_runs[name].append(rate(model_only(model, batches, "cuda", dtype)))
            print(name, round(end_to_end_runs[name][-1], 1), round(model_only_runs[name][-1], 1), flush=True)
    for name in precisions:
        e2e, alone = median(end_to_end_runs[name]), median(model_only_runs[name])
        result[name] = {
            "e2e_images_per_s": e2e,
            "model_only_images_per_s": alone,
            "pipeline_efficiency": e2e / alone,
            "e2e_runs": end_to_end_runs[name],
            "model_only_runs": model_only_runs[name],
        }
    result["bf16_speedup_e2e"] = result["bf16"]["e2e_images_per_s"] / result["fp32"]["e2e_images_per_s"]
    result["bf16_vs_fp32_detections"] = _agreement(f"file://{work}/out-fp32-0", f"file://{work}/out-bf16-0")
    return result


def efficiency_bench(args: argparse.Namespace, work: Path) -> dict:
    """``--efficiency``: the default layout alone (2 actors × 1 thread, end to end, whole run and
    steady state) against the model alone on the same compute (2 single-threaded processes),
    interleaved ``--repeats`` times; the same photos, shards, model and S3 server as the full run."""
    import ray

    from tests.seaweed import SeaweedS3

    with SeaweedS3(work / "seaweed") as server:
        server.apply_env()
        bucket = server.new_bucket("bench")
        _upload_images(bucket + "/photos", 48 if args.quick else None, 1 if args.quick else args.copies)
        dataset = ingest_images(bucket + "/photos", bucket + "/coco", shard_size=32)
        save_checkpoint(realistic_model("mobilenet_v3_large_320_fpn"), work / "model.pt")
        model_uri = bucket + "/model.pt"
        storage.write_bytes(model_uri, (work / "model.pt").read_bytes())
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        runs: dict[str, list[float]] = {"model_only": [], "whole_run": [], "steady_state": []}
        for repeat in range(1 if args.quick else args.repeats):
            runs["model_only"].append(model_only_processes(str(work / "model.pt"), dataset.uri, 2, args.batch_size))
            out_uri = f"{bucket}/out-{repeat}"
            whole, steady = end_to_end(dataset.uri, out_uri, model_uri, 2, 1, args.batch_size)
            runs["whole_run"].append(whole)
            runs["steady_state"].append(steady)
            TIMELINE[-1]["stage_s"] = _stage_seconds(out_uri)
            print({k: round(v[-1], 2) for k, v in runs.items()}, TIMELINE[-1], flush=True)
        ray.shutdown()
    med = {k: median(v) for k, v in runs.items()}
    return {
        "setting": {
            "preset": "mobilenet_v3_large_320_fpn",
            "images": dataset.num_images,
            "shards": len(dataset.shards),
            "batch_size": args.batch_size,
            "layout": "e2e_2actors_1thread versus model_only_2processes_1thread",
            "repeats": len(runs["model_only"]),
        },
        "images_per_s": med,
        "pipeline_efficiency": {
            "whole_run": med["whole_run"] / med["model_only"],
            "steady_state": med["steady_state"] / med["model_only"],
        },
        "runs": runs,
        "timeline": TIMELINE,
    }


def _stage_seconds(out_uri: str) -> dict[str, float]:
    """The seconds the workers spent per stage (read, decode, detect, write), summed over shards."""
    from pipeline.outputs import OutputStore

    totals: dict[str, float] = {}
    for record in OutputStore(out_uri).committed_shards().values():
        for stage, seconds in record.get("timings", {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {stage: round(seconds, 2) for stage, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="in-process shard worker on CUDA, fp32 vs bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--copies", type=int, default=4, help="times each COCO photo is stored (CPU bench)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    parser.add_argument("--efficiency", action="store_true", help="only the default layout's pipeline efficiency")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-infer-"))
    bench, name = (gpu_bench, "inference_gpu") if args.gpu else (cpu_bench, "inference")
    if args.efficiency:
        bench, name = efficiency_bench, "inference_efficiency" + ("" if args.copies == 4 else f"_{args.copies}copies")
    try:
        result = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(
        name + ("_quick" if args.quick else ""),
        {k: (v if not isinstance(v, np.generic) else float(v)) for k, v in result.items()},
    )


if __name__ == "__main__":
    main()
