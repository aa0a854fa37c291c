"""Box arithmetic: the (dx, dy, dw, dh) coder of the paper, clipping and the min-size filter.

All boxes are ``(x1, y1, x2, y2)`` in pixels. IoU comes from ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import box_iou, nms

__all__ = ["BoxCoder", "batched_nms", "box_iou", "clip_boxes", "min_size_mask"]

# exp() of a larger regression would make a box more than 1000/16 times the anchor: clamp it.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes relative to reference boxes (anchors or proposals) and decodes them back.

    With reference centre ``(xa, ya)`` and size ``(wa, ha)`` and weights ``(wx, wy, ww, wh)``::

        dx = wx (x - xa) / wa    dy = wy (y - ya) / ha    dw = ww log(w / wa)    dh = wh log(h / ha)

    (Ren et al. 2015, eq. 2). Decoding clamps ``dw, dh`` at ``scale_clamp`` before ``exp``.
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, matched_gt_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """``[R,4]`` gt boxes and ``[R,4]`` references → ``[R,4]`` regression targets."""
        wx, wy, ww, wh = self.weights
        ref_w = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_h = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_cx = reference_boxes[:, 0] + 0.5 * ref_w
        ref_cy = reference_boxes[:, 1] + 0.5 * ref_h
        gt_w = matched_gt_boxes[:, 2] - matched_gt_boxes[:, 0]
        gt_h = matched_gt_boxes[:, 3] - matched_gt_boxes[:, 1]
        gt_cx = matched_gt_boxes[:, 0] + 0.5 * gt_w
        gt_cy = matched_gt_boxes[:, 1] + 0.5 * gt_h
        return torch.stack(
            (
                wx * (gt_cx - ref_cx) / ref_w,
                wy * (gt_cy - ref_cy) / ref_h,
                ww * torch.log(gt_w / ref_w),
                wh * torch.log(gt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """``[R, K*4]`` deltas (K boxes per reference, e.g. one per class) and ``[R,4]`` references
        → ``[R, K, 4]`` boxes."""
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_h = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_cx = reference_boxes[:, 0] + 0.5 * ref_w
        ref_cy = reference_boxes[:, 1] + 0.5 * ref_h

        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        cx = dx * ref_w[:, None] + ref_cx[:, None]
        cy = dy * ref_h[:, None] + ref_cy[:, None]
        half_w = 0.5 * torch.exp(dw) * ref_w[:, None]
        half_h = 0.5 * torch.exp(dh) * ref_h[:, None]
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=2)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip boxes ``[..., 4]`` to ``[0, width] × [0, height]``.

    ``heights``/``widths`` broadcast against ``boxes[..., 0]`` (a scalar tensor for one image, or
    one value per row when the rows of a batch come from different images).
    """
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), widths)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), heights)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), widths)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), heights)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def min_size_mask(boxes: Tensor, min_size: float) -> Tensor:
    """Boolean mask of boxes whose width and height are both at least ``min_size``."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression within each group (image, level or class); boxes of different groups
    never suppress each other. Returns the kept indices sorted by decreasing score.

    On the CPU the boxes are sorted by group once and NMS runs on each contiguous segment, so the
    cost is Σ (group size)² instead of the (number of groups × number of boxes) scans of
    ``torchvision.ops.batched_nms``'s per-group masks, which dominate when a whole batch (images ×
    classes) is suppressed in one call. Results are identical to running ``nms`` per group.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.is_cuda:
        return tv_batched_nms(boxes, scores, groups, iou_threshold)
    order = torch.sort(groups, stable=True).indices
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    kept = []
    for segment in order.split(counts):
        kept.append(segment[nms(boxes[segment], scores[segment], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
