"""The Faster R-CNN: transform → backbone → RPN → RoI heads → detections in input pixels."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbones import build_backbone
from .config import DetectorConfig, Preset
from .fusion import FoldedModuleCache
from .roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead, VGGFCHead, build_roi_pooler
from .rpn import RegionProposalNetwork, RPNHead
from .transform import Transform, validate_inputs


class FasterRCNN(nn.Module):
    """Faster R-CNN (Ren et al. 2015) with the calling convention of torchvision's detection models.

    ``model.eval(); model(images)`` → per image ``{"boxes": [N,4], "scores": [N], "labels": [N]}``
    with boxes ``(x1, y1, x2, y2)`` in input pixels. ``model.train(); model(images, targets)`` →
    ``{"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}``.
    ``images``: list of float ``[3,H,W]`` tensors in ``[0,1]``, sizes may differ.
    ``targets``: list of ``{"boxes": [M,4] float, "labels": [M] int64 in 1..num_classes-1}``.

    With ``config.fold_batchnorm``, gradient-free inference (eval mode under ``torch.no_grad()``
    or ``torch.inference_mode()``) runs a copy of the backbone with batch norms folded into the
    convolutions (see ``detector.fusion``), kept in step with the weights; its features are those
    of the original layers up to float rounding.
    """

    def __init__(
        self,
        config: DetectorConfig,
        num_classes: int,
        *,
        preset: str,
        overrides: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be ≥ 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes (index 0 = background)")
        self.config = config
        self.preset = preset
        self.overrides = dict(overrides or {})
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None

        self.transform = Transform(
            config.min_size,
            config.max_size,
            config.image_mean,
            config.image_std,
            config.size_divisible,
            channels_last=config.channels_last,
        )
        self.backbone, imagenet_state = build_backbone(config)
        self._inference_backbone = FoldedModuleCache() if config.fold_batchnorm else None
        channels = self.backbone.out_channels

        anchor_generator = AnchorGenerator(config.anchor_sizes, config.aspect_ratios)
        num_anchors = anchor_generator.num_anchors_per_location()
        if len(set(num_anchors)) != 1:
            raise ValueError("every level needs the same number of anchors per location (one shared RPN head)")
        self.rpn = RegionProposalNetwork(
            anchor_generator,
            RPNHead(channels, num_anchors[0]),
            fg_iou_thresh=config.rpn_fg_iou_thresh,
            bg_iou_thresh=config.rpn_bg_iou_thresh,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=config.rpn_positive_fraction,
            pre_nms_top_n={"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test},
            nms_thresh=config.rpn_nms_thresh,
            score_thresh=config.rpn_score_thresh,
            min_size=config.rpn_min_size,
            allowed_border=config.rpn_allowed_border,
            box_loss=config.rpn_box_loss,
            smooth_l1_beta=config.rpn_smooth_l1_beta,
        )

        pool = config.box_roi_output_size
        stride = getattr(self.backbone, "stride", 1)
        roi_pool = build_roi_pooler(config.box_roi_pool, pool, config.box_roi_sampling_ratio, stride)
        in_features = channels * pool * pool
        if config.backbone == "vgg16":
            box_head: nn.Module = VGGFCHead(in_features, config.box_representation_size)
            if imagenet_state is not None and config.box_representation_size == 4096:
                with torch.no_grad():
                    box_head.fc6.weight.copy_(imagenet_state["classifier.0.weight"])
                    box_head.fc6.bias.copy_(imagenet_state["classifier.0.bias"])
                    box_head.fc7.weight.copy_(imagenet_state["classifier.3.weight"])
                    box_head.fc7.bias.copy_(imagenet_state["classifier.3.bias"])
        else:
            box_head = TwoMLPHead(in_features, config.box_representation_size)
        self.roi_heads = RoIHeads(
            roi_pool,
            box_head,
            FastRCNNPredictor(config.box_representation_size, num_classes),
            fg_iou_thresh=config.box_fg_iou_thresh,
            bg_iou_thresh=config.box_bg_iou_thresh,
            bg_iou_low=config.box_bg_iou_low,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            bbox_reg_weights=config.bbox_reg_weights,
            score_thresh=config.box_score_thresh,
            nms_thresh=config.box_nms_thresh,
            detections_per_img=config.box_detections_per_img,
            min_size=config.box_min_size,
            smooth_l1_beta=config.box_smooth_l1_beta,
        )

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if self.training and targets is None:
            raise ValueError("training mode needs targets: model(images, targets); call model.eval() to detect")
        validate_inputs(images, targets if self.training else None, self.num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, image_sizes, scaled_targets = self.transform(images, targets if self.training else None)

        if self._inference_backbone is None or self.training or torch.is_grad_enabled():
            features = self.backbone(batch)
        else:
            features = self._inference_backbone.get(self.backbone)(batch)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        feature_list = list(features.values())
        padded_size = (int(batch.shape[-2]), int(batch.shape[-1]))
        proposals, rpn_losses = self.rpn(feature_list, padded_size, image_sizes, scaled_targets)
        detections, head_losses = self.roi_heads(features, proposals, image_sizes, scaled_targets)

        if self.training:
            return {**rpn_losses, **head_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def build_detector(
    preset: str, num_classes: int, *, class_names: Sequence[str] | None = None, **overrides: Any
) -> FasterRCNN:
    """A Faster R-CNN of the named preset (see ``PRESETS``) with ``overrides`` applied.

    ``num_classes`` counts the background (label 0). Overrides use torchvision's ``FasterRCNN``
    keyword names where one exists; unknown names raise ``ValueError``.
    """
    config = Preset(preset, overrides).resolve()
    return FasterRCNN(config, num_classes, preset=preset, overrides=overrides, class_names=class_names)
