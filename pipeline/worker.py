"""The shard worker: one process, the model resident on its device; shard → decode → detect → write
→ commit. A plain class with no Ray inside: the distributors (``pipeline.distributors``) only hand
it shards, in a Ray actor or in the driver's own process.

Stages of a shard: **fetch** (read the Parquet shard, decode its images in a thread pool — nvjpeg
in one batch on CUDA), **detect** (``pipeline.detect.detect_images``: batches of similar aspect
ratio, ``torch.inference_mode``, AMP when the job asks for it, channels_last), **write** (the
``images`` and ``detections`` files, then the commit record; see ``pipeline.outputs``).

:meth:`ShardWorker.process` runs the three stages of one shard in the calling thread and is
thread-safe: the model is guarded by a lock, so a distributor that calls it from two threads
overlaps one shard's fetch and write with another's detection. The model is built on a thread of
its own from the constructor on (the checkpoint is read, and a missing one refused, in the
constructor): the first shards are read and decoded while it loads.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch

from detector import load_checkpoint

from . import storage
from .dataset import ShardInfo, read_shard
from .decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, decode_many
from .detect import detect_images
from .jobs import InferenceSpec
from .outputs import DETECTIONS_SCHEMA, IMAGES_SCHEMA, OutputStore

# CPU decoding threads per shard (decoders release the GIL); on CUDA, JPEGs are decoded by nvjpeg.
DECODE_THREADS = 4
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    shard: ShardInfo
    decoded: list[DecodedImage | DecodeError]
    timings: dict[str, float]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when this process has a usable device, else the CPU. The value itself was
    validated by the job spec; this checks that CUDA, when asked for, is there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but this machine has no usable CUDA device")
    return torch.device(device)


def model_id_of(checkpoint: bytes) -> str:
    """The model's identity in outputs: the sha256 of its checkpoint bytes (first 16 hex digits)."""
    return hashlib.sha256(checkpoint).hexdigest()[:16]


