"""A deterministic generator of images of simple shapes with exact boxes.

Used by the tests, the benchmarks, ``detectflow synth`` and the demo. ``make_image(seed, index)``
depends only on its arguments (each image has its own random generator seeded from both), so a
dataset can be generated in any order, in parallel, and regenerated bit for bit.

Images: a smooth random colour gradient with pixel noise; 0–``max_objects`` filled shapes of random
colour, size 10–60 px at 128 px (scaled with the image), placed with limited overlap. Boxes are
tight around the drawn pixels (computed from the shape's mask), labels index ``CATEGORIES`` from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image and its exact annotations (``N`` may be 0)."""

    image: torch.Tensor  # uint8 [3, H, W]
    boxes: torch.Tensor  # float32 [N, 4], x1 y1 x2 y2, tight around the object's pixels
    labels: torch.Tensor  # int64 [N], 1..len(CATEGORIES)


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask ``[size, size]`` of a circle (1), square (2) or triangle (3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    half = size / 2.0
    if kind == 1:
        return (xx - half) ** 2 + (yy - half) ** 2 <= half**2
    if kind == 2:
        return np.ones((size, size), dtype=bool)
    # Upward triangle with a random apex position along the top edge.
    apex = rng.uniform(0.3, 0.7) * size
    left = xx >= apex * (1 - yy / size)
    right = xx <= apex + (size - apex) * (yy / size)
    return left & right


def make_image(seed: int, index: int, size: int | tuple[int, int] = 128, max_objects: int = 4) -> SyntheticImage:
    """The ``index``-th image of the synthetic dataset ``seed``; ``size`` is ``H`` or ``(H, W)``.

    The background is drawn before the shapes, so it depends on ``(seed, index, size)`` only:
    ``make_image(seed, index, size, max_objects=0)`` is the same image with no shape drawn on it.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images need at least 16×16 pixels, got {height}×{width}")
    rng = np.random.default_rng([seed, index])
    scale = min(height, width) / 128.0

    # Background: a random linear gradient between two colours plus noise.
    colour_a, colour_b = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(-1, 1, size=2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (direction[0] * xx / width + direction[1] * yy / height + 1) / 2
    canvas = colour_a[:, None, None] * (1 - t) + colour_b[:, None, None] * t
    canvas += rng.normal(0, 8, size=(3, height, width))

    masks: list[np.ndarray] = []  # full-image mask of each shape, in drawing order
    labels: list[int] = []
    occupied = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(0, max_objects + 1))):
        kind = int(rng.integers(1, len(CATEGORIES) + 1))
        side = int(round(rng.uniform(10, 60) * scale))
        side = max(4, min(side, height - 2, width - 2))
        y0 = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(0, width - side + 1))
        mask = _shape_mask(kind, side, rng)
        region = occupied[y0 : y0 + side, x0 : x0 + side]
        if (region & mask).sum() > 0.2 * mask.sum():
            continue  # too much overlap with an earlier object: skip this one
        # A colour far from the local background so every shape stays visible.
        background = canvas[:, y0 : y0 + side, x0 : x0 + side].mean(axis=(1, 2))
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background).sum() < 150:
            colour = 255.0 - background
        patch = canvas[:, y0 : y0 + side, x0 : x0 + side]
        patch[:, mask] = colour[:, None] + rng.normal(0, 4, size=(3, int(mask.sum())))
        # Later shapes may hide parts of earlier ones; boxes are recomputed from visible pixels.
        occupied[y0 : y0 + side, x0 : x0 + side] |= mask
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + side, x0 : x0 + side] = mask
        masks.append(full)
        labels.append(kind)

    # Resolve occlusion: a pixel belongs to the last shape drawn on it.
    visible_boxes: list[list[float]] = []
    visible_labels: list[int] = []
    covered = np.zeros((height, width), dtype=bool)
    for full, label in zip(reversed(masks), reversed(labels)):
        visible = full & ~covered
        covered |= full
        ys, xs = np.nonzero(visible)
        if len(xs) < 16:
            continue
        visible_boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        visible_labels.append(label)
    visible_boxes.reverse()
    visible_labels.reverse()

    image = torch.from_numpy(np.clip(canvas, 0, 255).round().astype(np.uint8))
    return SyntheticImage(
        image=image,
        boxes=torch.tensor(visible_boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(visible_labels, dtype=torch.int64),
    )
