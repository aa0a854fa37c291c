"""Default training recipes, one per detector preset: images per worker, learning rate, warm-up,
schedule, momentum and weight decay — what a run uses for every setting the job leaves unset.

The learning rate is given per ``BASE_BATCH`` (16) images and scaled linearly with the global
batch (``workers × batch_size``; Goyal et al. 2017), and the warm-up is given in images, so
changing the number of workers or the batch size keeps the recipe: the same learning rate per
image and the same warm-up in images (in steps: images ÷ global batch, at most one epoch —
torchvision's rule). Sources:

- ``tiny``: tuned on generated shapes here (``bench/training.py``, ``bench/train_defaults.py``: over
  ten short epochs the rate is held and dropped late; a cosine decay learnt less);
- ``resnet50_fpn`` and the MobileNet presets: torchvision's ``references/detection`` (8 GPUs × 2
  images, lr 0.02, momentum 0.9, weight decay 1e-4, linear warm-up over 1000 iterations from
  0.001, 26 epochs with ×0.1 at epochs 16 and 22); Detectron2's 1x schedule is the same learning
  rate per image and warm-up with steps at 2/3 and 8/9 (60k and 80k of 90k iterations);
- ``vgg16_paper``: Ren et al. 2015, §4 (one image per mini-batch, lr 0.001 for 60k mini-batches
  then 0.0001 for 20k, momentum 0.9, weight decay 0.0005, no warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BASE_BATCH = 16  # the learning rate is given per this many images
DETECTRON2_STEPS = (2 / 3, 8 / 9)  # 60k and 80k of 90k iterations (the 1x schedule)


@dataclass(frozen=True)
class Recipe:
    """A preset's defaults. ``batch_size``: images per worker per step; ``lr``: per 16 images;
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
        batch_size=8,
        lr=0.04,
        warmup_images=800,  # 50 steps of 2 × 8 images
        warmup_factor=0.1,
        schedule="step",
        milestones=(0.85, 0.95),  # the rate held: a cosine decay over 10 short epochs learnt too little
        momentum=0.9,
        weight_decay=1e-4,
        epochs=10,
        source="tuned on generated shapes (bench/training.py, bench/train_defaults.py)",
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


def scaled_lr(lr: float, batch_size: int, world: int) -> float:
    """The learning rate for ``world`` workers of ``batch_size`` images each (``lr`` per 16 images)."""
    return lr * batch_size * world / BASE_BATCH


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
    return (
        f"{spec.workers} {workers} × {spec.batch_size} {images} per step, lr {spec.lr:g} per 16 images "
        f"(→ {scaled_lr(spec.lr, spec.batch_size, spec.workers):g}), momentum {spec.momentum:g}, "
        f"weight decay {spec.weight_decay:g}, {warmup}, {decay}; "
        f"preset {spec.preset}'s recipe: {recipe_for(spec.preset).source}"
    )
