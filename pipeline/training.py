"""Distributed training on Ray Train: DDP over N workers (gloo on CPU, NCCL on GPU), each streaming
its own share of the dataset, checkpoints in object storage, automatic restore after a lost worker,
and ``resume`` of an interrupted run.

Data: each epoch, the shards are shuffled (seed + epoch) and their rows shuffled within each shard;
the resulting stream of images is cut into one contiguous, equal-length chunk per worker. Every image
is seen once per epoch (all but fewer than ``workers`` of them, so that every worker takes the same
number of steps, as DDP requires), each worker reads only the shards its chunk overlaps, and the
workers' chunks are disjoint. Within a chunk, images are grouped into batches of similar aspect
ratio (less padding) and flipped horizontally with probability 0.5.

Optimisation: SGD with momentum and weight decay; linear warm-up then cosine (or step) decay; the
learning rate is given per 16 images and scaled linearly with the global batch (Goyal et al. 2017);
optional gradient clipping; AMP (bf16) on CUDA.

Checkpoints (``MODEL_OUT/checkpoints/step-NNNNNNN.pt``, every ``checkpoint_every`` steps and at the
end) hold the model, optimizer, scheduler, step, epoch, RNG state and config as plain tensors and
containers, so they load with ``torch.load(weights_only=True)``. After a failure Ray Train restarts the
worker group and every worker continues from the latest checkpoint: the data order is a pure function
of (seed, epoch), so the restored run skips exactly the batches already done — the step count is
continuous. The final model is ``MODEL_OUT/model.pt``, a detector checkpoint for ``detectflow infer``.
Metrics go to ``MODEL_OUT/metrics.jsonl`` (and ``ray.train.report``); ``loss_curves.png`` at the end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from detector import PRESETS, build_detector, save_checkpoint

from . import storage
from .dataset import Dataset, gt_targets, open_dataset, read_shard
from .decode import DecodedImage, decode_many
from .storage import StorageOptions

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
BASE_BATCH = 16  # the learning rate is given per this many images


@dataclass
class TrainConfig:
    data_uri: str
    model_out_uri: str
    preset: str
    num_classes: int
    class_names: list[str]
    workers: int = 2
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 4  # per worker
    lr: float = 0.02  # per BASE_BATCH images
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "step" (×0.1 at 2/3 and 8/9 of the run)
    clip_grad_norm: float | None = None
    hflip: bool = True
    amp: bool = True  # bf16 autocast on CUDA only
    checkpoint_every: int = 100
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    val_uri: str | None = None  # labelled dataset scored by rank 0 every ``val_every`` steps
    val_every: int | None = None
    target_ap50: float | None = None  # stop once validation mAP@0.5 reaches it
    record_debug: bool = False  # per-step weight checksums, per-epoch image ids, worker starts (tests)
    report_every: int = 10
    log_every: int = 50  # rank 0 sends the driver a progress record every this many steps
    use_gpu: bool = False


@dataclass
class TrainSummary:
    model_uri: str
    steps: int
    epochs_seen: float
    seconds: float
    first_loss: float
    last_loss: float
    images_per_s_per_worker: float
    restarts: int
    metrics_uri: str


# ------------------------------------------------------------------------------ data stream


def epoch_chunk(dataset: Dataset, seed: int, epoch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """``(shard index, row)`` pairs of this worker's share of ``epoch`` (see the module docstring)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(dataset.shards)))
    rng.shuffle(order)
    stream: list[tuple[int, int]] = []
    for shard_index in order:
        rows = list(range(dataset.shards[shard_index].num_images))
        rng.shuffle(rows)
        stream += [(shard_index, row) for row in rows]
    length = len(stream) // world
    return stream[rank * length : (rank + 1) * length]


