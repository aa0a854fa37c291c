"""PNGs of images with their detections drawn (boxes, label names, scores): one image, or a sheet
of several side by side. Small images are enlarged by a whole factor (pixels kept sharp) so that
labels stay readable; boxes are drawn at the enlarged size."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import PIL.ImageDraw
import PIL.ImageFont
import pyarrow as pa
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
MIN_SIDE = 512  # pixels on the longer side below which an image is enlarged for drawing
SHEET_GAP = 8  # pixels between the images of a sheet
DEFAULT_SCORE_THRESHOLD = 0.5  # boxes drawn by default: the sure ones, not every proposal kept


def render(
    out_uri: str,
    image_id: str,
    out_png: str,
    *,
    dataset_uri: str | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    min_side: int = MIN_SIDE,
    storage_options: StorageOptions | None = None,
) -> dict:
    """Draw ``image_id``'s committed detections on the image and write a PNG to ``out_png`` (a path
    or URI). The image comes from ``dataset_uri`` or else the dataset named in the run's manifest.
    Images whose longer side is under ``min_side`` are enlarged by the smallest whole factor that
    reaches it. Returns what was drawn: ``{"image_id", "shard", "num_drawn", "path", "zoom"}``."""
    drawn = render_sheet(
        out_uri,
        [image_id],
        out_png,
        dataset_uri=dataset_uri,
        score_threshold=score_threshold,
        min_side=min_side,
        storage_options=storage_options,
    )
    return {**drawn["images"][0], "path": out_png}


def render_sheet(
    out_uri: str,
    image_ids: list[str],
    out_png: str,
    *,
    dataset_uri: str | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    columns: int = 4,
    min_side: int = MIN_SIDE,
    storage_options: StorageOptions | None = None,
) -> dict:
    """Several images with their detections, drawn as :func:`render` draws one and laid out in rows
    of ``columns`` on a white sheet, into one PNG. Every image is checked before anything is
    written: an unknown image id raises ``ValueError`` naming it. Returns ``{"path", "images":
    [{"image_id", "shard", "num_drawn", "zoom"}, …]}`` in the order given."""
    if not image_ids:
        raise ValueError("no image ids to draw")
    if columns < 1:
        raise ValueError(f"columns must be ≥ 1, not {columns}")
    store = OutputStore(out_uri, storage_options)
    if dataset_uri is None:
        manifest = store.read_manifest() or {}
        dataset_uri = manifest.get("data_uri")
        if not dataset_uri:
            raise ValueError(f"{storage.redact(out_uri)} has no manifest naming its dataset: pass --dataset")
    shards = _shards_of(out_uri, image_ids, storage_options)
    dataset = open_dataset(dataset_uri, storage_options)
    shard_uris = {s.name: s.uri for s in dataset.shards}
    encoded: dict[str, bytes] = {}
    for shard in sorted(set(shards.values())):
        wanted = [i for i, s in shards.items() if s == shard]
        if shard not in shard_uris:
            raise ValueError(f"shard {shard} of image {wanted[0]!r} is not in dataset {storage.redact(dataset_uri)}")
        table = read_shard(shard_uris[shard], ["image_id", "image"], storage_options)
        table = table.filter(pc.is_in(table.column("image_id"), pa.array(wanted, pa.string())))
        encoded.update(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
    detections: dict[str, list[dict[str, Any]]] = {image_id: [] for image_id in image_ids}
    for row in query(
        out_uri,
        "SELECT image_id, label, label_name, score, x1, y1, x2, y2 FROM detections "
        "WHERE list_contains(?, image_id) AND score >= ? ORDER BY score",
        storage_options,
        parameters=[list(detections), float(score_threshold)],
    ).to_pylist():
        detections[row["image_id"]].append(row)
    pictures, drawn = [], []
    for image_id in image_ids:
        if image_id not in encoded:
            raise ValueError(f"image {image_id!r} is not in shard {shards[image_id]} of {storage.redact(dataset_uri)}")
        picture, zoom = _draw(image_id, encoded[image_id], detections[image_id], min_side)
        pictures.append(_captioned(picture, f"{image_id} · {len(detections[image_id])} boxes"))
        drawn.append(
            {"image_id": image_id, "shard": shards[image_id], "num_drawn": len(detections[image_id]), "zoom": zoom}
        )
    sheet = pictures[0] if len(pictures) == 1 else _tile(pictures, columns)
    buffer = io.BytesIO()
    Image.fromarray(sheet.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    storage.write_bytes(out_png, buffer.getvalue(), storage_options)
    return {"path": out_png, "images": drawn}


def _shards_of(out_uri: str, image_ids: list[str], storage_options: StorageOptions | None) -> dict[str, str]:
    """The shard of each image among the committed outputs; an unknown image raises, named."""
    found = query(
        out_uri,
        "SELECT image_id, shard FROM images WHERE list_contains(?, image_id)",
        storage_options,
        parameters=[list(dict.fromkeys(image_ids))],
    ).to_pylist()
    shards = {row["image_id"]: row["shard"] for row in found}
    for image_id in image_ids:
        if image_id not in shards:
            raise ValueError(f"image {image_id!r} is not among the committed outputs of {storage.redact(out_uri)}")
    return shards


def _draw(image_id: str, data: bytes, detections: list[dict[str, Any]], min_side: int) -> tuple[torch.Tensor, int]:
    """``uint8 [3,H,W]`` of the image (enlarged by ``zoom`` when small) with its boxes; and ``zoom``."""
    decoded = decode_image(data, image_id)
    if isinstance(decoded, DecodeError):
        raise ValueError(decoded.message)
    zoom = max(1, math.ceil(min_side / max(decoded.width, decoded.height)))
    image = decoded.image
    if zoom > 1:
        image = image.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
    scale = max(1, round(max(image.shape[1], image.shape[2]) / 640))
    if detections:
        boxes = torch.tensor([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in detections], dtype=torch.float32)
        labels = [f"{d['label_name'] or d['label']} {d['score']:.2f}" for d in detections]
        colours = [PALETTE[d["label"] % len(PALETTE)] for d in detections]
        image = draw_bounding_boxes(
            image,
            boxes * zoom,
            labels=labels,
            colors=colours,
            width=2 * scale,
            font_size=14 * scale,
            font=_font(),
            fill_labels=True,  # text on a box-coloured patch, readable on any photo
            label_colors=[_text_colour(colour) for colour in colours],
        )
    return image, zoom


def _captioned(picture: torch.Tensor, text: str) -> torch.Tensor:
    """``picture`` with ``text`` (its image id) on a white band below it."""
    size = max(12, min(20, picture.shape[2] // 24))
    band = Image.new("RGB", (picture.shape[2], size + 8), "white")
    draw = PIL.ImageDraw.Draw(band)
    font_path = _font()
    font = PIL.ImageFont.truetype(font_path, size) if font_path else PIL.ImageFont.load_default()
    draw.text((4, 3), text, fill="black", font=font)
    strip = torch.from_numpy(np.array(band)).permute(2, 0, 1)
    return torch.cat([picture, strip], dim=1)


def _tile(pictures: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Pictures in rows of ``columns``, each in a cell as large as the largest, on white."""
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    cell_h = max(p.shape[1] for p in pictures)
    cell_w = max(p.shape[2] for p in pictures)
    sheet = torch.full(
        (3, rows * cell_h + (rows + 1) * SHEET_GAP, columns * cell_w + (columns + 1) * SHEET_GAP),
        255,
        dtype=torch.uint8,
    )
    for index, picture in enumerate(pictures):
        top = SHEET_GAP + (index // columns) * (cell_h + SHEET_GAP)
        left = SHEET_GAP + (index % columns) * (cell_w + SHEET_GAP)
        sheet[:, top : top + picture.shape[1], left : left + picture.shape[2]] = picture
    return sheet


def _text_colour(background: str) -> str:
    """Black on light backgrounds, white on dark ones (relative luminance of ``#rrggbb``)."""
    red, green, blue = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 140 else "white"


def _font() -> str | None:
    """A TrueType font for readable labels at any size (Pillow's bundled DejaVu when present)."""
    for candidate in (
        Path(PIL.__file__).parent / "fonts" / "DejaVuSans.ttf",
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    ):
        if candidate.exists():
            return str(candidate)
    return None
