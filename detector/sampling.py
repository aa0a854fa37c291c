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

    A match is the gt index when the best IoU is ``≥ high``; ``BELOW_LOW_THRESHOLD`` (-1) when it
    is ``< low`` (also when the image has no gt); ``BETWEEN_THRESHOLDS`` (-2) otherwise. With
    ``allow_low_quality_matches`` every gt's best prediction(s) — all ties included — are matched
    even below ``high`` (paper §3.1.2: "the anchor/anchors with the highest IoU overlap with a
    ground-truth box"), so that no gt goes unmatched; such a prediction takes its own best gt. A gt
    that overlaps no prediction at all (best IoU 0) has no best prediction.

    Two forms: ``matcher(iou)`` for an IoU matrix ``[G, P]`` of one image (or of a batch whose
    cross-image entries were set to -1), and ``matcher.match_per_image(iou, gt_image, N)`` for
    predictions shared by all ``N`` images of a batch (anchors), where gt ``g`` belongs to image
    ``gt_image[g]``. Ties between gts go to the lowest gt index in both.
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool):
        if low > high:
            raise ValueError(f"low threshold {low} above high threshold {high}")
        if low < 0:
            raise ValueError(f"low threshold {low} below 0: IoUs of -1 mark pairs that cannot match")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """``iou [G, P]`` → ``matches [P]`` (gt index, -1 or -2) and ``matched_vals [P]`` (best
        IoU of each prediction; -1 when there is no gt)."""
        num_gt, num_predictions = iou.shape
        if num_gt == 0:
            matched_vals = iou.new_full((num_predictions,), -1.0)
            return torch.full_like(matched_vals, BELOW_LOW_THRESHOLD, dtype=torch.int64), matched_vals
        matched_vals, matches = iou.max(dim=0)
        gt_image = torch.zeros(num_gt, dtype=torch.int64, device=iou.device)
        matches = self._label(iou, gt_image, matches[None], matched_vals[None])
        return matches[0], matched_vals

    def match_per_image(self, iou: Tensor, gt_image: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
        """``iou [G, P]`` between the gts of the whole batch and predictions shared by every image;
        ``gt_image [G]`` the image of each gt. Returns ``matches [N, P]`` (index into the ``G``
        gts, or -1 / -2) and ``matched_vals [N, P]`` (-1 for images without gt), computed as a
        segmented max over each image's rows of ``iou``: no per-image loop, no padding."""
        num_gt, num_predictions = iou.shape
        matched_vals = iou.new_full((num_images, num_predictions), -1.0)
        if num_gt == 0:
            return torch.full_like(matched_vals, BELOW_LOW_THRESHOLD, dtype=torch.int64), matched_vals
        rows = gt_image[:, None].expand(num_gt, num_predictions)
        matched_vals.scatter_reduce_(0, rows, iou, reduce="amax")
        # The first gt of the image that attains the maximum (num_gt where the image has none).
        gt_index = torch.arange(num_gt, device=iou.device)[:, None].expand(num_gt, num_predictions)
        candidates = torch.where(iou == matched_vals[gt_image], gt_index, num_gt)
        matches = torch.full((num_images, num_predictions), num_gt, dtype=torch.int64, device=iou.device)
        matches.scatter_reduce_(0, rows, candidates, reduce="amin")
        return self._label(iou, gt_image, matches, matched_vals), matched_vals

    def _label(self, iou: Tensor, gt_image: Tensor, best_gt: Tensor, matched_vals: Tensor) -> Tensor:
        """Thresholds (and the best-prediction rule) applied to ``best_gt [N, P]``."""
        matches = best_gt.masked_fill(matched_vals < self.low, BELOW_LOW_THRESHOLD)
        matches.masked_fill_((matched_vals >= self.low) & (matched_vals < self.high), BETWEEN_THRESHOLDS)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values  # [G, 1]
            gt_idx, pred_idx = torch.nonzero((iou == best_per_gt) & (best_per_gt > 0), as_tuple=True)
            image_idx = gt_image[gt_idx]
            matches[image_idx, pred_idx] = best_gt[image_idx, pred_idx]
        return matches


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