def steps_per_epoch(dataset: Dataset, world: int, batch_size: int) -> int:
    return math.ceil((dataset.num_images // world) / batch_size)


def epoch_batches(
    dataset: Dataset,
    chunk: list[tuple[int, int]],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    hflip: bool,
    storage_options: StorageOptions | None,
    group_window: int = 8,
) -> Iterator[tuple[list[str], list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Batches ``(image_ids, images [3,H,W] float in [0,1], targets)`` of one worker's chunk, grouped
    by aspect ratio within windows of ``group_window`` batches. Undecodable images are skipped."""
    rng = random.Random(f"{seed}:{epoch}:{rank}:batches")
    tables: dict[int, Any] = {}
    window = batch_size * group_window
    for start in range(0, len(chunk), window):
        part = chunk[start : start + window]
        for shard_index in {s for s, _ in part} - set(tables):
            tables[shard_index] = read_shard(dataset.shards[shard_index].uri, storage_options=storage_options)
        for old in [s for s in tables if s not in {s for s, _ in part}]:
            del tables[old]
        rows = [(tables[s], r) for s, r in part]
        ratios = [(t.column("height")[r].as_py() or 1) / (t.column("width")[r].as_py() or 1) for t, r in rows]
        ordered = [rows[i] for i in np.argsort(ratios, kind="stable")]
        groups = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            items = [(t.column("image_id")[r].as_py(), t.column("image")[r].as_py()) for t, r in group]
            decoded = decode_many(items, threads=2)
            ids, images, targets = [], [], []
            for (table, row), item in zip(group, decoded):
                if not isinstance(item, DecodedImage):
                    continue
                boxes, labels, crowd = gt_targets(table.slice(row, 1))[0]
                keep = ~crowd
                boxes_t = torch.from_numpy(boxes[keep]).reshape(-1, 4)
                image = item.image.float() / 255
                if hflip and rng.random() < 0.5:
                    image = image.flip(-1)
                    boxes_t = torch.stack(
                        [item.width - boxes_t[:, 2], boxes_t[:, 1], item.width - boxes_t[:, 0], boxes_t[:, 3]], dim=1
                    )
                ids.append(item.image_id)
                images.append(image)
                targets.append({"boxes": boxes_t, "labels": torch.from_numpy(labels[keep]).to(torch.int64)})
            yield ids, images, targets


# ------------------------------------------------------------------------------ schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the scaled base LR at ``step`` (0-based): linear warm-up from 0.1, then decay."""
    if step < warmup:
        return 0.1 + 0.9 * step / max(1, warmup)
    if schedule == "step":
        return 0.01 if step >= total * 8 / 9 else 0.1 if step >= total * 2 / 3 else 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_uris(model_out_uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    return storage.list_files(storage.join(model_out_uri, CHECKPOINTS), storage_options, suffixes=(".pt",))


def latest_checkpoint(model_out_uri: str, storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    uris = checkpoint_uris(model_out_uri, storage_options)
    if not uris:
        return None
    return torch.load(io.BytesIO(storage.read_bytes(uris[-1], storage_options)), map_location="cpu", weights_only=True)


def _save_training_checkpoint(
    config: TrainConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any, step: int, epoch: int
) -> None:
    payload = {
        "format": "detectflow.training/1",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "rng": {"torch": torch.get_rng_state()},
        "config": {k: v for k, v in asdict(config).items() if k != "storage_options"},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    uri = storage.join(config.model_out_uri, CHECKPOINTS, f"step-{step:07d}.pt")
    storage.write_bytes(uri, buffer.getvalue(), config.storage_options)


# ------------------------------------------------------------------------------ the loop


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import ray.train.torch

    config_dict = dict(config_dict)
    sink = config_dict.pop("progress_sink", None)  # the driver's _ProgressSink actor, if any
    config = TrainConfig(**config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    if not config.use_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = ray.train.torch.get_device()
    dataset = open_dataset(config.data_uri, config.storage_options)
    model = build_detector(config.preset, config.num_classes, class_names=config.class_names, **config.overrides)
    per_epoch = steps_per_epoch(dataset, world, config.batch_size)
    total = config.steps or per_epoch * (config.epochs or 1)
    scaled_lr = config.lr * config.batch_size * world / BASE_BATCH
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=scaled_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_steps, config.schedule)
    )

    step = 0
    restored = latest_checkpoint(config.model_out_uri, config.storage_options)
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        torch.set_rng_state(restored["rng"]["torch"])
        step = int(restored["step"])
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    metrics = _load_metrics(config) if rank == 0 else []
    metrics = [m for m in metrics if m["step"] <= step]
    debug: dict[str, Any] = {"checksums": [], "images": {}}
    if config.record_debug:
        start_uri = storage.join(config.model_out_uri, "debug", f"start-rank{rank}-pid{os.getpid()}.json")
        storage.write_json(start_uri, {"step": step}, config.storage_options)
    use_amp = config.amp and config.use_gpu
    model.train()

    while step < total:
        epoch = step // per_epoch
        skip = step - epoch * per_epoch
        chunk = epoch_chunk(dataset, config.seed, epoch, rank, world)
        for index, (ids, images, targets) in enumerate(
            epoch_batches(
                dataset, chunk, config.batch_size, config.seed, epoch, rank, config.hflip, config.storage_options
            )
        ):
            if index < skip:
                continue
            if step >= total:
                break
            started = time.perf_counter()
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss.item(),
                **{k: v.item() for k, v in losses.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": len(images) / (time.perf_counter() - started),
            }
            if config.record_debug:
                debug["checksums"].append({"step": step, "checksum": _checksum(core)})
                debug["images"].setdefault(str(epoch), []).extend(ids)
            if rank == 0:
                metrics.append(record)
            validated = False
            if config.val_uri and config.val_every and (step % config.val_every == 0 or step == total):
                if rank == 0:
                    record.update(validate_in_process(core, config))
                    validated = True
                reached = config.target_ap50 is not None and record.get("val_AP50", 0.0) >= config.target_ap50
                if _agree(reached, device):  # every rank stops at the same step
                    total = step
            if rank == 0 and sink is not None and (validated or step % config.log_every == 0 or step == total):
                sent = sink.put.remote({"total": total, **record})  # fire and forget: the driver polls
                if step == total:
                    ray.get(sent)  # the last record is delivered before the worker exits
            if step % config.checkpoint_every == 0 or step == total:
                if rank == 0:
                    _save_training_checkpoint(config, core, optimizer, scheduler, step, epoch)
                    _write_metrics(config, metrics)
            if step % config.report_every == 0 or step == total:
                ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if config.record_debug:
        storage.write_json(
            storage.join(config.model_out_uri, "debug", f"rank{rank}.json"), debug, config.storage_options
        )
    if rank == 0:
        buffer = io.BytesIO()
        save_checkpoint(core.to("cpu"), buffer, class_names=config.class_names)
        storage.write_bytes(storage.join(config.model_out_uri, "model.pt"), buffer.getvalue(), config.storage_options)
        _write_metrics(config, metrics)


def validate_in_process(model: torch.nn.Module, config: TrainConfig) -> dict[str, float]:
    """COCO AP and AP50 of ``model`` on the validation dataset (evaluated in this process)."""
    from .evaluate import ImageDT, ImageGT, coco_metrics

    dataset = open_dataset(config.val_uri, config.storage_options)
    gt, dt = [], []
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for shard in dataset.shards:
            table = read_shard(shard.uri, storage_options=config.storage_options)
            items = list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
            decoded = decode_many(items, threads=2)
            for start in range(0, len(decoded), 16):
                part = [(i, d) for i, d in enumerate(decoded[start : start + 16], start) if isinstance(d, DecodedImage)]
                outputs = model([d.image.to(device).float() / 255 for _, d in part])
                for (row, item), out in zip(part, outputs):
                    boxes, labels, crowd = gt_targets(table.slice(row, 1))[0]
                    gt.append(ImageGT(item.image_id, item.width, item.height, boxes, labels, crowd))
                    dt.append(
                        ImageDT(
                            item.image_id,
                            out["boxes"].cpu().numpy(),
                            out["scores"].cpu().numpy(),
                            out["labels"].cpu().numpy(),
                        )
                    )
    model.train()
    metrics = coco_metrics(gt, dt, dataset.class_names)
    return {"val_AP": metrics["AP"], "val_AP50": metrics["AP50"]}


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag``, broadcast to every rank."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(value, src=0)
    return bool(value.item())


def _checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def _metrics_uri(config: TrainConfig) -> str:
    return storage.join(config.model_out_uri, "metrics.jsonl")


def _load_metrics(config: TrainConfig) -> list[dict[str, Any]]:
    uri = _metrics_uri(config)
    if not storage.exists(uri, config.storage_options):
        return []
    text = storage.read_bytes(uri, config.storage_options).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_metrics(config: TrainConfig, metrics: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(m) + "\n" for m in metrics).encode()
    storage.write_bytes(_metrics_uri(config), data, config.storage_options)


# ------------------------------------------------------------------------------ driver


def validate(
    data_uri: str,
    model_out_uri: str,
    preset: str,
    num_classes: int | None,
    resume: bool,
    storage_options: StorageOptions | None,
) -> tuple[Dataset, int]:
    """Every check that can fail before a worker starts; returns the dataset and class count."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available presets: {sorted(PRESETS)}")
    storage.ensure_bucket(model_out_uri, storage_options)
    dataset = open_dataset(data_uri, storage_options)
    if not dataset.has_labels:
        raise ValueError(f"dataset {storage.redact(dataset.uri)} has no labels: training needs boxes (ingest coco)")
    classes = num_classes or dataset.num_classes
    if classes < dataset.num_classes:
        raise ValueError(f"--num-classes {classes} is below the dataset's {dataset.num_classes} (with background)")
    existing = latest_checkpoint(model_out_uri, storage_options)
    if existing is not None:
        if not resume:
            raise ValueError(
                f"{storage.redact(model_out_uri)} already holds checkpoints: pass --resume to "
                "continue, or choose another output"
            )
        recorded = existing["config"]
        if recorded["preset"] != preset or recorded["num_classes"] != classes:
            raise ValueError(
                f"the checkpoint in {storage.redact(model_out_uri)} is of preset {recorded['preset']!r} with "
                f"{recorded['num_classes']} classes, not {preset!r} with {classes}"
            )
    return dataset, classes


def train(
    data_uri: str,
    model_out_uri: str,
    *,
    preset: str,
    num_classes: int | None = None,
    workers: int = 2,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 0.02,
    resume: bool = False,
    ray_address: str | None = None,
    checkpoint_every: int = 100,
    max_failures: int = 2,
    seed: int = 0,
    storage_options: StorageOptions | None = None,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> TrainSummary:
    """Train ``preset`` on the labelled dataset at ``data_uri`` with ``workers`` DDP workers."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if epochs is None and steps is None:
        epochs = 1
    dataset, classes = validate(data_uri, model_out_uri, preset, num_classes, resume, storage_options)
    from .inference import connect

    connect(ray_address)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    config = TrainConfig(
        data_uri=dataset.uri,
        model_out_uri=storage.normalize(model_out_uri),
        preset=preset,
        num_classes=classes,
        class_names=dataset.class_names + [f"class{i}" for i in range(dataset.num_classes, classes)],
        workers=workers,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        checkpoint_every=checkpoint_every,
        seed=seed,
        overrides=dict(overrides or {}),
        storage_options=dict(storage_options) if storage_options else None,
        use_gpu=use_gpu,
        **options,
    )
    started = time.perf_counter()
    sink = _progress_sink_class().remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**asdict(config), "progress_sink": sink},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}
        ),
        run_config=RunConfig(
            name=f"detectflow-train-{int(time.time())}",
            storage_path=tempfile.mkdtemp(prefix="detectflow-raytrain-"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    report = progress or _log_progress
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(sink, report, stop), name="train-progress", daemon=True)
    poller.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        poller.join(timeout=30)
        ray.kill(sink)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    seconds = time.perf_counter() - started
    metrics = _load_metrics(config)
    if not metrics:
        raise RuntimeError("training produced no metrics")
    storage.write_bytes(
        storage.join(config.model_out_uri, "loss_curves.png"), loss_curves_png(metrics), storage_options
    )
    rates = [m["images_per_s"] for m in metrics[1:]] or [metrics[0]["images_per_s"]]
    restarts = sum(1 for a, b in zip(metrics, metrics[1:]) if b["step"] <= a["step"])
    return TrainSummary(
        model_uri=storage.join(config.model_out_uri, "model.pt"),
        steps=metrics[-1]["step"],
        epochs_seen=metrics[-1]["step"] / steps_per_epoch(dataset, workers, batch_size),
        seconds=seconds,
        first_loss=float(np.mean([m["loss"] for m in metrics[:5]])),
        last_loss=float(np.mean([m["loss"] for m in metrics[-5:]])),
        images_per_s_per_worker=float(np.median(rates)),
        restarts=restarts,
        metrics_uri=_metrics_uri(config),
    )


def _progress_sink_class() -> Any:
    """A tiny actor rank 0 sends progress records to and the driver drains: the driver's logs show
    the training progress wherever the workers run, without Ray's worker log forwarding."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class _ProgressSink:
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []

        def put(self, record: dict[str, Any]) -> None:
            self.records.append(record)

        def take(self) -> list[dict[str, Any]]:
            records, self.records = self.records, []
            return records

    return _ProgressSink


def _poll_progress(sink: Any, report: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    import ray

    while True:
        finished = stop.wait(2.0)
        try:
            records = ray.get(sink.take.remote(), timeout=30)
        except Exception as error:  # progress is best effort: training goes on without it
            log.debug("training progress unavailable: %s", error)
            records = []
        for record in records:
            try:
                report(record)
            except Exception:
                log.exception("training progress callback failed")
        if finished:
            return


def format_progress(record: dict[str, Any]) -> str:
    """One line for a progress record: step, loss, lr, speed and, when present, validation AP."""
    line = (
        f"step {record['step']}/{record['total']}  epoch {record['epoch']}  loss {record['loss']:.3f}  "
        f"lr {record['lr']:.4f}  {record['images_per_s']:.1f} images/s per worker"
    )
    if "val_AP50" in record:
        line += f"  validation AP50 {record['val_AP50']:.3f} AP {record['val_AP']:.3f}"
    return line


def _log_progress(record: dict[str, Any]) -> None:
    log.info(format_progress(record))


def loss_curves_png(metrics: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for key in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        axis.plot(steps, [m[key] for m in metrics], label=key, linewidth=2 if key == "loss" else 1)
    axis.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
