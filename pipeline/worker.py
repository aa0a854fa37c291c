"""The shard worker: one process, the model resident on its device; shard → decode → detect → write
→ commit. A plain class with no Ray inside: Ray (``pipeline.inference``) only distributes shards to
workers, and the GPU benchmark runs the worker in-process.

Stages of a shard: **fetch** (read the Parquet shard, decode its images in a thread pool — nvjpeg
in one batch on CUDA), **detect** (batches of similar aspect ratio, ``torch.inference_mode``, AMP
and channels_last where they help), **write** (the ``images`` and ``detections`` files, then the
commit record; see ``pipeline.outputs``). ``process_shards`` overlaps them: the next shard is
fetched and decoded while the current one is on the device, and outputs are written in the
background. The model is guarded by a lock, so ``process`` may also be called from several threads
(the Ray actor does that to overlap fetching with detection).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch

from detector import load_checkpoint

from . import storage
from .dataset import read_shard
from .decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, decode_many
from .outputs import DETECTIONS_SCHEMA, IMAGES_SCHEMA, OutputStore
from .storage import StorageOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    name: str  # "shard-00003"
    uri: str  # the shard's Parquet file


@dataclass
class ShardResult:
    shard: str
    num_images: int = 0
    num_errors: int = 0
    num_detections: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    skipped: bool = False  # already committed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FetchedShard:
    task: ShardTask
    decoded: list[DecodedImage | DecodeError]
    timings: dict[str, float]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this machine has no usable CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def model_id_of(checkpoint: bytes) -> str:
    """The model's identity in outputs: the sha256 of its checkpoint bytes (first 16 hex digits)."""
    return hashlib.sha256(checkpoint).hexdigest()[:16]


