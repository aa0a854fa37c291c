"""The learning-rate schedule: linear warm-up, then cosine or step decay, as a factor of the
base learning rate (``recipe.scaled_lr``)."""

from __future__ import annotations

import math

from .recipe import DETECTRON2_STEPS


def lr_factor(
    step: int,
    total: int,
    warmup: int,
    schedule: str,
    *,
    warmup_factor: float = 0.1,
    milestones: tuple[float, ...] = DETECTRON2_STEPS,
) -> float:
    """Multiplier of the scaled base LR at ``step`` (0-based): linear warm-up from
    ``warmup_factor`` over ``warmup`` steps, then decay — cosine to 0.02, or ``"step"``: ×0.1 at
    each of ``milestones`` (fractions of ``total``)."""
    if step < warmup:
        return warmup_factor + (1 - warmup_factor) * step / max(1, warmup)
    if schedule == "step":
        return 10.0 ** -sum(1 for milestone in milestones if step >= total * milestone)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
