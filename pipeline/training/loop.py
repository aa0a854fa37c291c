"""What each Ray Train worker runs: restore, then step, validate and checkpoint until done.

Every worker builds the same model, restores the latest checkpoint when there is one, and streams
its own share of each epoch (``stream``); DDP averages the gradients. Rank 0 keeps the metrics,
validates, writes checkpoints and the final model, and sends progress to the driver. Storage is
read and written with ``spec.storage`` only: this process may be on a node where none of the
driver's settings exist.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from detector import build_detector

from ..dataset import Dataset, open_dataset
from ..jobs import TrainSpec
from . import checkpoints
from .metrics import load_metrics, write_metrics
from .plan import TrainPlan
from .progress import WorkerStart
from .step import build_optimiser, train_step
from .stream import RunBatches, StreamSettings, batch_loader, steps_per_epoch
from .validation import validation_metrics

__all__ = ["train_loop_per_worker"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point. ``config``: ``{"spec": TrainSpec, "plan": TrainPlan,
    "progress_sink": the driver's sink actor or None}``."""
    import ray.train

    context = ray.train.get_context()
    worker = _Worker(config["spec"], config["plan"], config.get("progress_sink"))
    worker.run(context.get_world_rank(), context.get_world_size())


class _Worker:
    """One worker's run; ``step`` counts optimisation steps done, ``total`` those to do."""

    def __init__(self, spec: TrainSpec, plan: TrainPlan, sink: Any) -> None:
        self.spec, self.plan, self.sink = spec, plan, sink
        self.metrics: list[dict[str, Any]] = []  # rank 0's records of every step so far

    def run(self, rank: int, world: int) -> None:
        import ray
        import ray.train.torch

        spec, plan = self.spec, self.plan
        self.rank = rank
        torch.manual_seed(spec.seed)
        if not plan.use_gpu:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        self.device = ray.train.torch.get_device()
        dataset = open_dataset(spec.data_uri, spec.storage)
        self.per_epoch = steps_per_epoch(dataset, world, spec.batch_size)
        self.total = spec.steps or self.per_epoch * (spec.total_epochs or 1)
        model = build_detector(spec.preset, plan.num_classes, class_names=list(plan.class_names), **spec.overrides)
        self.optimiser = build_optimiser(model, spec, world, self.total, self.per_epoch)
        latest = checkpoints.latest_checkpoint(spec.model_out_uri, spec.storage)
        self.step = checkpoints.restore(latest, model, self.optimiser)
        if self.sink is not None:
            node_id = ray.get_runtime_context().get_node_id()
            ray.get(self.sink.started.remote(WorkerStart(rank, node_id, self.step)))
        if rank == 0:
            self.metrics = [m for m in load_metrics(spec.model_out_uri, spec.storage) if m["step"] <= self.step]
        self.model = ray.train.torch.prepare_model(model)
        self.core = getattr(self.model, "module", self.model)  # unwrapped from DDP
        self.model.train()
        self._train(dataset, world)
        if rank == 0:
            checkpoints.save_model(spec, plan, self.core.to("cpu"))
            write_metrics(spec.model_out_uri, self.metrics, spec.storage)

    def _train(self, dataset: Dataset, world: int) -> None:
        """Step through the batches the loader prepares ahead, from the current step to ``total``
        (which a reached validation target lowers). Each record has the step's own speed and the
        speed with the wait for its batch included."""
        spec = self.spec
        settings = StreamSettings(spec.batch_size, spec.seed, spec.hflip, spec.storage)
        batches = RunBatches(dataset, settings, rank=self.rank, world=world, start=self.step, stop=self.total)
        loader = batch_loader(batches, workers=spec.loader_workers, pin_memory=self.device.type == "cuda")
        waiting = time.perf_counter()
        for epoch, (_ids, images, targets) in loader:
            waited = time.perf_counter() - waiting
            if self.step >= self.total:
                return
            record = train_step(
                self.model,
                self.optimiser,
                images,
                targets,
                device=self.device,
                clip_grad_norm=spec.clip_grad_norm,
                amp=spec.amp,
            )
            record.update(end_to_end(len(images), waited, record["images_per_s"]))
            self.step += 1
            self._after_step({"step": self.step, "epoch": epoch, **record}, epoch)
            waiting = time.perf_counter()

    def _after_step(self, record: dict[str, Any], epoch: int) -> None:
        """Validate, tell the driver, checkpoint and report, each when it is due."""
        import ray
        import ray.train

        spec, step = self.spec, self.step
        if self.rank == 0:
            self.metrics.append(record)
        validated = self._validate(record)
        if self.rank == 0 and self.sink is not None and (validated or step % spec.log_every == 0 or step == self.total):
            sent = self.sink.put.remote({"total": self.total, **record})  # fire and forget: the driver polls
            if step == self.total:
                ray.get(sent)  # the last record is delivered before the worker exits
        if self.rank == 0 and (step % spec.checkpoint_every == 0 or step == self.total):
            checkpoints.save(spec, self.plan, self.core, self.optimiser, step, epoch)
            write_metrics(spec.model_out_uri, self.metrics, spec.storage)
        if step % spec.log_every == 0 or step == self.total:
            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def _validate(self, record: dict[str, Any]) -> bool:
        """Score the model when validation is due (rank 0; the scores go into ``record``); every rank
        ends the run at this step once the target AP50 is reached. Whether rank 0 validated."""
        spec, step = self.spec, self.step
        if not (spec.val_uri and spec.val_every and (step % spec.val_every == 0 or step == self.total)):
            return False
        if self.rank == 0:
            record.update(validation_metrics(self.core, spec, self.device))
        reached = spec.target_ap50 is not None and record.get("val_AP50", 0.0) >= spec.target_ap50
        if _agree(reached, self.device):  # every rank stops at the same step
            self.total = step
        return self.rank == 0


def end_to_end(images: int, waited_s: float, step_images_per_s: float) -> dict[str, float]:
    """``input_wait_s`` (the step waiting for its batch) and ``end_to_end_images_per_s`` (the
    step's images over the wait and the step together)."""
    return {"input_wait_s": waited_s, "end_to_end_images_per_s": images / (waited_s + images / step_images_per_s)}


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag``, broadcast to every rank."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(value, src=0)
    return bool(value.item())
