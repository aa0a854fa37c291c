"""Decoded images → detections with a resident model: the one "batch and detect" of the data plane,
used by the shard worker (inference) and by validation during training."""

from __future__ import annotations

import torch


def detect_images(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Detections (``boxes`` float32 xyxy in each image's pixels, ``scores``, ``labels``) of each
    ``uint8 [3,H,W]`` image, in input order, on the CPU. Images of similar aspect ratio share a
    batch (less padding); ``amp_dtype`` runs the model under autocast on CUDA. The caller holds
    the model in eval mode."""
    order = sorted(range(len(images)), key=lambda i: images[i].shape[-2] / images[i].shape[-1])
    outputs: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = [images[i].to(device, non_blocking=True).float().div_(255) for i in indices]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                results = model(batch)
            for i, result in zip(indices, results):
                outputs[i] = {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in result.items()}
    return outputs  # type: ignore[return-value]
