"""Decoding: the bad-input corpus, EXIF orientation, colour modes, the pixel cap, real COCO photos."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodedImage, DecodeError, decode_image, decode_many, probe
from tests.corpus import (
    MARKER,
    animated_gif,
    decompression_bomb_png,
    exif_rotated_jpeg,
    marked_image,
    rgb16_png,
    with_orientation,
    write_bad_input_corpus,
)

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = REPO.parent / "shared" / "data" / "coco" / "val2017_subset" / "images"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_bad_input_corpus(folder)


def decoded(folder: Path, name: str) -> torch.Tensor:
    result = decode_image((folder / name).read_bytes(), name)
    assert isinstance(result, DecodedImage), result
    return result.image


def pillow_rgb(data: bytes) -> torch.Tensor:
    """Pillow's rendering as displayed (EXIF applied), ``uint8 [3,H,W]``."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def test_every_corpus_item_decodes_or_names_its_error(corpus) -> None:
    folder, expectations = corpus
    for name, expectation in expectations.items():
        data = (folder / name).read_bytes()
        result = decode_image(data, name)
        if expectation[0] == "ok":
            assert isinstance(result, DecodedImage), f"{name}: {result}"
            _, width, height = expectation
            assert (result.image_id, result.width, result.height) == (name, width, height)
            assert result.image.shape == (3, height, width) and result.image.dtype == torch.uint8, name
            assert result.image.is_contiguous(), name
            assert probe(data, name) == (width, height), "probe agrees with the decoder"
        else:
            assert isinstance(result, DecodeError), f"{name} should not decode"
            assert result.image_id == name and result.message.startswith(f"{name}: ")
            assert expectation[1] in result.message, f"{name}: {result.message}"
            assert ".cpp" not in result.message, "no decoder source locations in messages"


def test_header_errors_come_from_probe_too(corpus) -> None:
    folder, _ = corpus
    for name, text in [("zero.jpg", "empty"), ("text.jpg", "not a recognised image")]:
        result = probe((folder / name).read_bytes(), name)
        assert isinstance(result, DecodeError) and text in result.message and name in result.message
    # A truncated file's header is intact: probe answers, decoding refuses.
    assert probe((folder / "truncated.jpg").read_bytes(), "t") == (64, 48)
    assert probe(decompression_bomb_png(), "bomb") == (20000, 20000)


def test_exif_rotation_moves_pixels_and_swaps_dimensions() -> None:
    result = decode_image(exif_rotated_jpeg(), "rotated")
    assert isinstance(result, DecodedImage) and (result.width, result.height) == (40, 60)
    top_right = result.image[:, 1:8, 32:39].float().mean(dim=(1, 2))
    top_left = result.image[:, 1:8, 1:8].float().mean(dim=(1, 2))
    assert torch.allclose(top_right, torch.tensor(MARKER, dtype=torch.float32), atol=30)
    assert top_left[0] < 80
    assert probe(exif_rotated_jpeg(), "rotated") == (40, 60)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(fmt: str, orientation: int) -> None:
    """All eight orientations, through torchvision (PNG, WEBP, JPEG): pixels equal Pillow's
    ``exif_transpose`` (exactly for lossless formats)."""
    image = marked_image(24, 14)
    image.paste((0, 0, 255), (20, 0, 24, 4))  # a second marker: tells mirror images apart
    data = with_orientation(image, fmt, orientation, **({"lossless": True} if fmt == "WEBP" else {"quality": 95}))
    ours = decode_image(data, f"o{orientation}.{fmt}")
    assert isinstance(ours, DecodedImage), ours
    reference = pillow_rgb(data)
    assert ours.image.shape == reference.shape and (ours.height, ours.width) == tuple(reference.shape[1:])
    difference = (ours.image.int() - reference.int()).abs()
    assert difference.max() <= (0 if fmt != "JPEG" else 40) and difference.float().mean() < 2


