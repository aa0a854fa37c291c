"""Image decoding and validation: bytes → ``uint8 [3,H,W]`` RGB as displayed, or an error value.

Decoders: torchvision.io (libjpeg-turbo, libwebp, giflib; nvjpeg in batches on CUDA) for JPEG,
WEBP and GIF; Pillow for PNG, BMP and TIFF, for what torchvision refuses (animated WEBP, GIF
transparency, exotic JPEGs) and as a second opinion when torchvision fails. PNG never goes to
torchvision: its ``decode_png`` (0.29) crashes the process with a segmentation fault on corrupt
pixel data (``libpng error: IDAT: incorrect data check``), and one bad file must not kill a worker;
Pillow's PNG decoder is as fast and fails cleanly. Only the formats above are accepted: Pillow's
other plugins (EPS runs Ghostscript, XBM/XPM parse text) never see the bytes.

Rules, the same whichever decoder runs:

- the header is read first (:func:`probe`), without decoding any pixel data; its size is checked
  against the pixel cap (``max_pixels``) before anything is allocated, so that a 50 kB PNG that
  claims 20000×20000 pixels (a decompression bomb) costs nothing;
- EXIF orientation (JPEG, PNG ``eXIf`` before the pixel data, WEBP, TIFF) is read from that header
  and applied to the pixels here, so ``width``/``height`` (and boxes) are those of the displayed
  image and every decoder agrees with :func:`probe`;
- grayscale, CMYK, palette and 16-bit images become 3-channel 8-bit RGB (16-bit: the high byte);
  transparent images are composited on white, what a viewer shows (dropping alpha would expose
  whatever colour the transparent pixels happen to hold, often black); animated images give their
  first frame;
- corrupt, truncated, empty or non-image bytes give a :class:`DecodeError` whose message starts with
  the image id; decoding never raises for bad data.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_gif, decode_jpeg, decode_webp

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: above any camera in common use, far below a bomb
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow plugin names
EXIF_ORIENTATION_TAG = 0x0112
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture JPEG from cameras; the first picture is shown
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_TORCHVISION_LOCATION = re.compile(r"^[^,]*, \S+\.(?:cpp|cu|h):\d+, ")  # "decode_png, /…/x.cpp:79, "

# The pixel cap is ours, checked from the header with the caller's ``max_pixels``. Pillow's global
# one would refuse large headers in ``Image.open`` (before the size is known to us) and could not
# honour a caller's larger cap.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``image`` is ``uint8 [3, height, width]``, RGB, as displayed (EXIF
    orientation applied), on the device it was decoded to."""

    image_id: str
    image: torch.Tensor
    width: int
    height: int


@dataclass(frozen=True)
class DecodeError:
    """An image that cannot be used; ``message`` starts with the image id and says why."""

    image_id: str
    message: str


@dataclass(frozen=True)
class _Header:
    """What the header says: stored size (before orientation), format, Pillow mode, EXIF
    orientation (1 = as stored … 8), transparency, frame count."""

    stored_width: int
    stored_height: int
    format: str
    mode: str
    orientation: int
    has_alpha: bool
    animated: bool

    @property
    def size(self) -> tuple[int, int]:
        """Displayed ``(width, height)``: orientations 5–8 turn the image by a quarter."""
        if self.orientation in (5, 6, 7, 8):
            return self.stored_height, self.stored_width
        return self.stored_width, self.stored_height

    @property
    def pixels(self) -> int:
        return self.stored_width * self.stored_height


class _Undecodable(Exception):
    """Raised inside this module when no decoder can read the pixels; becomes a DecodeError."""


# ------------------------------------------------------------------------------- header


