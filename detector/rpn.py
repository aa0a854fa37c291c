"""Region Proposal Network (Ren et al. 2015, §3.1): head, proposal layer and losses.

Shapes: ``N`` images, ``A`` anchors in total over all levels (``Σ H_l·W_l·A_l``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from .anchors import AnchorGenerator
from .boxes import BoxCoder, batched_nms, clip_boxes, min_size_mask
from .sampling import BETWEEN_THRESHOLDS, Matcher, sample_balanced


class RPNHead(nn.Module):
    """A 3×3 conv (+ReLU) sliding over each feature map, then two sibling 1×1 convs: objectness
    (one logit per anchor) and box regression (four deltas per anchor). Shared across levels.

    Attribute names match torchvision's ``RPNHead`` so that state dicts are interchangeable.
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness ``[N, A_l, H, W]`` and deltas ``[N, 4·A_l, H, W]``."""
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas


def flatten_predictions(logits: Sequence[Tensor], deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs → ``objectness [N, A]`` and ``deltas [N, A, 4]``, ordered like the
    anchors (level, then cell in row-major order, then cell anchor)."""
    flat_logits, flat_deltas = [], []
    for level_logits, level_deltas in zip(logits, deltas):
        n, a, h, w = level_logits.shape
        flat_logits.append(level_logits.permute(0, 2, 3, 1).reshape(n, h * w * a))
        flat_deltas.append(level_deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


def rank_within_groups(group_ids: Tensor) -> Tensor:
    """For ids that arrive in the desired order, the 0-based position of each element among the
    elements of its own group (a stable, vectorised "cumcount")."""
    if group_ids.numel() == 0:
        return group_ids.clone()
    order = torch.sort(group_ids, stable=True).indices
    sorted_ids = group_ids[order]
    positions = torch.arange(group_ids.numel(), device=group_ids.device)
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.cummax(torch.where(is_start, positions, torch.zeros_like(positions)), dim=0).values
    ranks = torch.empty_like(positions)
    ranks[order] = positions - group_start
    return ranks


class RegionProposalNetwork(nn.Module):
    """Anchors → scored proposals, and the RPN losses in training.

    Proposal layer, batched over images: per level take the ``pre_nms_top_n`` highest-scoring
    anchors, decode only those, clip to the image, drop boxes smaller than ``min_size`` (and below
    ``score_thresh``), run NMS once for the whole batch with one group per (image, level), and keep
    the ``post_nms_top_n`` best per image. Proposals are returned detached: as in the paper's
    "approximate joint training", the box head treats them as constants.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        allowed_border: float | None = None,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n_train = pre_nms_top_n["training"]
        self.pre_nms_top_n_test = pre_nms_top_n["testing"]
        self.post_nms_top_n_train = post_nms_top_n["training"]
        self.post_nms_top_n_test = post_nms_top_n["testing"]
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.allowed_border = allowed_border
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta

    def pre_nms_top_n(self) -> int:
        return self.pre_nms_top_n_train if self.training else self.pre_nms_top_n_test

    def post_nms_top_n(self) -> int:
        return self.post_nms_top_n_train if self.training else self.post_nms_top_n_test

    def forward(
        self,
        features: Sequence[Tensor],
        padded_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Returns the proposals of each image (``[P_i, 4]``, best first) and, in training, the
        losses ``loss_objectness`` and ``loss_rpn_box_reg``."""
        logits, deltas = self.head(features)
        level_anchors = self.anchor_generator(
            padded_size, [f.shape[-2:] for f in features], features[0].device, features[0].dtype
        )
        anchors_per_level = [a.shape[0] for a in level_anchors]
        anchors = torch.cat(level_anchors, dim=0)
        objectness, pred_deltas = flatten_predictions(logits, deltas)

        proposals = self.propose(objectness.detach(), pred_deltas.detach(), anchors, anchors_per_level, image_sizes)

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched_gt_boxes = self.label_anchors(anchors, targets, image_sizes)
            losses = self.loss(objectness, pred_deltas, anchors, labels, matched_gt_boxes)
        return proposals, losses

    # ------------------------------------------------------------------------ proposal layer

    @torch.no_grad()
    def propose(
        self,
        objectness: Tensor,
        pred_deltas: Tensor,
        anchors: Tensor,
        anchors_per_level: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Tensor]:
        num_images = objectness.shape[0]
        device = objectness.device

        # Pre-NMS top-N per level (indices into the concatenated anchors).
        top_idx, top_level = [], []
        offset = 0
        for level, count in enumerate(anchors_per_level):
            k = min(self.pre_nms_top_n(), count)
            idx = objectness[:, offset : offset + count].topk(k, dim=1).indices + offset
            top_idx.append(idx)
            top_level.append(torch.full_like(idx, level))
            offset += count
        top_idx = torch.cat(top_idx, dim=1)  # [N, K]
        levels = torch.cat(top_level, dim=1)
        num_candidates = top_idx.shape[1]

        rows = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[rows, top_idx])
        boxes = self.box_coder.decode(pred_deltas[rows, top_idx].reshape(-1, 4), anchors[top_idx.reshape(-1)])
        boxes = boxes.view(num_images, num_candidates, 4)

        sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=device)  # [N, 2] (h, w)
        boxes = clip_boxes(boxes, sizes[:, 0:1], sizes[:, 1:2])

        keep = min_size_mask(boxes, self.min_size)
        if self.score_thresh > 0:
            keep &= scores >= self.score_thresh
        image_idx = rows.expand(num_images, num_candidates)
        flat_keep = keep.reshape(-1)
        boxes = boxes.reshape(-1, 4)[flat_keep]
        scores = scores.reshape(-1)[flat_keep]
        image_idx = image_idx.reshape(-1)[flat_keep]
        groups = image_idx * len(anchors_per_level) + levels.reshape(-1)[flat_keep]

        # One NMS call for the batch; proposals of different images or levels never suppress each
        # other. The result is sorted by decreasing score.
        kept = batched_nms(boxes, scores, groups, self.nms_thresh)
        kept_images = image_idx[kept]
        kept = kept[rank_within_groups(kept_images) < self.post_nms_top_n()]
        kept_images = image_idx[kept]
        # Split per image, preserving score order within each image.
        kept = kept[torch.sort(kept_images, stable=True).indices]
        counts = torch.bincount(image_idx[kept], minlength=num_images).tolist()
        return list(boxes[kept].split(counts))

    # ------------------------------------------------------------------------ training

    def label_anchors(
        self, anchors: Tensor, targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Anchor labels ``[N, A]`` (1 positive, 0 negative, -1 ignored) and the gt box matched to
        each anchor ``[N, A, 4]`` (meaningful for positives only).

        Rules (paper §3.1.2): IoU ≥ fg threshold → positive; each gt's best anchor(s) → positive;
        IoU < bg threshold for every gt → negative; the rest ignored. No gt: all negative.
        With ``allowed_border`` set, anchors reaching further outside the image are ignored.
        Batched: one IoU matrix between the gts of all images and the (shared) anchors.
        """
        num_images = len(targets)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(anchors.dtype)
        gt_counts = torch.as_tensor([len(t["boxes"]) for t in targets], device=anchors.device)
        gt_image = torch.repeat_interleave(torch.arange(num_images, device=anchors.device), gt_counts)
        matches, _ = self.matcher.match_per_image(box_iou(gt_boxes, anchors), gt_image, num_images)

        labels = (matches >= 0).to(anchors.dtype)
        labels.masked_fill_(matches == BETWEEN_THRESHOLDS, -1.0)
        if gt_boxes.shape[0] > 0:
            matched_gt_boxes = gt_boxes[matches.clamp(min=0)]
        else:
            matched_gt_boxes = anchors.new_zeros((num_images, anchors.shape[0], 4))
        if self.allowed_border is not None:
            border = self.allowed_border
            sizes = torch.as_tensor(image_sizes, dtype=anchors.dtype, device=anchors.device)  # [N, 2] (h, w)
            outside = (
                ((anchors[:, 0] < -border) | (anchors[:, 1] < -border))[None, :]
                | (anchors[None, :, 2] > sizes[:, 1:2] + border)
                | (anchors[None, :, 3] > sizes[:, 0:1] + border)
            )
            labels.masked_fill_(outside, -1.0)
        return labels, matched_gt_boxes

    def loss(
        self, objectness: Tensor, pred_deltas: Tensor, anchors: Tensor, labels: Tensor, matched_gt_boxes: Tensor
    ) -> dict[str, Tensor]:
        """Binary cross-entropy over the sampled anchors; smooth-L1 (or L1) regression over the
        sampled positives, both normalised by the number of sampled anchors."""
        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled = positive | negative
        num_sampled = max(int(sampled.sum()), 1)

        pos_anchors = anchors.expand(labels.shape[0], -1, -1)[positive]
        targets = self.box_coder.encode(matched_gt_boxes[positive], pos_anchors)
        if self.box_loss == "l1":
            box_loss = F.l1_loss(pred_deltas[positive], targets, reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(pred_deltas[positive], targets, beta=self.smooth_l1_beta, reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        return {
            "loss_objectness": objectness_loss / num_sampled,
            "loss_rpn_box_reg": box_loss / num_sampled,
        }
