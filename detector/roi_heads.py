"""The Fast R-CNN head (Girshick 2015, used by Ren et al. 2015 §3.2): RoI pooling, box head,
class scores and class-specific box regression, its losses, and the detection postprocess.

Shapes: ``R`` proposals over the whole batch, ``C`` classes including background (label 0).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, RoIAlign, RoIPool, box_iou

from .boxes import BoxCoder, batched_nms, clip_boxes, min_size_mask
from .rpn import rank_within_groups
from .sampling import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher, sample_balanced


class SingleLevelRoIPooler(nn.Module):
    """RoIPool (the paper's) or RoIAlign over the single feature map ``"0"`` at a fixed stride."""

    def __init__(self, kind: str, output_size: int, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        if kind == "roi_pool":
            self.op: nn.Module = RoIPool(output_size, spatial_scale)
        else:
            self.op = RoIAlign(output_size, spatial_scale, sampling_ratio, aligned=False)

    def forward(
        self, features: OrderedDict[str, Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> Tensor:
        return self.op(features["0"], list(proposals))


def build_roi_pooler(kind: str, output_size: int, sampling_ratio: int, stride: int) -> nn.Module:
    """``[R, C_feat, 7, 7]`` features for ``R`` RoIs whatever their size."""
    if kind == "multiscale_roi_align":
        return MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio)
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
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))

        if self.training:
            return [], self.loss(class_logits, box_deltas, labels, regression_targets)
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}

    # ------------------------------------------------------------------------ training

    @torch.no_grad()
    def sample_proposals(
        self, proposals: list[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Adds gt boxes to the proposals, labels them, samples them. Returns the sampled RoIs per
        image, their labels ``[R]`` (class or 0) and regression targets ``[R, 4]``."""
        with_gt = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        num_images = len(with_gt)
        max_rois = max(p.shape[0] for p in with_gt)
        device = with_gt[0].device
        labels = torch.full((num_images, max_rois), -1, dtype=torch.int64, device=device)  # -1 pads
        matched_boxes = torch.zeros((num_images, max_rois, 4), dtype=with_gt[0].dtype, device=device)
        for i, (rois, target) in enumerate(zip(with_gt, targets)):
            count = rois.shape[0]
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if gt_boxes.numel() == 0:
                labels[i, :count] = 0
                continue
            matched_idxs, matched_vals = self.matcher(box_iou(gt_boxes, rois))
            image_labels = gt_labels[matched_idxs.clamp(min=0)].to(torch.int64)
            image_labels[matched_idxs == BELOW_LOW_THRESHOLD] = 0
            image_labels[matched_idxs == BETWEEN_THRESHOLDS] = -1
            image_labels[matched_vals < self.bg_iou_low] = -1
            labels[i, :count] = image_labels
            matched_boxes[i, :count] = gt_boxes[matched_idxs.clamp(min=0)]

        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled = positive | negative
        sampled_rois = [rois[sampled[i, : rois.shape[0]]] for i, rois in enumerate(with_gt)]
        sampled_labels = labels[sampled]
        regression_targets = self.box_coder.encode(matched_boxes[sampled], torch.cat(sampled_rois))
        return sampled_rois, sampled_labels, regression_targets

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