class ShardWorker:
    """Detects objects in whole shards of ``spec.data_uri`` and commits their outputs to
    ``spec.out_uri``.

    ``run_id`` goes into every output row and commit record; ``node`` (default: the host name; the
    Ray node id in an actor) and ``worker_id`` (default ``node:pid``) into the commit records, to
    tell where a shard was done. ``device``: the device the distributor placed this worker on
    (``"cuda"`` for a GPU actor), else ``spec.device``; resolved here, once. The model runs in
    channels_last (NHWC) memory format: faster convolutions on CUDA (cuDNN) and on x86 CPUs (oneDNN;
    bench/detector.py measured 1.1–1.3× here) with identical results.
    """

    def __init__(
        self,
        spec: InferenceSpec,
        *,
        run_id: str | None = None,
        node: str | None = None,
        worker_id: str | None = None,
        device: str | None = None,
    ):
        if spec.threads_per_worker:
            torch.set_num_threads(spec.threads_per_worker)
        self.spec = spec
        self.device = resolve_device(device or spec.device)
        self.amp_dtype = AMP_DTYPES.get(spec.amp) if self.device.type == "cuda" else None
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.node = node or socket.gethostname()
        self.worker_id = worker_id or f"{self.node}:{os.getpid()}"

        checkpoint = storage.read_bytes(spec.model_uri, spec.storage)
        self.model_id = model_id_of(checkpoint)
        self.store = OutputStore(spec.out_uri, spec.storage)
        self._model_lock = threading.Lock()
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._model = loader.submit(self._load_model, checkpoint)  # built while the first shards are fetched
        loader.shutdown(wait=False)

    def _load_model(self, checkpoint: bytes) -> torch.nn.Module:
        overrides = {} if self.spec.score_threshold is None else {"box_score_thresh": float(self.spec.score_threshold)}
        model = load_checkpoint(io.BytesIO(checkpoint), **overrides).eval().to(self.device)
        return model.to(memory_format=torch.channels_last)

    @property
    def model(self) -> torch.nn.Module:
        """The model, once built (waits for it; raises what building it raised)."""
        return self._model.result()

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names or [str(i) for i in range(self.model.num_classes)]

    def process(self, shard: ShardInfo) -> ShardResult:
        """One shard, start to commit, in the calling thread; a committed shard is skipped, never
        rewritten. Thread-safe."""
        if self.store.is_committed(shard.name):
            return ShardResult(shard.name, skipped=True)
        return self.write(*self.detect(self.fetch(shard)))

    # ------------------------------------------------------------------------------ stages

    def fetch(self, shard: ShardInfo) -> FetchedShard:
        started = time.perf_counter()
        table = read_shard(shard.uri, ["image_id", "image"], self.spec.storage)
        read_s = time.perf_counter() - started
        items = list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
        del table
        started = time.perf_counter()
        decoded = decode_many(items, max_pixels=DEFAULT_MAX_PIXELS, threads=DECODE_THREADS, device=self.device)
        return FetchedShard(shard, decoded, {"read": read_s, "decode": time.perf_counter() - started})

    def detect(self, fetched: FetchedShard) -> tuple[pa.Table, pa.Table, ShardResult]:
        """The shard's ``images`` and ``detections`` tables, and its result so far."""
        started = time.perf_counter()
        ok = [item for item in fetched.decoded if isinstance(item, DecodedImage)]
        with self._model_lock:
            outputs = detect_images(
                self.model,
                [item.image for item in ok],
                batch_size=self.spec.batch_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
            )
        detect_s = time.perf_counter() - started
        outputs_iter = iter(outputs)
        aligned = [next(outputs_iter) if isinstance(item, DecodedImage) else None for item in fetched.decoded]
        images, detections = self._tables(fetched, aligned)
        errors = sum(1 for item in fetched.decoded if isinstance(item, DecodeError))
        timings = {**fetched.timings, "detect": detect_s}
        result = ShardResult(fetched.shard.name, images.num_rows, errors, detections.num_rows, timings)
        return images, detections, result

    def write(self, images: pa.Table, detections: pa.Table, result: ShardResult) -> ShardResult:
        started = time.perf_counter()
        record = {
            "run_id": self.run_id,
            "model_id": self.model_id,
            "num_errors": result.num_errors,
            "timings": result.timings,
            "node": self.node,
            "worker": self.worker_id,
        }
        self.store.write_shard(result.shard, images, detections, record)
        result.timings["write"] = time.perf_counter() - started
        return result

    # ---------------------------------------------------------------------------- helpers

    def _tables(
        self, fetched: FetchedShard, outputs: list[dict[str, torch.Tensor] | None]
    ) -> tuple[pa.Table, pa.Table]:
        """One ``images`` row per decoded item (ok or error), one ``detections`` row per box;
        ``outputs[i]``: the detections of ``fetched.decoded[i]`` (None for an error)."""
        shard, names = fetched.shard.name, self.class_names
        image_rows: list[dict[str, Any]] = []
        columns: dict[str, list] = {name: [] for name in DETECTIONS_SCHEMA.names}
        for item, out in zip(fetched.decoded, outputs):
            if isinstance(item, DecodeError):
                image_rows.append(self._image_row(item.image_id, shard, None, None, "error", item.message, 0))
                continue
            count = len(out["scores"])
            image_rows.append(self._image_row(item.image_id, shard, item.width, item.height, "ok", None, count))
            if not count:
                continue
            labels = out["labels"].tolist()
            columns["image_id"] += [item.image_id] * count
            columns["shard"] += [shard] * count
            columns["label"] += labels
            columns["label_name"] += [names[label] if 0 <= label < len(names) else None for label in labels]
            columns["score"] += out["scores"].tolist()
            for column, values in zip(("x1", "y1", "x2", "y2"), out["boxes"].numpy().T):
                columns[column] += values.tolist()
            columns["run_id"] += [self.run_id] * count
            columns["model_id"] += [self.model_id] * count
        images = pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA)
        return images, pa.Table.from_pydict(columns, schema=DETECTIONS_SCHEMA)

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
