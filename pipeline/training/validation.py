"""Validation during training: COCO AP of the model being trained on the labelled dataset
``spec.val_uri``, scored by rank 0 every ``val_every`` steps with the data plane's one "batch and
detect" (:func:`pipeline.detect.detect_images`)."""

from __future__ import annotations

import torch

from ..dataset import gt_targets, open_dataset, read_shard
from ..decode import DecodedImage, decode_many
from ..detect import detect_images
from ..evaluate import ImageDT, ImageGT, coco_metrics
from ..jobs import TrainSpec

BATCH_SIZE = 16


def validation_metrics(model: torch.nn.Module, spec: TrainSpec, device: torch.device) -> dict[str, float]:
    """``{"val_AP", "val_AP50"}`` of ``model`` (unwrapped from DDP) on ``spec.val_uri``, evaluated in
    this process; the model is back in training mode afterwards. Undecodable images are left out."""
    if spec.val_uri is None:
        raise ValueError("validation needs val_uri")
    dataset = open_dataset(spec.val_uri, spec.storage)
    gt: list[ImageGT] = []
    dt: list[ImageDT] = []
    model.eval()
    try:
        for shard in dataset.shards:
            table = read_shard(shard.uri, storage_options=spec.storage)
            items = list(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
            decoded = [(row, d) for row, d in enumerate(decode_many(items, threads=2)) if isinstance(d, DecodedImage)]
            outputs = detect_images(model, [d.image for _, d in decoded], batch_size=BATCH_SIZE, device=device)
            for (row, item), out in zip(decoded, outputs):
                boxes, labels, crowd = gt_targets(table.slice(row, 1))[0]
                gt.append(ImageGT(item.image_id, item.width, item.height, boxes, labels, crowd))
                dt.append(ImageDT(item.image_id, out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()))
    finally:
        model.train()
    metrics = coco_metrics(gt, dt, dataset.class_names)
    return {"val_AP": metrics["AP"], "val_AP50": metrics["AP50"]}
