"""Backbones: feature extractors returning ``OrderedDict[str, Tensor]`` with ``out_channels``.

torchvision supplies the classification networks and the FPN builders of
``torchvision.models.detection.backbone_utils``; nothing is downloaded. Pretrained ImageNet weights
are an explicit local file (``backbone_weights``), loaded with ``weights_only=True``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet50, vgg16
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import DetectorConfig


class SingleLevelBackbone(nn.Module):
    """A plain convolutional trunk exposed as one feature level ``"0"`` at a fixed ``stride``."""

    def __init__(self, body: nn.Module, out_channels: int, stride: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body(images))])


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def tiny_body(width: int = 32) -> nn.Sequential:
    """A five-stage stride-8 CNN (~0.3 M parameters) for tests and CPU demos. The dilated last
    stage widens the receptive field (~90 px) to cover the largest objects of small images."""
    return nn.Sequential(
        _conv_bn_relu(3, width, stride=2),
        _conv_bn_relu(width, width),
        _conv_bn_relu(width, 2 * width, stride=2),
        _conv_bn_relu(2 * width, 2 * width),
        _conv_bn_relu(2 * width, 3 * width, stride=2),
        _conv_bn_relu(3 * width, 3 * width),
        _conv_bn_relu(3 * width, 3 * width, dilation=2),
    )


def _load_weights(module: nn.Module, path: str, what: str) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{what} weights file {path!r} does not hold a state dict")
    missing, unexpected = module.load_state_dict(state, strict=False)
    body_missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if body_missing:
        raise ValueError(f"{what} weights file {path!r} lacks {len(body_missing)} keys, e.g. {body_missing[:3]}")
    return state


def _trainable_layers(config: DetectorConfig, maximum: int) -> int:
    if config.trainable_backbone_layers is not None:
        if not 0 <= config.trainable_backbone_layers <= maximum:
            raise ValueError(f"trainable_backbone_layers must lie in [0, {maximum}]")
        return config.trainable_backbone_layers
    return 3 if config.backbone_weights else maximum


def _frozen_bn(config: DetectorConfig) -> bool:
    return bool(config.backbone_weights) if config.frozen_batchnorm is None else config.frozen_batchnorm


def build_backbone(config: DetectorConfig) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """The backbone of ``config`` and, for VGG16 with weights, the loaded ImageNet state dict (its
    ``classifier`` fc6/fc7 initialise the box head, as in the paper)."""
    norm_layer = FrozenBatchNorm2d if _frozen_bn(config) else nn.BatchNorm2d
    if config.backbone == "resnet50_fpn":
        net = resnet50(weights=None, norm_layer=norm_layer)
        if config.backbone_weights:
            _load_weights(net, config.backbone_weights, "resnet50")
        return _resnet_fpn_extractor(net, _trainable_layers(config, 5)), None
    if config.backbone == "mobilenet_v3_large_fpn":
        net = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
        if config.backbone_weights:
            _load_weights(net, config.backbone_weights, "mobilenet_v3_large")
        return _mobilenet_extractor(net, True, _trainable_layers(config, 6)), None
    if config.backbone == "vgg16":
        net = vgg16(weights=None)
        state = _load_weights(net, config.backbone_weights, "vgg16") if config.backbone_weights else None
        features = net.features[:-1]  # up to conv5_3 + ReLU; the paper drops pool5 (stride 16)
        # Freeze the first conv blocks (conv1_x, conv2_x … by trainable layer count, of 5 blocks).
        block_starts = [0, 5, 10, 17, 24]
        frozen_blocks = 5 - _trainable_layers(config, 5)
        if frozen_blocks > 0:
            end = block_starts[frozen_blocks] if frozen_blocks < 5 else len(features)
            for layer in list(features)[:end]:
                layer.requires_grad_(False)
        return SingleLevelBackbone(features, out_channels=512, stride=16), state
    if config.backbone == "tiny":
        return SingleLevelBackbone(tiny_body(), out_channels=96, stride=8), None
    raise ValueError(f"unknown backbone {config.backbone!r}")
