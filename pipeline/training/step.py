"""The optimiser and one optimisation step: SGD with momentum and weight decay, the schedule of
``schedule``, optional gradient clipping, bf16 autocast on CUDA."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..jobs import TrainSpec
from .schedule import lr_factor, scaled_lr


@dataclass
class Optimiser:
    """What one step updates: the trained parameters, the SGD optimizer, its LR scheduler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR


def build_optimiser(model: torch.nn.Module, spec: TrainSpec, world: int, total: int) -> Optimiser:
    """SGD over ``model``'s trainable parameters, scheduled over ``total`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=scaled_lr(spec.lr, spec.batch_size, world),
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, spec.warmup_steps, spec.schedule)
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
    """Forward, loss, backward, clip, step and schedule on one batch (``images`` float ``[3,H,W]``
    in ``[0,1]`` on the CPU, ``targets`` as the model takes them). Returns the record of the step:
    ``loss`` (the sum), each loss term, the ``lr`` now and this worker's ``images_per_s``."""
    started = time.perf_counter()
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
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
