"""Image decoding and validation: bytes → ``uint8 [3,H,W]`` RGB as displayed, or an error value.

torchvision.io decodes JPEG (libjpeg-turbo; nvjpeg in batches on CUDA), PNG, WEBP and GIF; Pillow
takes over for what it lacks (BMP, TIFF, 16-bit PNGs with alpha …). Rules:

- EXIF orientation is applied, so width/height (and boxes) are those of the displayed image;
- grayscale, CMYK, palette and 16-bit images become 3-channel 8-bit RGB; transparent images are
  composited on white (what a viewer shows), not stripped of alpha (which exposes whatever colour
  the transparent pixels happen to hold);
- a pixel cap, checked from the header before anything is decoded, refuses decompression bombs;
- corrupt, truncated, empty or non-image bytes give a :class:`DecodeError` naming the image —
  decoding never raises for bad data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as tv_decode_image

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: above any camera in common use, far below a bomb
EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = ("JPEG", "TIFF", "WEBP", "PNG")
_JPEG_MAGIC = b"\xff\xd8\xff"

# Our own cap (``max_pixels``, checked from the header in :func:`probe` before any decoding) replaces
# Pillow's global one, which would refuse large headers without saying how large they are.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    image_id: str
    image: torch.Tensor  # uint8 [3, H, W], RGB, EXIF orientation applied
    width: int
    height: int


@dataclass(frozen=True)
class DecodeError:
    image_id: str
    message: str


def probe(data: bytes, image_id: str) -> tuple[int, int] | DecodeError:
    """Displayed ``(width, height)`` from the header only (EXIF rotations by ±90° swap them)."""
    if not data:
        return DecodeError(image_id, f"{image_id}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = _orientation(img)
    except UnidentifiedImageError as exc:
        return DecodeError(image_id, f"{image_id}: not a recognised image ({type(exc).__name__})")
    except Exception as exc:  # noqa: BLE001 — any parser failure is bad data
        return DecodeError(image_id, f"{image_id}: unreadable image header: {exc}")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = as stored). Broken metadata counts as none: the pixels may be fine."""
    if img.format not in _EXIF_FORMATS:
        return 1
    try:
        if img.format == "PNG":
            # Only an eXIf chunk before the pixel data: Pillow's getexif() would decode the whole
            # image to look for one after it — a decompression bomb before the pixel cap is checked.
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(EXIF_ORIENTATION, 1))
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 — unreadable EXIF is not an unreadable image
        return 1


def decode_image(data: bytes, image_id: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | DecodeError:
    """Decode one image; never raises for bad data."""
    size = probe(data, image_id)
    if isinstance(size, DecodeError):
        return size
    width, height = size
    if width * height > max_pixels:
        return DecodeError(
            image_id,
            f"{image_id}: {width}×{height} = {width * height / 1e6:.1f} MP exceeds the pixel cap of "
            f"{max_pixels / 1e6:.1f} MP",
        )
    if data.startswith(_JPEG_MAGIC) and b"\xff\xd9" not in data[-4096:]:
        return DecodeError(image_id, f"{image_id}: truncated JPEG (no end-of-image marker)")
    try:
        image = _decode_torchvision(data) if _torchvision_can(data) else None
    except (RuntimeError, ValueError):
        image = None
    if image is None:
        try:
            image = _decode_pillow(data)
        except Exception as exc:  # noqa: BLE001 — any decoder failure is bad data
            return DecodeError(image_id, f"{image_id}: cannot decode image: {exc}")
    if image.shape[-2:] != (height, width):
        return DecodeError(
            image_id, f"{image_id}: decoded size {tuple(image.shape[-2:])} differs from header {height}×{width}"
        )
    return DecodedImage(image_id, image.contiguous(), width, height)


def _torchvision_can(data: bytes) -> bool:
    """Formats torchvision decodes safely. PNGs go to Pillow: torchvision 0.29's ``decode_png``
    crashes the process (segmentation fault) on some corrupt files, and shows palette PNGs as
    grey indices."""
    if data.startswith(_JPEG_MAGIC):
        return True
    if data.startswith(b"RIFF"):
        return data[8:12] == b"WEBP"
    return data.startswith(b"GIF8")


def _decode_torchvision(data: bytes) -> torch.Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data.startswith(_JPEG_MAGIC):  # RGB mode converts grayscale and CMYK JPEGs
        return tv_decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    image = tv_decode_image(encoded, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    return _to_rgb8(image)


def _to_rgb8(image: torch.Tensor) -> torch.Tensor:
    """``[C,H,W]`` of 1–4 channels, 8 or 16 bits → ``uint8 [3,H,W]``, alpha composited on white."""
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype}")
    channels = image.shape[0]
    if channels in (2, 4):
        colour, alpha = image[:-1].float(), image[-1:].float() / 255.0
        image = (colour * alpha + 255.0 * (1.0 - alpha)).round().to(torch.uint8)
        channels -= 1
    if channels == 1:
        image = image.expand(3, -1, -1)
    return image


def _decode_pillow(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            array = np.asarray(img, dtype=np.int64)
            array = (array >> 8) if array.max(initial=0) > 255 else array
            return torch.from_numpy(array.clip(0, 255).astype(np.uint8)).expand(3, -1, -1).contiguous()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_many(
    items: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 4,
    device: torch.device | str | None = None,
) -> list[DecodedImage | DecodeError]:
    """Decode ``(image_id, bytes)`` pairs, order preserved. CPU decoding runs in a thread pool
    (the decoders release the GIL). On a CUDA ``device`` JPEGs are decoded in one nvjpeg batch and
    the results stay on the device; anything nvjpeg refuses falls back to the CPU path."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    results: list[DecodedImage | DecodeError | None] = [None] * len(items)
    cpu_indices = list(range(len(items)))
    if device.type == "cuda":
        cpu_indices = _decode_jpegs_on_gpu(items, results, max_pixels, device)
    if cpu_indices:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            decoded = pool.map(lambda i: decode_image(items[i][1], items[i][0], max_pixels=max_pixels), cpu_indices)
            for index, result in zip(cpu_indices, decoded):
                if device.type == "cuda" and isinstance(result, DecodedImage):
                    result = DecodedImage(
                        result.image_id, result.image.to(device, non_blocking=True), result.width, result.height
                    )
                results[index] = result
    return [r for r in results if r is not None]


def _decode_jpegs_on_gpu(
    items: Sequence[tuple[str, bytes]],
    results: list[DecodedImage | DecodeError | None],
    max_pixels: int,
    device: torch.device,
) -> list[int]:
    """nvjpeg batch decode of the valid JPEGs of ``items`` into ``results``; returns the indices
    left for the CPU path."""
    gpu_indices, encoded, sizes = [], [], []
    for index, (image_id, data) in enumerate(items):
        if not data.startswith(_JPEG_MAGIC) or b"\xff\xd9" not in data[-4096:]:
            continue
        size = probe(data, image_id)
        if isinstance(size, DecodeError) or size[0] * size[1] > max_pixels:
            continue  # the CPU path reports the error
        gpu_indices.append(index)
        encoded.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        sizes.append(size)
    if not gpu_indices:
        return list(range(len(items)))
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return list(range(len(items)))
    done = set()
    for index, image, (width, height) in zip(gpu_indices, images, sizes):
        if tuple(image.shape[-2:]) == (height, width):
            results[index] = DecodedImage(items[index][0], image, width, height)
            done.add(index)
    return [i for i in range(len(items)) if i not in done]