def test_colour_modes_become_the_rgb_a_viewer_shows(corpus) -> None:
    folder, _ = corpus
    assert decoded(folder, "rgba.png").unique().tolist() == [255], "transparent blue on white is white"
    assert decoded(folder, "transparent.gif").unique().tolist() == [255]
    # Gray 0 at alpha 128 over white: (0·128 + 255·127 + 127) // 255 = 127.
    assert decoded(folder, "gray_alpha.png").unique().tolist() == [127]
    cmyk = decoded(folder, "cmyk.jpg").float().mean(dim=(1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, "C=0 M=255 Y=255 K=0 is red"
    gray16 = decoded(folder, "gray16.png")
    assert gray16[0, 0, 0] == 0 and gray16[0, -1, -1] == 255 and torch.equal(gray16[0], gray16[2])
    _, samples = rgb16_png()
    expected = torch.from_numpy((samples >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(decoded(folder, "rgb16.png"), expected), "16-bit keeps the high byte"
    for name in ("palette.png", "palette.gif", "image.bmp", "image.tiff", "gray.jpg", "image.webp"):
        reference = pillow_rgb((folder / name).read_bytes())
        assert torch.equal(decoded(folder, name), reference), f"{name} differs from Pillow"
    assert decoded(folder, "one_pixel.png").flatten().tolist() == [1, 2, 3]


def test_animated_images_give_their_first_frame(corpus) -> None:
    folder, _ = corpus
    for name in ("animated.gif", "animated.webp"):
        image = decoded(folder, name)
        assert image.shape == (3, 20, 30)
        assert image.float().mean(dim=(1, 2)).tolist() == pytest.approx(list(MARKER), abs=2), name
    assert decode_image(animated_gif(), "a.gif").image.shape == (3, 20, 30)


def test_pixel_cap_is_inclusive_and_configurable(corpus) -> None:
    folder, _ = corpus
    data = (folder / "good.jpg").read_bytes()
    capped = decode_image(data, "good.jpg", max_pixels=64 * 48 - 1)
    assert isinstance(capped, DecodeError) and "64×48" in capped.message and "pixel cap" in capped.message
    assert isinstance(decode_image(data, "good.jpg", max_pixels=64 * 48), DecodedImage)
    rotated = decode_image(exif_rotated_jpeg(), "rotated", max_pixels=100)
    assert isinstance(rotated, DecodeError) and "40×60" in rotated.message, "the displayed size is reported"
    assert DEFAULT_MAX_PIXELS < 20000 * 20000


def test_pixel_cap_is_enforced_without_allocating_the_image(tmp_path) -> None:
    """In a fresh interpreter: decoding and probing the 50 kB bomb (400 MP) leaves the peak
    resident memory where it was; decoding it for real (the control) raises it by hundreds of MB,
    which shows the measurement would see a decoder that ignored the cap.

    The peak is the process's own ``VmHWM``, reset before each step (``/proc/self/clear_refs``):
    ``ru_maxrss`` would not do, since Linux carries it across exec from the forking parent (the
    multi-GB test process), and the torch import alone peaks higher than the control decode."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb_png())
    script = f"""
import io, json
from PIL import Image
from pipeline.decode import decode_image, probe
def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
def reset_peak():
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
data = open({str(bomb)!r}, "rb").read()
warm_up = io.BytesIO()
Image.new("RGB", (64, 48)).save(warm_up, "PNG")
decode_image(warm_up.getvalue(), "warm-up")  # loads the decoders before the baseline
reset_peak()
before = peak_mb()
result = decode_image(data, "bomb.png")
size = probe(data, "bomb.png")
growth = peak_mb() - before
reset_peak()
before = peak_mb()
with Image.open(io.BytesIO(data)) as img:
    img.load()
print(json.dumps({{"message": getattr(result, "message", None), "size": size,
                  "growth_mb": growth, "control_growth_mb": peak_mb() - before}}))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "pixel cap" in report["message"] and report["size"] == [20000, 20000]
    assert report["growth_mb"] < 20, report
    assert report["control_growth_mb"] > 200, report  # the measurement sees a real decode (400 MB)


FUZZED = ("good.jpg", "cmyk.jpg", "palette.png", "rgb16.png", "image.webp", "animated.gif", "image.bmp", "image.tiff")
FUZZ_SCRIPT = """
import sys
from pathlib import Path
from pipeline.decode import DecodedImage, DecodeError, decode_image
from tests.corpus import damaged_variants
folder, names, count = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
for name in names:
    for trial, data in enumerate(damaged_variants((folder / name).read_bytes(), count, seed=len(name))):
        print(name, trial, flush=True)  # the last line names the input that crashed the process
        result = decode_image(data, f"{name}#{trial}")
        if isinstance(result, DecodedImage):
            assert result.image.shape == (3, result.height, result.width) and result.image.dtype.itemsize == 1
        else:
            assert isinstance(result, DecodeError) and result.message.startswith(f"{name}#{trial}: "), result
print("survived")
"""


def test_decode_never_raises_or_crashes_on_damaged_bytes(corpus) -> None:
    """Random damage to every format gives a decoded image or an error value: never an exception,
    never a crash of the process (run apart, so that a native crash is a clear failure here).
    torchvision's PNG decoder fails this within a few inputs (segmentation fault)."""
    folder, _ = corpus
    run = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, str(folder), ",".join(FUZZED), "60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = run.stdout.strip().splitlines()[-1:] or ["(nothing)"]
    assert run.returncode == 0, f"exit {run.returncode} after input {last[0]!r}:\n{run.stderr[-2000:]}"
    assert last == ["survived"]


def test_decode_many_preserves_order_with_errors_mixed_in(corpus) -> None:
    folder, expectations = corpus
    items = [(name, (folder / name).read_bytes()) for name in sorted(expectations)]
    threaded = decode_many(items, threads=3)
    sequential = decode_many(items, threads=1)
    assert [r.image_id for r in threaded] == [name for name, _ in items]
    for result, again, (name, _) in zip(threaded, sequential, items):
        assert isinstance(result, DecodedImage) == (expectations[name][0] == "ok"), name
        if isinstance(result, DecodedImage):
            assert torch.equal(result.image, again.image), name
        else:
            assert result == again
    assert decode_many([]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_decode_many_refuses_a_missing_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        decode_many([("x", b"")], device="cuda")


@pytest.mark.skipif(not COCO_IMAGES.exists(), reason="shared COCO photos not present")
def test_coco_photos_match_pillow() -> None:
    paths = sorted(COCO_IMAGES.glob("*.jpg"))[:12]
    assert paths
    results = decode_many([(path.name, path.read_bytes()) for path in paths], threads=2)
    for path, ours in zip(paths, results):
        assert isinstance(ours, DecodedImage), ours
        reference = pillow_rgb(path.read_bytes())
        assert ours.image.shape == reference.shape
        assert probe(path.read_bytes(), path.name) == (reference.shape[2], reference.shape[1])
        # libjpeg versions may differ in IDCT rounding and chroma upsampling: small differences only.
        assert (ours.image.float() - reference.float()).abs().mean() < 2.0, path.name