class ShardWorker:
    """Detects objects in whole shards and commits their outputs.

    ``amp``: ``"off"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (off: reduced precision moved
    low-score detections across the threshold in our checks, so it is opt-in). The model runs in
    channels_last (NHWC) memory format: faster convolutions on CUDA (cuDNN) and on x86 CPUs (oneDNN;
    bench/detector.py measured 1.1–1.3× here) with identical results.
    """

    def __init__(
        self,
        model_uri: str,
        out_uri: str,
        *,
        run_id: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        score_threshold: float | None = None,
        amp: str = "auto",
        decode_threads: int = 4,
        torch_threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: StorageOptions | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        if amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, off, bf16 or fp16, not {amp!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.max_pixels = max_pixels
        self.storage_options = storage_options
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if self.device.type == "cuda" else None
        )

        checkpoint = storage.read_bytes(model_uri, storage_options)
        self.model_id = model_id_of(checkpoint)
        overrides = {} if score_threshold is None else {"box_score_thresh": float(score_threshold)}
        self.model = load_checkpoint(io.BytesIO(checkpoint), **overrides).eval().to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names = self.model.class_names or [str(i) for i in range(self.model.num_classes)]
        self.store = OutputStore(out_uri, storage_options)
        self._model_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")

    # ------------------------------------------------------------------------------ stages

    def fetch(self, task: ShardTask) -> FetchedShard:
        started = time.perf_counter()
        table = read_shard(task.uri, ["image_id", "image"], self.storage_options)
        read_s = time.perf_counter() - started
        items = list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
        del table
        started = time.perf_counter()
        decoded = decode_many(items, max_pixels=self.max_pixels, threads=self.decode_threads, device=self.device)
        return FetchedShard(task, decoded, {"read": read_s, "decode": time.perf_counter() - started})

    def detect(self, fetched: FetchedShard) -> tuple[pa.Table, pa.Table, ShardResult]:
        started = time.perf_counter()
        shard = fetched.task.name
        ok = [i for i, d in enumerate(fetched.decoded) if isinstance(d, DecodedImage)]
        # Similar aspect ratios together: less padding in each batch.
        ok.sort(key=lambda i: fetched.decoded[i].height / fetched.decoded[i].width)
        outputs: dict[int, dict[str, torch.Tensor]] = {}
        with self._model_lock, torch.inference_mode():
            for start in range(0, len(ok), self.batch_size):
                indices = ok[start : start + self.batch_size]
                images = [fetched.decoded[i].image.to(self.device).float().div_(255) for i in indices]
                if self.amp_dtype is not None:
                    with torch.autocast("cuda", dtype=self.amp_dtype):
                        results = self.model(images)
                else:
                    results = self.model(images)
                for i, result in zip(indices, results):
                    outputs[i] = {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in result.items()}
        detect_s = time.perf_counter() - started

        image_rows, detection_columns = [], {name: [] for name in DETECTIONS_SCHEMA.names}
        errors = 0
        for index, item in enumerate(fetched.decoded):
            if isinstance(item, DecodeError):
                errors += 1
                image_rows.append(self._image_row(item.image_id, shard, None, None, "error", item.message, 0))
                continue
            out = outputs[index]
            count = len(out["scores"])
            image_rows.append(self._image_row(item.image_id, shard, item.width, item.height, "ok", None, count))
            if count:
                boxes = out["boxes"].numpy()
                labels = out["labels"].tolist()
                detection_columns["image_id"] += [item.image_id] * count
                detection_columns["shard"] += [shard] * count
                detection_columns["label"] += labels
                detection_columns["label_name"] += [self._label_name(lab) for lab in labels]
                detection_columns["score"] += out["scores"].tolist()
                for column, values in zip(("x1", "y1", "x2", "y2"), boxes.T):
                    detection_columns[column] += values.tolist()
                detection_columns["run_id"] += [self.run_id] * count
                detection_columns["model_id"] += [self.model_id] * count
        images = pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA)
        detections = pa.Table.from_pydict(detection_columns, schema=DETECTIONS_SCHEMA)
        result = ShardResult(
            shard, images.num_rows, errors, detections.num_rows, {**fetched.timings, "detect": detect_s}
        )
        return images, detections, result

    def write(self, images: pa.Table, detections: pa.Table, result: ShardResult) -> ShardResult:
        started = time.perf_counter()
        record = {
            "run_id": self.run_id,
            "model_id": self.model_id,
            "num_errors": result.num_errors,
            "timings": result.timings,
            "worker": f"{os.uname().nodename}:{os.getpid()}",
        }
        self.store.write_shard(result.shard, images, detections, record, overwrite=True)
        result.timings["write"] = time.perf_counter() - started
        return result

    # ---------------------------------------------------------------------------- drivers

    def process(self, task: ShardTask) -> ShardResult:
        """One shard, start to commit, in the calling thread. Thread-safe."""
        if self.store.is_committed(task.name):
            return ShardResult(task.name, skipped=True)
        images, detections, result = self.detect(self.fetch(task))
        return self.write(images, detections, result)

    def process_shards(self, tasks: Iterable[ShardTask]) -> Iterator[ShardResult]:
        """Shards in a pipeline: fetch of shard n+1 and write of shard n-1 overlap detection of
        shard n. Yields results in order as their commits complete; committed shards are skipped."""
        committed = self.store.committed_names()
        todo = [t for t in tasks if t.name not in committed]
        next_fetch: Future | None = self._prefetcher.submit(self.fetch, todo[0]) if todo else None
        pending_write: Future | None = None
        for position, _task in enumerate(todo):
            fetched = next_fetch.result()
            next_fetch = self._prefetcher.submit(self.fetch, todo[position + 1]) if position + 1 < len(todo) else None
            images, detections, result = self.detect(fetched)
            del fetched
            if pending_write is not None:
                yield pending_write.result()
            pending_write = self._writer.submit(self.write, images, detections, result)
        if pending_write is not None:
            yield pending_write.result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._prefetcher.shutdown(wait=True)

    # ---------------------------------------------------------------------------- helpers

    def _label_name(self, label: int) -> str | None:
        return self.class_names[label] if 0 <= label < len(self.class_names) else None

    def _image_row(
        self,
        image_id: str,
        shard: str,
        width: int | None,
        height: int | None,
        status: str,
        error: str | None,
        num_detections: int,
    ) -> dict[str, Any]:
        return {
            "image_id": image_id,
            "shard": shard,
            "width": width,
            "height": height,
            "status": status,
            "error": error,
            "num_detections": num_detections,
            "run_id": self.run_id,
            "model_id": self.model_id,
        }


def shard_tasks(shards: Sequence[Any]) -> list[ShardTask]:
    """Tasks for a dataset's ``ShardInfo`` list."""
    return [ShardTask(s.name, s.uri) for s in shards]
