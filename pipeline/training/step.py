"""The optimiser and one optimisation step: SGD with momentum or AdamW, weight decay, the schedule of
``schedule`` (the warm-up at most one epoch long), optional gradient clipping, bf16 autocast on CUDA."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..jobs import TrainSpec
from .recipe import scaled_lr
from .schedule import lr_factor


@dataclass
class Optimiser:
    """What one step updates: the trained parameters, the optimizer (SGD or AdamW), its LR scheduler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def build_optimiser(model: torch.nn.Module, spec: TrainSpec, world: int, total: int, per_epoch: int) -> Optimiser:
    """``spec.optimizer`` over ``model``'s trainable parameters, scheduled over ``total`` steps of which the first
    ``spec.warmup_steps`` (at most one epoch of ``per_epoch``) warm up."""
    warmup = min(spec.warmup_steps, per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(spec.lr, spec.batch_size, world, spec.optimizer)
    if spec.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, total, warmup, spec.schedule, warmup_factor=spec.warmup_factor, milestones=spec.lr_milestones
        ),
    )
    return Optimiser(params, optimizer, scheduler)


def train_step(
    model: torch.nn.Module,
    optimiser: Optimiser,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    clip_grad_norm: float | None,
    amp: bool,
) -> dict[str, float]:
    """Forward, loss, backward, clip, step and schedule on one batch (``images`` uint8 ``[3,H,W]``
    on the CPU, pinned for a CUDA ``device``; ``targets`` as the model takes them). Returns the
    record of the step: ``loss`` (the sum), each loss term, the ``lr`` now and this worker's
    ``images_per_s`` (of the step alone: from the batch in hand to the updated weights)."""
    started = time.perf_counter()
    images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimiser.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(optimiser.params, clip_grad_norm)
    optimiser.optimizer.step()
    optimiser.scheduler.step()
    return {
        "loss": loss.item(),
        **{name: value.item() for name, value in losses.items()},
        "lr": optimiser.optimizer.param_groups[0]["lr"],
        "images_per_s": len(images) / (time.perf_counter() - started),
    }
