"""Input transform: validate, normalise, resize, pad to a multiple of the stride, batch — and map
detections back to the original image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def validate_inputs(images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None, num_classes: int) -> None:
    """Raise ``ValueError`` naming the image index for malformed images or targets."""
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of [3,H,W] float tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list: give at least one [3,H,W] image")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"image {i}: expected a tensor, got {type(image).__name__}")
        if image.dim() != 3:
            raise ValueError(f"image {i}: expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
        if image.shape[0] != 3:
            raise ValueError(f"image {i}: expected 3 channels (RGB), got {image.shape[0]} (shape {tuple(image.shape)})")
        if not image.is_floating_point():
            raise ValueError(f"image {i}: expected a float tensor with values in [0, 1], got dtype {image.dtype}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {i}: empty image of shape {tuple(image.shape)}")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {i}: expected a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"target {i}: boxes must be a [M,4] tensor, got {shape}")
        if not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be floating point, got {boxes.dtype}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"target {i}: labels must be a [M] tensor matching {boxes.shape[0]} boxes")
        if labels.is_floating_point():
            raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
        if boxes.numel() == 0:
            continue
        if not torch.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or infinite values")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            j = int(torch.nonzero(degenerate)[0])
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} is degenerate (need x2 > x1 and y2 > y1)")
        bad_label = (labels < 1) | (labels >= num_classes)
        if bad_label.any():
            j = int(torch.nonzero(bad_label)[0])
            raise ValueError(
                f"target {i}: label {int(labels[j])} of box {j} out of range [1, {num_classes - 1}] (0 is background)"
            )


class Transform(nn.Module):
    """Normalise each image, resize it so its short side is ``min_size`` (long side at most
    ``max_size``, aspect kept), pad the batch to a common size divisible by ``size_divisible``.

    ``forward`` returns the batch ``[N,3,H_pad,W_pad]`` (zero padding right and bottom), the
    resized sizes ``[(h, w)]`` (the valid region of each image) and the targets with boxes scaled
    accordingly. Normalising then resizing (bilinear, no antialiasing) is torchvision's order, kept
    so that the batch is torchvision's to the last bit. With ``channels_last`` the batch is laid
    out NHWC, which the convolution kernels run faster on (its shape is unchanged; the NHWC
    resize kernel may round differently in the last bit).
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.min_size = min_size
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        image_sizes = [self.resized_size(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch = self.zero_batch(images[0], image_sizes)
        for slot, image, (height, width) in zip(batch, images, image_sizes):
            slot[:, :height, :width].copy_(self.normalise_and_resize(image, (height, width)))

        scaled_targets = None
        if targets is not None:
            scaled_targets = []
            for image, size, target in zip(images, image_sizes, targets):
                scaled = dict(target)
                scaled["boxes"] = scale_boxes(target["boxes"], image.shape[-2:], size)
                scaled_targets.append(scaled)
        return batch, image_sizes, scaled_targets

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size ``(h, w)`` an image of ``height × width`` is resized to: torchvision's rule
        (sizes floored, the scale recomputed from them), but never below 1 pixel, so that very
        thin images still resize."""
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        return max(1, math.floor(float(height) * scale)), max(1, math.floor(float(width) * scale))

    def normalise_and_resize(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """``[3,H,W]`` image in ``[0,1]`` → ``[3,h,w]`` normalised and resized to ``size``."""
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)[:, None, None]
        normalised = (image - mean).div_(std)[None]
        if self.channels_last:  # the NHWC bilinear kernel is the faster one, and writes NHWC
            normalised = normalised.contiguous(memory_format=torch.channels_last)
        return F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)[0]

    def zero_batch(self, like: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """A zero ``[N,3,H_pad,W_pad]`` tensor, ``H_pad``/``W_pad`` the largest image sizes rounded
        up to a multiple of ``size_divisible``."""
        stride = self.size_divisible
        height = int(math.ceil(max(h for h, _ in image_sizes) / stride) * stride)
        width = int(math.ceil(max(w for _, w in image_sizes) / stride) * stride)
        batch = torch.empty(
            (len(image_sizes), 3, height, width),
            dtype=like.dtype,
            device=like.device,
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format,
        )
        return batch.zero_()

    @staticmethod
    def postprocess(
        detections: list[dict[str, Tensor]],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Boxes from resized-image pixels back to original-image pixels."""
        for detection, size, original in zip(detections, image_sizes, original_sizes):
            detection["boxes"] = scale_boxes(detection["boxes"], size, original)
        return detections


def scale_boxes(boxes: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """Rescale ``[M,4]`` boxes from an image of ``(h, w) = from_size`` to one of ``to_size``."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[0], dtype=torch.float32, device=boxes.device
    )
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[1], dtype=torch.float32, device=boxes.device
    )
    scale = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(boxes.dtype)
    return boxes * scale
