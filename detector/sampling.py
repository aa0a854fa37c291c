"""Matching predictions (anchors or proposals) to ground truth, and balanced sampling.

Label meanings used throughout: ``1`` positive (for the box head: the class label ``≥ 1``),
``0`` negative / background, ``-1`` ignored (contributes to no loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Assigns each prediction the ground-truth box it overlaps most.

    For IoU matrix ``[G, P]`` (gt × predictions) returns ``matched_idxs [P]``: the gt index when
    the best IoU is ``≥ high``; ``BELOW_LOW_THRESHOLD`` (-1) when it is ``< low``;
    ``BETWEEN_THRESHOLDS`` (-2) otherwise. With ``allow_low_quality_matches`` every gt's best
    prediction(s) — all ties included — are matched even below ``high`` (paper §3.1.2: "the
    anchor/anchors with the highest IoU overlap with a ground-truth box"), so no gt goes unmatched.
    Also returns ``matched_vals [P]``, the best IoU of each prediction.
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool):
        if low > high:
            raise ValueError(f"low threshold {low} above high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        if iou.numel() == 0:
            raise ValueError("cannot match against an empty IoU matrix (no gt or no predictions)")
        matched_vals, matches = iou.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        matches[matched_vals < self.low] = BELOW_LOW_THRESHOLD
        matches[(matched_vals >= self.low) & (matched_vals < self.high)] = BETWEEN_THRESHOLDS
        if all_matches is not None:
            best_per_gt = iou.max(dim=1).values
            # Every prediction that ties a gt's best IoU; such a prediction takes its own argmax gt.
            _, pred_idxs = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
            matches[pred_idxs] = all_matches[pred_idxs]
        return matches, matched_vals


def sample_balanced(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Balanced random sampling, batched over images.

    ``labels [N, P]``: ``≥ 1`` positive, ``0`` negative, ``-1`` ignored (also used for padding
    when images have different numbers of predictions). Per image, at most
    ``batch_size_per_image · positive_fraction`` positives are chosen uniformly at random, and
    negatives fill the rest of ``batch_size_per_image``. Returns boolean masks
    ``(positive [N, P], negative [N, P])``; everything unselected is ignored.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, P], got shape {tuple(labels.shape)}")
    positive = labels >= 1
    negative = labels == 0
    max_positive = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=max_positive)
    num_neg = negative.sum(dim=1).clamp(max=batch_size_per_image - num_pos)
    return (
        _random_subset(positive, num_pos, generator),
        _random_subset(negative, num_neg, generator),
    )


def _random_subset(candidates: Tensor, counts: Tensor, generator: torch.Generator | None) -> Tensor:
    """Per row, a uniformly random subset of ``counts[row]`` of the ``True`` entries."""
    keys = torch.rand(candidates.shape, device=candidates.device, generator=generator)
    keys = keys.masked_fill(~candidates, 2.0)  # non-candidates sort last
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return candidates & (ranks < counts[:, None])
