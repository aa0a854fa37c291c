"""The Fast R-CNN head (Girshick 2015, used by Ren et al. 2015 §3.2): RoI pooling, box head,
class scores and class-specific box regression, its losses, and the detection postprocess.

Shapes: ``R`` proposals over the whole batch, ``C`` classes including background (label 0).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import RoIAlign, RoIPool, box_iou, roi_align

from .boxes import BoxCoder, batched_nms, clip_boxes, min_size_mask
from .rpn import rank_within_groups
from .sampling import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, sample_balanced


class SingleLevelRoIPooler(nn.Module):
    """RoIPool (the paper's) or RoIAlign over the single feature map ``"0"`` at a fixed stride.

    ``forward`` returns ``([pooled [R, C_feat, 7, 7]], None)``: one chunk, in proposal order (see
    :class:`FPNRoIAlign` for the general form).
    """

    def __init__(self, kind: str, output_size: int, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        if kind == "roi_pool":
            self.op: nn.Module = RoIPool(output_size, spatial_scale)
        else:
            self.op = RoIAlign(output_size, spatial_scale, sampling_ratio, aligned=False)

    def forward(
        self, features: OrderedDict[str, Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[Tensor], Tensor | None]:
        return [self.op(features["0"], list(proposals))], None


class FPNRoIAlign(nn.Module):
    """RoIAlign over a feature pyramid (Lin et al. 2017, eq. 1): a RoI of size ``w × h`` is pooled
    from level ``k = ⌊k0 + log2(√(wh) / 224)⌋`` (``k0 = 4``), clamped to the levels present; the
    stride of each level is inferred from its size (a power of two).

    ``forward`` returns the pooled features as one chunk per non-empty level
    (``[R_l, C_feat, 7, 7]``, the RoIs of each level in proposal order), and ``order [R]``: the
    proposal index of each row of the chunks concatenated (``None`` when there is a single chunk
    in proposal order). Keeping the chunks apart spares the ``[R, C_feat, 7, 7]`` scatter back into
    proposal order: the box head runs on each chunk and only its small outputs are reordered.
    The level assignment and the RoIAlign calls are those of ``torchvision.ops.MultiScaleRoIAlign``,
    so the pooled values are the same.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        sampling_ratio: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(
        self, features: OrderedDict[str, Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[Tensor], Tensor | None]:
        maps = [features[name] for name in self.featmap_names if name in features]
        boxes = torch.cat(list(proposals))
        image_idx = torch.repeat_interleave(
            torch.arange(len(proposals), device=boxes.device, dtype=boxes.dtype),
            torch.as_tensor([len(p) for p in proposals], device=boxes.device),
        )
        rois = torch.cat([image_idx[:, None], boxes], dim=1)  # [R, 5]: image index, x1, y1, x2, y2
        max_height = max(h for h, _ in image_sizes)
        scales = [2.0 ** float(torch.tensor(m.shape[-2] / max_height).log2().round()) for m in maps]
        if len(maps) == 1 or len(rois) == 0:
            return [self._pool(maps[0], rois, scales[0])], None

        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(
            self.canonical_level
            + torch.log2(box_sizes / self.canonical_scale)
            + torch.tensor(1e-6, dtype=box_sizes.dtype)
        )
        levels = levels.clamp(min=k_min, max=k_max).to(torch.int64) - k_min
        order = torch.sort(levels, stable=True).indices
        counts = torch.bincount(levels, minlength=len(maps)).tolist()
        chunks = [
            self._pool(feature, level_rois, scale)
            for feature, level_rois, scale, count in zip(maps, rois[order].split(counts), scales, counts)
            if count > 0
        ]
        if len(chunks) == 1:
            return chunks, None
        return chunks, order

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=False)


def build_roi_pooler(kind: str, output_size: int, sampling_ratio: int, stride: int) -> nn.Module:
    """A module pooling ``[C_feat, 7, 7]`` features for every RoI whatever its size (see
    :class:`FPNRoIAlign` for what it returns)."""
    if kind == "multiscale_roi_align":
        return FPNRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio)
    return SingleLevelRoIPooler(kind, output_size, 1.0 / stride, sampling_ratio)


