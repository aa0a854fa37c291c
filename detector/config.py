"""Every knob of the detector in one dataclass, and the named presets.

Field names follow torchvision's ``FasterRCNN`` keyword arguments wherever one exists, so that
``build_detector("resnet50_fpn", 91, box_score_thresh=0.3)`` means what it means there. Fields that
torchvision lacks are ours (``box_bg_iou_low``, ``rpn_allowed_border``, ``box_roi_pool`` …).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("resnet50_fpn", "mobilenet_v3_large_fpn", "vgg16", "tiny")
ROI_POOLERS = ("multiscale_roi_align", "roi_align", "roi_pool")


@dataclass(frozen=True)
class DetectorConfig:
    """The resolved settings of one detector. Defaults are torchvision's ``FasterRCNN`` defaults."""

    backbone: str = "resnet50_fpn"
    # Backbone options. ``trainable_backbone_layers=None`` means: all layers when training from
    # scratch, 3 when pretrained weights are given (torchvision's rule). ``frozen_batchnorm=None``
    # means FrozenBatchNorm2d exactly when pretrained backbone weights are loaded.
    trainable_backbone_layers: int | None = None
    backbone_weights: str | None = None
    frozen_batchnorm: bool | None = None

    # Transform: normalise, resize so the short side is min_size (long side ≤ max_size), pad.
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32
    # Speed without changing the maths (features equal up to float rounding): lay the batch out
    # channels-last (NHWC), and run gradient-free inference on a copy of the backbone with batch
    # norms folded into the convolutions. Both off reproduces torchvision's batch and backbone
    # arithmetic bit for bit, for comparisons where rounding matters (random weights, whose
    # proposal scores tie to within rounding and then reorder on the slightest difference).
    channels_last: bool = True
    fold_batchnorm: bool = True

    # Anchors: one tuple of sizes (pixels, sqrt of area) and one of aspect ratios (h/w) per level.
    anchor_sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5

    # Region proposal network.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    # Paper §3.3: anchors crossing the image boundary are ignored in training. None keeps them
    # (torchvision's behaviour); 0 ignores any anchor reaching outside the image.
    rpn_allowed_border: float | None = None
    rpn_box_loss: str = "smooth_l1"  # "smooth_l1" (beta below) or "l1"
    rpn_smooth_l1_beta: float = 1.0 / 9

    # Fast R-CNN head.
    box_roi_pool: str = "multiscale_roi_align"
    box_roi_output_size: int = 7
    box_roi_sampling_ratio: int = 2
    box_representation_size: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    # Proposals whose best IoU is below this are ignored rather than background. The paper
    # (following Fast R-CNN) samples background from IoU in [0.1, 0.5); torchvision uses [0, 0.5).
    box_bg_iou_low: float = 0.0
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_min_size: float = 1e-2
    box_smooth_l1_beta: float = 1.0 / 9

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if self.box_roi_pool not in ROI_POOLERS:
            raise ValueError(f"unknown box_roi_pool {self.box_roi_pool!r}; expected one of {ROI_POOLERS}")
        if self.rpn_box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"rpn_box_loss must be 'smooth_l1' or 'l1', not {self.rpn_box_loss!r}")
        if len(self.anchor_sizes) != len(self.aspect_ratios):
            raise ValueError("anchor_sizes and aspect_ratios need one entry per feature level")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        for name in ("rpn_positive_fraction", "box_positive_fraction", "rpn_nms_thresh", "box_nms_thresh"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not self.box_bg_iou_low <= self.box_bg_iou_thresh <= self.box_fg_iou_thresh:
            raise ValueError("need box_bg_iou_low <= box_bg_iou_thresh <= box_fg_iou_thresh")
        if not self.rpn_bg_iou_thresh <= self.rpn_fg_iou_thresh:
            raise ValueError("need rpn_bg_iou_thresh <= rpn_fg_iou_thresh")

    def replace(self, **overrides: Any) -> DetectorConfig:
        """A copy with ``overrides`` applied; unknown names are a ``ValueError`` listing valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown detector setting(s) {unknown}; valid settings: {sorted(valid)}")
        normalised = {name: _freeze(value) for name, value in overrides.items()}
        return dataclasses.replace(self, **normalised)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _freeze(value: Any) -> Any:
    """Lists (from JSON or the command line) become tuples so configs stay hashable and comparable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


_MOBILENET_ANCHORS = dict(
    anchor_sizes=((32, 64, 128, 256, 512),) * 3,
    aspect_ratios=((0.5, 1.0, 2.0),) * 3,
)

PRESETS: dict[str, DetectorConfig] = {
    # The seed's network (Ren et al. 2015): VGG16 conv5_3 at stride 16, 9 anchors per cell.
    "vgg16_paper": DetectorConfig(
        backbone="vgg16",
        min_size=600,
        max_size=1000,
        size_divisible=16,
        anchor_sizes=((128, 256, 512),),
        aspect_ratios=((0.5, 1.0, 2.0),),
        rpn_pre_nms_top_n_train=12000,
        rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_train=2000,
        rpn_post_nms_top_n_test=300,
        rpn_nms_thresh=0.7,
        rpn_fg_iou_thresh=0.7,
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=256,
        rpn_positive_fraction=0.5,
        rpn_min_size=16.0 / 16,  # boxes of < 1 px at the feature stride are noise
        rpn_allowed_border=0.0,
        box_roi_pool="roi_pool",
        box_representation_size=4096,
        box_batch_size_per_image=128,
        box_positive_fraction=0.25,
        box_fg_iou_thresh=0.5,
        box_bg_iou_thresh=0.5,
        box_bg_iou_low=0.1,
        box_nms_thresh=0.3,
    ),
    "resnet50_fpn": DetectorConfig(backbone="resnet50_fpn"),
    "mobilenet_v3_large_fpn": DetectorConfig(
        backbone="mobilenet_v3_large_fpn", rpn_score_thresh=0.05, **_MOBILENET_ANCHORS
    ),
    "mobilenet_v3_large_320_fpn": DetectorConfig(
        backbone="mobilenet_v3_large_fpn",
        min_size=320,
        max_size=640,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_test=150,
        rpn_score_thresh=0.05,
        **_MOBILENET_ANCHORS,
    ),
    # A small network for tests and CPU demos: single stride-8 level, objects of ~10–80 px.
    "tiny": DetectorConfig(
        backbone="tiny",
        min_size=128,
        max_size=256,
        size_divisible=16,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
        anchor_sizes=((12, 24, 48, 96),),
        aspect_ratios=((0.5, 1.0, 2.0),),
        rpn_pre_nms_top_n_train=600,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_roi_pool="roi_align",
        box_representation_size=256,
        box_batch_size_per_image=128,
        box_detections_per_img=50,
    ),
}


@dataclass(frozen=True)
class Preset:
    """A preset name with the overrides applied on top of it (what a checkpoint records)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> DetectorConfig:
        if self.name not in PRESETS:
            raise ValueError(f"unknown preset {self.name!r}; available presets: {sorted(PRESETS)}")
        return PRESETS[self.name].replace(**self.overrides)