def _read_header(data: bytes, image_id: str) -> _Header | DecodeError:
    if not data:
        return DecodeError(image_id, f"{image_id}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
            width, height = img.size
            return _Header(
                stored_width=width,
                stored_height=height,
                format=str(img.format),
                mode=img.mode,
                orientation=_orientation(img),
                has_alpha=img.mode in _ALPHA_MODES or "transparency" in img.info,
                animated=bool(getattr(img, "is_animated", False)),
            )
    except Image.UnidentifiedImageError:
        return DecodeError(
            image_id, f"{image_id}: not a recognised image (expected one of {', '.join(SUPPORTED_FORMATS)})"
        )
    except Exception as exc:  # noqa: BLE001 — any parser failure is bad data
        return DecodeError(image_id, f"{image_id}: unreadable image header: {exc}")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from the header alone (never ``getexif()``, which makes Pillow decode a
    whole PNG to look for an ``eXIf`` chunk after the pixels). Broken metadata counts as 1."""
    try:
        if img.format == "TIFF":
            value = img.tag_v2.get(EXIF_ORIENTATION_TAG, 1)  # type: ignore[attr-defined]
        else:
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(EXIF_ORIENTATION_TAG, 1)
        orientation = int(value)
    except Exception:  # noqa: BLE001 — unreadable EXIF is not an unreadable image
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def probe(data: bytes, image_id: str) -> tuple[int, int] | DecodeError:
    """Displayed ``(width, height)`` from the header only (EXIF rotations by ±90° swap them).

    Cheap: no pixel data is decoded, whatever the image claims to hold.
    """
    header = _read_header(data, image_id)
    return header if isinstance(header, DecodeError) else header.size


# ------------------------------------------------------------------------------- pixels


def decode_image(data: bytes, image_id: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | DecodeError:
    """Decode one image to ``uint8 [3,H,W]`` RGB as displayed; never raises for bad data."""
    header = _read_header(data, image_id)
    if isinstance(header, DecodeError):
        return header
    capped = _check_pixel_cap(header, image_id, max_pixels)
    if capped is not None:
        return capped
    try:
        image = _decode_pixels(data, header)
    except _Undecodable as exc:
        return DecodeError(image_id, f"{image_id}: cannot decode {header.format} image: {exc}")
    return _finish(image_id, image, header)


def _check_pixel_cap(header: _Header, image_id: str, max_pixels: int) -> DecodeError | None:
    if header.pixels <= max_pixels:
        return None
    width, height = header.size
    return DecodeError(
        image_id,
        f"{image_id}: {width}×{height} = {header.pixels / 1e6:.1f} MP exceeds the pixel cap of "
        f"{max_pixels / 1e6:.1f} MP",
    )


def _finish(image_id: str, image: torch.Tensor, header: _Header) -> DecodedImage | DecodeError:
    """Stored-orientation ``[C,H,W]`` of any channel count and depth → the displayed RGB image."""
    stored = (header.stored_height, header.stored_width)
    if tuple(image.shape[-2:]) != stored:
        return DecodeError(
            image_id,
            f"{image_id}: decoded size {image.shape[-1]}×{image.shape[-2]} differs from the header's "
            f"{header.stored_width}×{header.stored_height}",
        )
    image = apply_orientation(to_rgb8(image), header.orientation).contiguous()
    width, height = header.size
    return DecodedImage(image_id, image, width, height)


def _decode_pixels(data: bytes, header: _Header) -> torch.Tensor:
    """Pixels as stored (orientation not applied), ``[C,H,W]`` uint8 or uint16."""
    torchvision_error: Exception | None = None
    if _torchvision_reads(header):
        try:
            return _decode_torchvision(data, header)
        except (RuntimeError, ValueError) as exc:
            torchvision_error = exc
    try:
        return _decode_pillow(data)
    except Exception as exc:  # noqa: BLE001 — any decoder failure is bad data
        reason = torchvision_error if torchvision_error is not None else exc
        raise _Undecodable(_TORCHVISION_LOCATION.sub("", str(reason)) or type(reason).__name__) from exc


def _torchvision_reads(header: _Header) -> bool:
    if header.format in _JPEG_FORMATS:
        return True
    if header.format == "WEBP":
        return not header.animated  # torchvision refuses animated WEBP
    if header.format == "GIF":
        return not header.has_alpha  # torchvision ignores GIF transparency
    return False


def _decode_torchvision(data: bytes, header: _Header) -> torch.Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if header.format in _JPEG_FORMATS:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)  # converts grayscale, CMYK and YCCK
    if header.format == "WEBP":
        return decode_webp(encoded, mode=ImageReadMode.RGB_ALPHA if header.has_alpha else ImageReadMode.RGB)
    frames = decode_gif(encoded)  # [3,H,W], or [N,3,H,W] when animated
    return frames[0] if frames.dim() == 4 else frames


def _decode_pillow(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
        img.load()  # the first frame of animated images
        if img.mode in _SIXTEEN_BIT_MODES:
            gray = np.asarray(img, dtype=np.int64).clip(0, 65535).astype(np.uint16)
            return torch.from_numpy(gray)[None]
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            img = img.convert("RGBA")
        elif img.mode != "RGB":
            img = img.convert("RGB")  # CMYK (Adobe's inverted JPEG CMYK too), L, P, 1, F, YCbCr …
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_rgb8(image: torch.Tensor) -> torch.Tensor:
    """``[C,H,W]`` with 1–4 channels (gray, gray+alpha, RGB, RGBA), uint8 or uint16 →
    ``uint8 [3,H,W]``: 16-bit keeps the high byte; alpha is composited on white (``c·a + 255·(1−a)``,
    rounded); gray is repeated into three channels."""
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype}")
    channels = image.shape[0]
    if channels in (2, 4):
        colour, alpha = image[:-1], image[-1:]
        if bool((alpha == 255).all()):
            image = colour
        else:
            alpha = alpha.to(torch.int32)
            blended = (colour.to(torch.int32) * alpha + 255 * (255 - alpha) + 127) // 255
            image = blended.to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] != 3:
        raise ValueError(f"unsupported channel count {channels}")
    return image


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[..., H, W]`` as stored → as displayed for EXIF orientation 1–8 (what Pillow's
    ``ImageOps.exif_transpose`` does): 2 mirror, 3 rotate 180°, 4 flip, 5 transpose,
    6 rotate 90° clockwise, 7 transverse, 8 rotate 90° counter-clockwise."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip((-2, -1))
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


# ------------------------------------------------------------------------------ batches


def decode_many(
    items: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 4,
    device: torch.device | str | None = None,
) -> list[DecodedImage | DecodeError]:
    """Decode ``(image_id, bytes)`` pairs; the results are in the order of ``items``.

    CPU decoding runs in a pool of ``threads`` threads (the decoders release the GIL). On a CUDA
    ``device`` the JPEGs are decoded by nvjpeg in one batch and stay on the device; a JPEG nvjpeg
    refuses, and every other format, takes the CPU path and is then copied to the device.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"decoding to {device} was asked for, but CUDA is not available")
    results: list[DecodedImage | DecodeError | None] = [None] * len(items)
    cpu_indices = list(range(len(items)))
    if device.type == "cuda":
        cpu_indices = _decode_jpegs_on_gpu(items, results, max_pixels, device)

    def decode_at(index: int) -> DecodedImage | DecodeError:
        image_id, data = items[index]
        return decode_image(data, image_id, max_pixels=max_pixels)

    if threads > 1 and len(cpu_indices) > 1:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
            decoded = list(pool.map(decode_at, cpu_indices))
    else:
        decoded = [decode_at(index) for index in cpu_indices]
    for index, result in zip(cpu_indices, decoded):
        if device.type != "cpu" and isinstance(result, DecodedImage):
            result = DecodedImage(result.image_id, result.image.to(device), result.width, result.height)
        results[index] = result
    return [result for result in results if result is not None]


