"""The tiny preset learns the synthetic shapes: the loss falls clearly in a fixed number of steps.
(The full run to mAP@0.5 ≥ 0.9 is bench/train_tiny.py.)"""

from __future__ import annotations

import math

import torch

from detector import build_detector
from detector.synthetic import CATEGORIES, make_image


def test_tiny_preset_loss_falls_on_synthetic_shapes() -> None:
    torch.manual_seed(0)
    model = build_detector("tiny", num_classes=len(CATEGORIES) + 1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    history = []
    for step in range(45):
        samples = [make_image(seed=0, index=step * 8 + i, size=128) for i in range(8)]
        losses = model(
            [s.image.float() / 255 for s in samples],
            [{"boxes": s.boxes, "labels": s.labels} for s in samples],
        )
        total = sum(losses.values())
        assert math.isfinite(total.item()), f"step {step}: non-finite loss {losses}"
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, f"loss fell only from {first:.3f} to {last:.3f}"
