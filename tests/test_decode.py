"""Decoding: the bad-input corpus, EXIF orientation, the pixel cap, real COCO photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode import DecodedImage, DecodeError, decode_image, decode_many, probe
from tests.corpus import MARKER, exif_rotated_jpeg, write_bad_input_corpus

COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset" / "images"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_bad_input_corpus(folder)


def test_every_corpus_item_decodes_or_names_its_error(corpus) -> None:
    folder, expectations = corpus
    for name, expectation in expectations.items():
        result = decode_image((folder / name).read_bytes(), name, max_pixels=10_000_000)
        if expectation[0] == "ok":
            assert isinstance(result, DecodedImage), f"{name}: {result}"
            _, width, height = expectation
            assert (result.width, result.height) == (width, height), name
            assert result.image.shape == (3, height, width) and result.image.dtype == torch.uint8, name
        else:
            assert isinstance(result, DecodeError), f"{name} should not decode"
            assert result.image_id == name and name in result.message
            assert expectation[1] in result.message, f"{name}: {result.message}"


def test_exif_rotation_moves_pixels_and_swaps_dimensions() -> None:
    result = decode_image(exif_rotated_jpeg(), "rotated")
    assert isinstance(result, DecodedImage) and (result.width, result.height) == (40, 60)
    top_right = result.image[:, 1:8, 32:39].float().mean(dim=(1, 2))
    top_left = result.image[:, 1:8, 1:8].float().mean(dim=(1, 2))
    assert torch.allclose(top_right, torch.tensor(MARKER, dtype=torch.float32), atol=30)
    assert top_left[0] < 80
    assert probe(exif_rotated_jpeg(), "rotated") == (40, 60)


def test_special_modes_become_sensible_rgb(corpus) -> None:
    folder, _ = corpus
    rgba = decode_image((folder / "rgba.png").read_bytes(), "rgba.png")
    assert rgba.image.unique().tolist() == [255]  # fully transparent blue composited on white
    cmyk = decode_image((folder / "cmyk.jpg").read_bytes(), "cmyk.jpg").image.float().mean(dim=(1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0 M=255 Y=255 K=0 is red
    gray16 = decode_image((folder / "gray16.png").read_bytes(), "gray16.png").image
    assert gray16[0, 0, 0] == 0 and gray16[0, -1, -1] == 255 and torch.equal(gray16[0], gray16[2])
    pixel = decode_image((folder / "one_pixel.png").read_bytes(), "one_pixel.png").image
    assert pixel.flatten().tolist() == [1, 2, 3]


def test_pixel_cap_is_checked_before_decoding(corpus) -> None:
    folder, _ = corpus
    data = (folder / "good.jpg").read_bytes()
    capped = decode_image(data, "good.jpg", max_pixels=100)
    assert isinstance(capped, DecodeError) and "64×48" in capped.message
    assert isinstance(decode_image(data, "good.jpg", max_pixels=64 * 48), DecodedImage)


def test_decode_many_preserves_order_with_errors_mixed_in(corpus) -> None:
    folder, expectations = corpus
    items = [(name, (folder / name).read_bytes()) for name in sorted(expectations)]
    results = decode_many(items, threads=3, max_pixels=10_000_000)
    assert [r.image_id for r in results] == [name for name, _ in items]
    for result, (name, _) in zip(results, items):
        assert isinstance(result, DecodedImage) == (expectations[name][0] == "ok"), name


@pytest.mark.skipif(not COCO_IMAGES.exists(), reason="shared COCO photos not present")
def test_coco_photos_match_pillow() -> None:
    for path in sorted(COCO_IMAGES.glob("*.jpg"))[:12]:
        ours = decode_image(path.read_bytes(), path.name)
        assert isinstance(ours, DecodedImage), ours
        with Image.open(path) as img:
            reference = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
        assert ours.image.shape == reference.shape
        # libjpeg versions differ in IDCT rounding: a small mean difference is expected.
        assert (ours.image.float() - reference.float()).abs().mean() < 2.0, path.name
