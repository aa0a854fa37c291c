"""Job specs: one frozen, validated settings value per job.

A spec is built once at the edge (the CLI's options, a flow's parameters, a deployment's JSON) and
validated there, in ``__post_init__``: a bad device, batch size, threshold or URI fails before any
work starts, naming the setting. It is then handed whole, unchanged, to every function and every
process that needs it: the Prefect flow and its tasks, the Ray actors of inference, the Ray Train
workers, a Ray job's driver. Nothing is re-listed along the way and nothing is parked in module
state, so a worker on another node sees exactly the job the user asked for.

Specs are plain frozen dataclasses of JSON-friendly fields: Prefect records them as flow-run
parameters and validates deployment parameters into them, Ray pickles them to its workers. Storage
settings travel inside, as a :class:`~pipeline.storage_config.StorageConfig`, whose secrets never
appear in any serialised form (see that module).

    spec = InferenceSpec(data_uri="s3://b/ds", out_uri="s3://b/out", model_uri="s3://b/model.pt",
                         storage=StorageConfig.parse(["client_kwargs.endpoint_url=http://minio:9000"]))
    spec.public()     # the JSON form: manifests, logs, Prefect parameters (no secret values)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from . import storage
from .storage_config import StorageConfig

Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["off", "bf16", "fp16"]
IngestSource = Literal["coco", "images", "synthetic"]
# How an incremental ingest lists its prefix: all of it, or only what sorts after the last path listed.
Listing = Literal["full", "after-last"]
Optimizer = Literal["sgd", "adamw"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _uri(value: str | None, name: str) -> str | None:
    """A URI setting, normalised (plain paths → absolute ``file://``); empty strings are refused."""
    if value is None:
        return None
    _check(isinstance(value, str) and value.strip() != "", f"{name} must be a URI or path, not {value!r}")
    return storage.normalize(value.strip())


def _normalise_uris(spec: Any, *names: str) -> None:
    for name in names:
        object.__setattr__(spec, name, _uri(getattr(spec, name), name))


def _nested(spec: Any) -> None:
    """Accept the nested settings as mappings (a deployment's JSON) as well as values: the storage
    options, and the cluster where the spec has one."""
    value = spec.storage
    if isinstance(value, dict):
        value = StorageConfig(value.get("options", value) if set(value) <= {"options"} else value)
    _check(isinstance(value, StorageConfig), f"storage must be storage options, not {type(value).__name__}")
    object.__setattr__(spec, "storage", value)
    if isinstance(getattr(spec, "cluster", None), dict):
        object.__setattr__(spec, "cluster", ClusterSpec(**spec.cluster))


def _redact_uris(value: Any) -> Any:
    """URIs with user info or signed query strings shown without them (``storage.redact``)."""
    if isinstance(value, dict):
        return {
            k: storage.redact(v) if k.endswith("_uri") and isinstance(v, str) else _redact_uris(v)
            for k, v in value.items()
        }
    return value


class JobSpec:
    """What every spec offers."""

    storage: StorageConfig

    def public(self) -> dict[str, Any]:
        """The JSON form, secrets masked or referenced: safe for manifests, logs and parameters."""
        return _redact_uris(dataclasses.asdict(self))  # type: ignore[call-overload]

    def uris(self) -> list[str]:
        """Every location the job reads or writes (for the multi-node check)."""
        return [value for name, value in vars(self).items() if name.endswith("_uri") and isinstance(value, str)]

    def resolved(self, lookup: Any = None) -> Any:
        """The same spec with its storage references resolved in this process (the driver)."""
        return dataclasses.replace(self, storage=self.storage.resolve(lookup))  # type: ignore[type-var]


@dataclass(frozen=True)
class ClusterSpec:
    """Where Ray work runs. ``ray_address``: a cluster to join (default ``RAY_ADDRESS`` or a local
    one). ``shared_filesystem``: local paths are on a filesystem every node mounts (NFS, Lustre),
    so they may be used on a cluster of several nodes. ``worker_logs``: print the Ray processes'
    output (actors, Ray Train's controller and workers) on the driver's terminal (the CLI shows it
    with ``--verbose``; it is always in Ray's session logs)."""

    ray_address: str | None = None
    shared_filesystem: bool = False
    worker_logs: bool = True


@dataclass(frozen=True)
class IngestSpec(JobSpec):
    out_uri: str
    source: IngestSource = "images"
    images_uri: str | None = None
    annotations_uri: str | None = None
    num_images: int = 256
    seed: int = 0
    image_size: int = 128
    shard_size: int = 256
    only_new: bool = False
    listing: Listing = "full"
    lease_wait_s: float = 0.0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _nested(self)
        _check(self.source in ("coco", "images", "synthetic"), f"unknown source {self.source!r}")
        _check(self.listing in get_args(Listing), f"listing must be full or after-last, not {self.listing!r}")
        _check(self.source == "synthetic" or bool(self.images_uri), f"source {self.source!r} needs images_uri")
        _check(self.source != "coco" or bool(self.annotations_uri), "source 'coco' needs annotations_uri")
        _check(self.num_images >= 1 and self.shard_size >= 1, "num_images and shard_size must be ≥ 1")
        _check(self.image_size >= 16, f"image_size must be ≥ 16, not {self.image_size}")
        _check(self.lease_wait_s >= 0, f"lease_wait_s must be ≥ 0, not {self.lease_wait_s}")
        _normalise_uris(self, "out_uri", "images_uri", "annotations_uri")


@dataclass(frozen=True)
class InferenceSpec(JobSpec):
    """Batch inference of ``model_uri`` over the dataset ``data_uri`` into ``out_uri``.

    ``workers``: actors (default: one per GPU, else one per CPU of the cluster); ``executor``:
    ``ray`` (actors on the cluster) or ``local`` (this process: a laptop, a debugger, a GPU box
    without Ray); ``amp``: reduced precision on CUDA (opt-in: it moves low scores across the
    threshold); ``threads_per_worker``: torch threads of each CPU actor (default 1); ``replace``:
    delete what ``out_uri`` holds and rewrite it from scratch (an output prefix belongs to one model
    and one set of row-changing settings: a run of another is refused without it); ``lease_wait_s``:
    how long to wait for another run that holds ``out_uri`` (0: refuse at once, naming it).
    """

    data_uri: str
    out_uri: str
    model_uri: str
    workers: int | None = None
    batch_size: int = 8
    score_threshold: float | None = None
    device: Device = "auto"
    amp: Amp = "off"
    threads_per_worker: int | None = None
    max_shard_attempts: int = 3
    executor: Literal["ray", "local"] = "ray"
    replace: bool = False
    lease_wait_s: float = 0.0
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _nested(self)
        _check(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, not {self.device!r}")
        _check(self.amp in ("off", "bf16", "fp16"), f"amp must be off, bf16 or fp16, not {self.amp!r}")
        _check(self.executor in ("ray", "local"), f"executor must be ray or local, not {self.executor!r}")
        _check(self.batch_size >= 1, f"batch_size must be ≥ 1, not {self.batch_size}")
        _check(self.workers is None or self.workers >= 1, f"workers must be ≥ 1, not {self.workers}")
        _check(self.threads_per_worker is None or self.threads_per_worker >= 1, "threads_per_worker must be ≥ 1")
        _check(self.max_shard_attempts >= 1, "max_shard_attempts must be ≥ 1")
        _check(self.lease_wait_s >= 0, f"lease_wait_s must be ≥ 0, not {self.lease_wait_s}")
        _check(
            self.score_threshold is None or 0.0 <= self.score_threshold <= 1.0,
            f"score_threshold must be within [0, 1], not {self.score_threshold}",
        )
        _normalise_uris(self, "data_uri", "out_uri", "model_uri")


@dataclass(frozen=True)
class TrainSpec(JobSpec):
    """Training of ``preset`` on the labelled dataset ``data_uri``; everything lands under
    ``model_out_uri``. The recipe settings left as None (``optimizer``, ``batch_size``, ``lr``,
    ``warmup_steps``, ``warmup_factor``, ``schedule``, ``lr_milestones``, ``momentum`` — AdamW's β1 —
    and ``weight_decay``) take the preset's recipe (``pipeline.training.recipe``) when the spec is
    built. ``lr`` is per 16 images, scaled with the global batch (``workers`` × ``batch_size``:
    linearly for SGD, with its square root for AdamW); the recipe's warm-up is given in
    images, so its steps follow the global batch too. ``lr_milestones``: fractions of the run at
    which the step schedule multiplies the learning rate by 0.1. ``loader_workers``: processes per
    training worker that read and decode batches ahead of the step (0: in the step's process).
    ``val_uri``: a labelled dataset scored every ``val_every`` steps (and, by the
    train-and-evaluate flow, after training); ``target_ap50``: stop once it is reached."""

    data_uri: str
    model_out_uri: str
    preset: str = "tiny"
    num_classes: int | None = None
    workers: int = 2
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    optimizer: Optimizer | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    warmup_factor: float | None = None
    schedule: Literal["cosine", "step"] | None = None
    lr_milestones: tuple[float, ...] | None = None
    clip_grad_norm: float | None = None
    hflip: bool = True
    amp: bool = True
    loader_workers: int = 2
    checkpoint_every: int = 100
    seed: int = 0
    resume: bool = False
    val_uri: str | None = None
    val_every: int | None = None
    target_ap50: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    log_every: int = 50
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        from detector import PRESETS

        _nested(self)
        _check(self.preset in PRESETS, f"unknown preset {self.preset!r}; available presets: {sorted(PRESETS)}")
        _check(self.epochs is None or self.steps is None, "give epochs or steps, not both")
        _check(self.workers >= 1, f"workers must be ≥ 1, not {self.workers}")
        self._fill_recipe()
        for name in ("batch_size", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{name} must be ≥ 1, not {getattr(self, name)}")
        for name in ("epochs", "steps", "val_every"):
            _check(getattr(self, name) is None or getattr(self, name) >= 1, f"{name} must be ≥ 1")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes counts the background: ≥ 2")
        _check(self.lr > 0 and self.warmup_steps >= 0 and self.max_failures >= 0, "lr > 0, warmup_steps ≥ 0")
        _check(0 < self.warmup_factor <= 1, f"warmup_factor must be within (0, 1], not {self.warmup_factor}")
        _check(self.loader_workers >= 0, f"loader_workers must be ≥ 0, not {self.loader_workers}")
        _check(self.schedule in ("cosine", "step"), f"schedule must be cosine or step, not {self.schedule!r}")
        _check(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones are fractions of the run, within (0, 1)")
        _normalise_uris(self, "data_uri", "model_out_uri", "val_uri")

    def _fill_recipe(self) -> None:
        """The preset's recipe for every recipe setting left unset."""
        from .training.recipe import recipe_for

        recipe = recipe_for(self.preset)
        batch_size = self.batch_size or recipe.batch_size
        optimizer = self.optimizer or recipe.optimizer
        _check(optimizer in get_args(Optimizer), f"optimizer must be sgd or adamw, not {optimizer!r}")
        lr = recipe.lr_for(optimizer)
        _check(
            self.lr is not None or lr is not None,
            f"preset {self.preset}'s recipe has no learning rate for {optimizer}: give one (--lr)",
        )
        defaults = {
            "batch_size": recipe.batch_size,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
            "warmup_steps": recipe.warmup_steps(batch_size, self.workers),
            "warmup_factor": recipe.warmup_factor,
            "schedule": recipe.schedule,
            "lr_milestones": recipe.milestones,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))

    @property
    def total_epochs(self) -> int | None:
        """Epochs to run when neither epochs nor steps is given: one."""
        return self.epochs if self.epochs is not None or self.steps is not None else 1


@dataclass(frozen=True)
class EvaluateSpec(JobSpec):
    data_uri: str
    out_uri: str
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _nested(self)
        _normalise_uris(self, "data_uri", "out_uri")


@dataclass(frozen=True)
class DetectNewSpec(JobSpec):
    """The nightly job: append the images under ``images_uri`` that ``inference.data_uri`` does
    not hold yet, then run ``inference`` (only uncommitted shards). ``listing``: ``after-last``
    lists only the paths sorting after the last one listed before (date-partitioned prefixes,
    ``incoming/2026/11/30/…``); ``full`` lists everything (catches files that arrived out of order)."""

    images_uri: str
    inference: InferenceSpec
    shard_size: int = 256
    listing: Listing = "full"

    def __post_init__(self) -> None:
        if isinstance(self.inference, dict):
            object.__setattr__(self, "inference", InferenceSpec(**self.inference))
        _check(self.shard_size >= 1, "shard_size must be ≥ 1")
        _check(self.listing in get_args(Listing), f"listing must be full or after-last, not {self.listing!r}")
        _normalise_uris(self, "images_uri")

    @property
    def storage(self) -> StorageConfig:  # type: ignore[override]
        return self.inference.storage

    def ingest(self) -> IngestSpec:
        return IngestSpec(
            out_uri=self.inference.data_uri,
            source="images",
            images_uri=self.images_uri,
            shard_size=self.shard_size,
            only_new=True,
            listing=self.listing,
            lease_wait_s=self.inference.lease_wait_s,
            storage=self.inference.storage,
        )

    def uris(self) -> list[str]:
        return [self.images_uri, *self.inference.uris()]

    def resolved(self, lookup: Any = None) -> DetectNewSpec:
        return dataclasses.replace(self, inference=self.inference.resolved(lookup))
