"""A PNG of one image with its detections drawn (boxes, label names, scores)."""

from __future__ import annotations

import io
from pathlib import Path

import PIL
import pyarrow.compute as pc
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from . import storage
from .dataset import open_dataset, read_shard
from .decode import DecodeError, decode_image
from .outputs import OutputStore
from .query import query
from .storage import StorageOptions

# One colour per class (label modulo the palette): 16 colours that stay distinct on photos.
PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
]


def render(
    out_uri: str,
    image_id: str,
    out_png: str,
    *,
    dataset_uri: str | None = None,
    score_threshold: float = 0.0,
    storage_options: StorageOptions | None = None,
) -> dict:
    """Draw ``image_id``'s committed detections on the image and write a PNG to ``out_png`` (a path
    or URI). The image comes from ``dataset_uri`` or else the dataset named in the run's manifest.
    Returns what was drawn: ``{"image_id", "shard", "num_drawn", "path"}``."""
    store = OutputStore(out_uri, storage_options)
    if dataset_uri is None:
        manifest = store.read_manifest() or {}
        dataset_uri = manifest.get("data_uri")
        if not dataset_uri:
            raise ValueError(f"{storage.redact(out_uri)} has no manifest naming its dataset: pass --dataset")
    images = query(out_uri, "SELECT shard FROM images WHERE image_id = ?", storage_options, parameters=[image_id])
    if images.num_rows == 0:
        raise ValueError(f"image {image_id!r} is not among the committed outputs of {storage.redact(out_uri)}")
    shard = images.column("shard")[0].as_py()
    detections = query(
        out_uri,
        "SELECT label, label_name, score, x1, y1, x2, y2 FROM detections "
        "WHERE image_id = ? AND score >= ? ORDER BY score",
        storage_options,
        parameters=[image_id, float(score_threshold)],
    ).to_pylist()

    dataset = open_dataset(dataset_uri, storage_options)
    shard_info = next((s for s in dataset.shards if s.name == shard), None)
    if shard_info is None:
        raise ValueError(f"shard {shard} of image {image_id!r} is not in dataset {storage.redact(dataset_uri)}")
    table = read_shard(shard_info.uri, ["image_id", "image"], storage_options)
    row = table.filter(pc.equal(table.column("image_id"), image_id))
    if row.num_rows == 0:
        raise ValueError(f"image {image_id!r} is not in shard {shard} of {storage.redact(dataset_uri)}")
    decoded = decode_image(row.column("image")[0].as_py(), image_id)
    if isinstance(decoded, DecodeError):
        raise ValueError(decoded.message)

    image = decoded.image
    scale = max(1, round(max(decoded.width, decoded.height) / 640))
    if detections:
        boxes = torch.tensor([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in detections], dtype=torch.float32)
        labels = [f"{d['label_name'] or d['label']} {d['score']:.2f}" for d in detections]
        colours = [PALETTE[d["label"] % len(PALETTE)] for d in detections]
        image = draw_bounding_boxes(
            image, boxes, labels=labels, colors=colours, width=2 * scale, font_size=12 * scale, font=_font()
        )
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    storage.write_bytes(out_png, buffer.getvalue(), storage_options)
    return {"image_id": image_id, "shard": shard, "num_drawn": len(detections), "path": out_png}


def _font() -> str | None:
    """A TrueType font for readable labels at any size (Pillow's bundled DejaVu when present)."""
    for candidate in (
        Path(PIL.__file__).parent / "fonts" / "DejaVuSans.ttf",
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    ):
        if candidate.exists():
            return str(candidate)
    return None
