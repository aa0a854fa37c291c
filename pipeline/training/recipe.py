"""Default training recipes, one per detector preset: optimiser, images per worker, learning rate,
warm-up, schedule, momentum and weight decay — what a run uses for every setting the job leaves unset.

The learning rate is given per ``BASE_BATCH`` (16) images and scaled with the global batch
(``workers × batch_size``): linearly for SGD (Goyal et al. 2017), with the square root for AdamW
(Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"). The warm-up
is given in images, so changing the number of workers or the batch size keeps the recipe: the same
warm-up in images (in steps: images ÷ global batch, at most one epoch — torchvision's rule). Sources:

- ``tiny``: tuned on generated shapes here (``bench/train_defaults.py``, 10 epochs of 500 images, 2
  workers): AdamW at 0.001 per 16 images reaches AP50 0.93, where the best SGD recipe tried (lr 0.04,
  held and dropped late) reached 0.74 — a small network trained from scratch for a few hundred
  steps learns far faster with an adaptive optimiser;
- ``resnet50_fpn`` and the MobileNet presets: torchvision's ``references/detection`` (8 GPUs × 2
  images, SGD lr 0.02, momentum 0.9, weight decay 1e-4, linear warm-up over 1000 iterations from
  0.001, 26 epochs with ×0.1 at epochs 16 and 22); Detectron2's 1x schedule is the same learning
  rate per image and warm-up with steps at 2/3 and 8/9 (60k and 80k of 90k iterations);
- ``vgg16_paper``: Ren et al. 2015, §4 (SGD, one image per mini-batch, lr 0.001 for 60k
  mini-batches then 0.0001 for 20k, momentum 0.9, weight decay 0.0005, no warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BASE_BATCH = 16  # the learning rate is given per this many images
DETECTRON2_STEPS = (2 / 3, 8 / 9)  # 60k and 80k of 90k iterations (the 1x schedule)
OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW"}


@dataclass(frozen=True)
class Recipe:
    """A preset's defaults. ``optimizer``: ``sgd`` (``momentum`` its momentum) or ``adamw``
    (``momentum`` its β1; β2 0.999; decoupled weight decay); ``batch_size``: images per worker per
    step; ``lr``: per 16 images;
    ``warmup_images``: linear warm-up from ``warmup_factor`` × the learning rate; ``schedule``:
    ``cosine`` (to 0.02×) or ``step`` (×0.1 at each of ``milestones``, fractions of the run);
    ``epochs``: the reference run's length (documentation: a job's length is its own)."""

    batch_size: int
    lr: float
    warmup_images: int
    warmup_factor: float
    schedule: str
    milestones: tuple[float, ...]
    momentum: float
    weight_decay: float
    epochs: int | None
    source: str
    optimizer: str = "sgd"
    other_lrs: tuple[tuple[str, float], ...] = ()  # (optimizer, lr per 16 images) for another optimiser

    def lr_for(self, optimizer: str) -> float | None:
        """The learning rate per 16 images for ``optimizer`` (None: this recipe has none for it)."""
        return self.lr if optimizer == self.optimizer else dict(self.other_lrs).get(optimizer)

    def warmup_steps(self, batch_size: int, workers: int) -> int:
        """The warm-up in steps of ``workers × batch_size`` images."""
        return math.ceil(self.warmup_images / (batch_size * workers))


_TORCHVISION = Recipe(
    batch_size=2,
    lr=0.02,
    warmup_images=16_000,  # 1000 iterations of 16 images
    warmup_factor=0.001,
    schedule="step",
    milestones=(16 / 26, 22 / 26),
    momentum=0.9,
    weight_decay=1e-4,
    epochs=26,
    source="torchvision references/detection (8 GPUs × 2 images, lr 0.02, --epochs 26 --lr-steps 16 22)",
)

RECIPES = {
    "tiny": Recipe(
        optimizer="adamw",
        batch_size=8,
        lr=0.001,
        warmup_images=800,  # 50 steps of 2 × 8 images
        warmup_factor=0.1,
        schedule="step",
        milestones=(0.85, 0.95),
        momentum=0.9,
        weight_decay=1e-4,
        epochs=10,
        source="tuned on generated shapes (bench/train_defaults.py: AdamW AP50 0.93, SGD at best 0.74)",
        other_lrs=(("sgd", 0.04),),  # the best SGD rate found (AP50 0.74)
    ),
    "resnet50_fpn": _TORCHVISION,
    "mobilenet_v3_large_fpn": _TORCHVISION,
    "mobilenet_v3_large_320_fpn": _TORCHVISION,
    "vgg16_paper": Recipe(
        batch_size=1,
        lr=0.016,  # 0.001 per image
        warmup_images=0,
        warmup_factor=1.0,
        schedule="step",
        milestones=(0.75,),
        momentum=0.9,
        weight_decay=5e-4,
        epochs=None,
        source="Ren et al. 2015 §4 (1 image per mini-batch, lr 0.001 for 60k then 0.0001 for 20k)",
    ),
}


def recipe_for(preset: str) -> Recipe:
    """The recipe of ``preset`` (a preset without one of its own gets torchvision's)."""
    return RECIPES.get(preset, _TORCHVISION)


def scaled_lr(lr: float, batch_size: int, world: int, optimizer: str = "sgd") -> float:
    """The learning rate for ``world`` workers of ``batch_size`` images each (``lr`` per 16 images):
    linear in the global batch for SGD, its square root for AdamW."""
    ratio = batch_size * world / BASE_BATCH
    return lr * (math.sqrt(ratio) if optimizer == "adamw" else ratio)


def describe_recipe(spec: Any) -> str:
    """One line: the recipe a :class:`~pipeline.jobs.TrainSpec` runs with, and where it comes from."""
    if spec.schedule == "cosine":
        decay = "cosine decay to 0.02×"
    else:
        decay = "×0.1 at " + " and ".join(f"{m:.0%}" for m in spec.lr_milestones) + " of the run"
    warmup = "no warm-up"
    if spec.warmup_steps:
        warmup = f"warm-up {spec.warmup_steps} steps from {spec.warmup_factor:g}× (at most one epoch)"
    images = "image" if spec.batch_size == 1 else "images"
    workers = "worker" if spec.workers == 1 else "workers"
    momentum = f"β1 {spec.momentum:g}" if spec.optimizer == "adamw" else f"momentum {spec.momentum:g}"
    return (
        f"{OPTIMIZER_NAMES[spec.optimizer]}, {spec.workers} {workers} × {spec.batch_size} "
        f"{images} per step, lr {spec.lr:g} per 16 images "
        f"(→ {scaled_lr(spec.lr, spec.batch_size, spec.workers, spec.optimizer):g}), {momentum}, "
        f"weight decay {spec.weight_decay:g}, {warmup}, {decay}; "
        f"preset {spec.preset}'s recipe: {recipe_for(spec.preset).source}"
    )