def _decode_jpegs_on_gpu(
    items: Sequence[tuple[str, bytes]],
    results: list[DecodedImage | DecodeError | None],
    max_pixels: int,
    device: torch.device,
) -> list[int]:
    """nvjpeg batch decode of the plain JPEGs of ``items`` into ``results``; returns the indices
    left for the CPU path (other formats, CMYK, capped or broken JPEGs, anything nvjpeg refuses)."""
    candidates: list[tuple[int, _Header]] = []
    for index, (image_id, data) in enumerate(items):
        if not data.startswith(b"\xff\xd8") or b"\xff\xd9" not in data[-64:]:
            continue  # not a JPEG, or no end marker: the CPU decoder gives the precise verdict
        header = _read_header(data, image_id)
        if isinstance(header, _Header) and header.format in _JPEG_FORMATS and header.mode in ("RGB", "L"):
            if header.pixels <= max_pixels:
                candidates.append((index, header))
    if not candidates:
        return list(range(len(items)))
    encoded = [torch.frombuffer(bytearray(items[index][1]), dtype=torch.uint8) for index, _ in candidates]
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        # One bad image fails the batch: decode one by one to keep the good ones on the GPU.
        images = []
        for tensor in encoded:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    done = set()
    for (index, header), image in zip(candidates, images):
        if image is None:
            continue
        result = _finish(items[index][0], image, header)
        if isinstance(result, DecodedImage):
            results[index] = result
            done.add(index)
    return [index for index in range(len(items)) if index not in done]
