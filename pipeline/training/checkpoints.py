"""Training checkpoints: ``MODEL_OUT/checkpoints/step-NNNNNNN.pt``, written by rank 0 every
``checkpoint_every`` steps and at the end.

A checkpoint holds the model, optimizer, scheduler, step, epoch, RNG state, the job's public spec
(``spec.public()``: never a storage secret) and the plan, as plain tensors and containers, so it
loads with ``torch.load(weights_only=True)``. After a failure Ray Train restarts the worker group
and every worker continues from the latest checkpoint: the data order is a pure function of
(seed, epoch), so the restored run skips exactly the batches already done — the step count is
continuous. ``resume`` continues an interrupted run the same way.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import torch

from detector import save_checkpoint

from .. import storage
from ..jobs import TrainSpec
from ..storage import StorageOptions
from .plan import TrainPlan
from .step import Optimiser

CHECKPOINTS = "checkpoints"
FORMAT = "detectflow.training/2"


def checkpoint_uris(model_out_uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The training checkpoints under ``model_out_uri``, oldest first."""
    return storage.list_files(storage.join(model_out_uri, CHECKPOINTS), storage_options, suffixes=(".pt",))


def latest_checkpoint(model_out_uri: str, storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The newest training checkpoint under ``model_out_uri`` (see the module docstring), or None."""
    uris = checkpoint_uris(model_out_uri, storage_options)
    if not uris:
        return None
    data = storage.read_bytes(uris[-1], storage_options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save(spec: TrainSpec, plan: TrainPlan, model: torch.nn.Module, optimiser: Optimiser, step: int, epoch: int) -> None:
    """Write the checkpoint of ``step`` (``model`` unwrapped from DDP)."""
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimiser.optimizer.state_dict(),
        "scheduler": optimiser.scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "rng": {"torch": torch.get_rng_state()},
        "config": spec.public(),
        "plan": {**asdict(plan), "class_names": list(plan.class_names)},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    uri = storage.join(spec.model_out_uri, CHECKPOINTS, f"step-{step:07d}.pt")
    storage.write_bytes(uri, buffer.getvalue(), spec.storage)


def restore(checkpoint: dict[str, Any] | None, model: torch.nn.Module, optimiser: Optimiser) -> int:
    """Load ``checkpoint`` into ``model`` and ``optimiser`` (and the torch RNG); the step to continue
    from (0 without a checkpoint)."""
    if checkpoint is None:
        return 0
    model.load_state_dict(checkpoint["model"])
    optimiser.optimizer.load_state_dict(checkpoint["optimizer"])
    optimiser.scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return int(checkpoint["step"])


def save_model(spec: TrainSpec, plan: TrainPlan, model: torch.nn.Module) -> str:
    """Write the final model (a detector checkpoint, ``MODEL_OUT/model.pt``); returns its URI."""
    buffer = io.BytesIO()
    save_checkpoint(model, buffer, class_names=list(plan.class_names))
    uri = model_uri(spec)
    storage.write_bytes(uri, buffer.getvalue(), spec.storage)
    return uri


def model_uri(spec: TrainSpec) -> str:
    return storage.join(spec.model_out_uri, "model.pt")
