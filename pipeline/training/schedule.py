"""The learning-rate schedule: the learning rate is given per ``BASE_BATCH`` images and scaled
linearly with the global batch (Goyal et al. 2017); linear warm-up, then cosine (or step) decay."""

from __future__ import annotations

import math

BASE_BATCH = 16  # the learning rate is given per this many images


def scaled_lr(lr: float, batch_size: int, world: int) -> float:
    """The base learning rate for ``world`` workers of ``batch_size`` images each."""
    return lr * batch_size * world / BASE_BATCH


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the scaled base LR at ``step`` (0-based): linear warm-up from 0.1, then decay —
    cosine to 0.02, or ``"step"``: ×0.1 at 2/3 and ×0.01 at 8/9 of ``total``."""
    if step < warmup:
        return 0.1 + 0.9 * step / max(1, warmup)
    if schedule == "step":
        return 0.01 if step >= total * 8 / 9 else 0.1 if step >= total * 2 / 3 else 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