class TwoMLPHead(nn.Module):
    """Two fully connected layers (``fc6``, ``fc7``) with ReLU, as in FPN Faster R-CNN."""

    def __init__(self, in_features: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, pooled: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(start_dim=1)))))


class VGGFCHead(nn.Module):
    """VGG16's fc6/fc7 (4096 units, ReLU, dropout 0.5) on 7×7 RoI features, as in the paper."""

    def __init__(self, in_features: int, representation_size: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: Tensor) -> Tensor:
        hidden = self.dropout(F.relu(self.fc6(pooled.flatten(start_dim=1))))
        return self.dropout(F.relu(self.fc7(hidden)))


class FastRCNNPredictor(nn.Module):
    """Sibling layers: class logits ``[R, C]`` and class-specific box deltas ``[R, 4C]``."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        hidden = hidden.flatten(start_dim=1)
        return self.cls_score(hidden), self.bbox_pred(hidden)


class RoIHeads(nn.Module):
    """Proposals → detections (eval) or the Fast R-CNN losses (training).

    Training: gt boxes are appended to the proposals; each proposal is matched to its best gt —
    IoU ≥ ``fg_iou_thresh`` gives the gt's class, IoU in ``[bg_iou_low, bg_iou_thresh)`` background,
    the rest is ignored — and ``batch_size_per_image`` RoIs are sampled per image with at most
    ``positive_fraction`` foreground. Loss: cross-entropy over the sampled RoIs plus smooth-L1 on
    the deltas of the gt class, normalised by the number of sampled RoIs.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        bg_iou_low: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: tuple[float, float, float, float],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        min_size: float = 1e-2,
        smooth_l1_beta: float = 1.0 / 9,
    ):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.bg_iou_low = bg_iou_low
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, labels, regression_targets = self.sample_proposals(proposals, targets)
        pooled_chunks, order = self.box_roi_pool(features, proposals, image_sizes)
        hidden = [self.box_head(pooled) for pooled in pooled_chunks]
        class_logits, box_deltas = self.box_predictor(hidden[0] if len(hidden) == 1 else torch.cat(hidden))
        if order is not None:  # back to proposal order
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=order.device)
            class_logits, box_deltas = class_logits[inverse], box_deltas[inverse]

        if self.training:
            return [], self.loss(class_logits, box_deltas, labels, regression_targets)
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}

    # ------------------------------------------------------------------------ training

    @torch.no_grad()
    def sample_proposals(
        self, proposals: list[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Adds the gt boxes to each image's proposals, labels them and samples them, batched over
        images. Returns the sampled RoIs per image, their labels ``[R]`` (class, or 0 for
        background) and regression targets ``[R, 4]``, in image order.

        Labels: best IoU ≥ ``fg_iou_thresh`` → the gt's class; in ``[bg_iou_low, bg_iou_thresh)``
        → 0; otherwise -1 (ignored). Every RoI of an image without gt is background. The
        proposals are constants here (no gradient flows into the RPN through them: the paper's
        "approximate joint training").
        """
        num_images = len(proposals)
        device = proposals[0].device
        gt_boxes_per_image = [t["boxes"].to(proposals[0].dtype) for t in targets]
        rois = torch.cat([boxes for pair in zip(proposals, gt_boxes_per_image) for boxes in pair])
        roi_counts = torch.as_tensor([len(p) + len(g) for p, g in zip(proposals, gt_boxes_per_image)], device=device)
        gt_counts = torch.as_tensor([len(g) for g in gt_boxes_per_image], device=device)
        image_ids = torch.arange(num_images, device=device)
        roi_image = torch.repeat_interleave(image_ids, roi_counts)
        gt_image = torch.repeat_interleave(image_ids, gt_counts)
        gt_boxes = torch.cat(gt_boxes_per_image)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(torch.int64)

        # One IoU matrix for the batch; pairs from different images get -1 so they never match.
        iou = box_iou(gt_boxes, rois).masked_fill_(gt_image[:, None] != roi_image[None, :], -1.0)
        matches, matched_vals = self.matcher(iou)
        if gt_boxes.shape[0] > 0:
            labels = gt_labels[matches.clamp(min=0)]
            matched_boxes = gt_boxes[matches.clamp(min=0)]
        else:
            labels = torch.zeros_like(matches)
            matched_boxes = torch.zeros_like(rois)
        labels.masked_fill_(matches == BELOW_LOW_THRESHOLD, 0)
        labels.masked_fill_(matches == BETWEEN_THRESHOLDS, -1)
        labels.masked_fill_((matched_vals >= 0) & (matched_vals < self.bg_iou_low), -1)

        # Sample per image on a [N, max RoIs] layout padded with -1 (ignored).
        starts = torch.cumsum(roi_counts, dim=0) - roi_counts
        column = torch.arange(rois.shape[0], device=device) - starts[roi_image]
        padded = torch.full((num_images, int(roi_counts.max())), -1, dtype=torch.int64, device=device)
        padded[roi_image, column] = labels
        positive, negative = sample_balanced(padded, self.batch_size_per_image, self.positive_fraction)
        sampled = (positive | negative)[roi_image, column]

        sampled_counts = torch.bincount(roi_image[sampled], minlength=num_images).tolist()
        sampled_rois = rois[sampled]
        regression_targets = self.box_coder.encode(matched_boxes[sampled], sampled_rois)
        return list(sampled_rois.split(sampled_counts)), labels[sampled], regression_targets

    def loss(
        self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor
    ) -> dict[str, Tensor]:
        classification_loss = F.cross_entropy(class_logits, labels)
        positive = torch.nonzero(labels > 0).squeeze(1)
        deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[positive, labels[positive]]
        box_loss = F.smooth_l1_loss(
            deltas, regression_targets[positive], beta=self.smooth_l1_beta, reduction="sum"
        ) / max(labels.numel(), 1)
        return {"loss_classifier": classification_loss, "loss_box_reg": box_loss}

    # ------------------------------------------------------------------------ inference

    @torch.no_grad()
    def postprocess(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Batched over images: decode per-class boxes, clip, drop background, keep scores above
        ``score_thresh`` and boxes above ``min_size``, per-class NMS (one call for the batch, one
        group per image and class), then the best ``detections_per_img`` per image."""
        num_images = len(proposals)
        num_classes = class_logits.shape[-1]
        device = class_logits.device
        counts = torch.as_tensor([p.shape[0] for p in proposals], device=device)
        roi_image = torch.repeat_interleave(torch.arange(num_images, device=device), counts)

        boxes = self.box_coder.decode(box_deltas, torch.cat(list(proposals)))  # [R, C, 4]
        sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=device)[roi_image]  # [R, 2]
        boxes = clip_boxes(boxes, sizes[:, 0:1], sizes[:, 1:2])
        scores = F.softmax(class_logits, dim=-1)

        # Drop the background column and flatten (roi, class) pairs.
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = torch.arange(1, num_classes, device=device).repeat(class_logits.shape[0])
        images = roi_image.repeat_interleave(num_classes - 1)

        keep = (scores > self.score_thresh) & min_size_mask(boxes, self.min_size)
        boxes, scores, labels, images = boxes[keep], scores[keep], labels[keep], images[keep]

        kept = batched_nms(boxes, scores, images * num_classes + labels, self.nms_thresh)
        kept = kept[rank_within_groups(images[kept]) < self.detections_per_img]
        kept = kept[torch.sort(images[kept], stable=True).indices]
        per_image = torch.bincount(images[kept], minlength=num_images).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                boxes[kept].split(per_image), scores[kept].split(per_image), labels[kept].split(per_image)
            )
        ]
