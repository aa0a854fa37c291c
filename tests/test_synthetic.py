"""The synthetic shapes generator: deterministic, exact tight boxes, valid labels, sizes honoured.

Object pixels are found by comparing an image with the same image drawn without shapes
(``max_objects=0`` keeps the background, as ``make_image`` documents).
"""

from __future__ import annotations

import pytest
import torch

from detector.synthetic import CATEGORIES, SyntheticImage, make_image


def _object_pixels(seed: int, index: int, size: int | tuple[int, int] = 128, max_objects: int = 4) -> torch.Tensor:
    """Bool ``[H, W]``: the pixels a shape was drawn on."""
    with_shapes = make_image(seed, index, size, max_objects=max_objects)
    background = make_image(seed, index, size, max_objects=0)
    return (with_shapes.image != background.image).any(dim=0)


def test_same_arguments_give_identical_bytes_in_any_call_order() -> None:
    forward = [make_image(7, i, 96) for i in range(12)]
    backward = [make_image(7, i, 96) for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a.image, b.image)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(make_image(7, 0, 96).image, make_image(8, 0, 96).image)
    assert not torch.equal(make_image(7, 0, 96).image, make_image(7, 1, 96).image)


def test_types_shapes_and_label_range() -> None:
    for index in range(60):
        sample = make_image(3, index)
        assert isinstance(sample, SyntheticImage)
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 128, 128)
        assert sample.boxes.dtype == torch.float32 and sample.boxes.shape == (len(sample.labels), 4)
        assert sample.labels.dtype == torch.int64
        assert ((sample.labels >= 1) & (sample.labels <= len(CATEGORIES))).all()
        assert (
            (sample.boxes[:, :2] >= 0).all() and (sample.boxes[:, 2] <= 128).all() and (sample.boxes[:, 3] <= 128).all()
        )
        assert (sample.boxes[:, 2:] > sample.boxes[:, :2]).all()


def test_single_object_box_is_exactly_the_bounding_box_of_its_pixels() -> None:
    checked = 0
    for index in range(120):
        sample = make_image(11, index, max_objects=1)
        if len(sample.labels) == 0:
            continue
        ys, xs = torch.nonzero(_object_pixels(11, index, max_objects=1), as_tuple=True)
        expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.equal(sample.boxes[0], expected), f"image {index}: {sample.boxes[0]} vs {expected}"
        side = float((expected[2:] - expected[:2]).max())
        assert 10 <= side <= 60, f"image {index}: object {side} px at 128 px"
        checked += 1
    assert checked > 40


def test_boxes_are_tight_around_drawn_pixels_with_several_objects() -> None:
    """Every drawn pixel lies in some box, and each box's four edges touch drawn pixels."""
    boxes_checked = 0
    for index in range(60):
        sample = make_image(2, index)
        drawn = _object_pixels(2, index)
        inside = torch.zeros_like(drawn)
        for x1, y1, x2, y2 in sample.boxes.long().tolist():
            inside[y1:y2, x1:x2] = True
            region = drawn[y1:y2, x1:x2]
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any(), (
                f"image {index}: box {(x1, y1, x2, y2)} is not tight"
            )
            boxes_checked += 1
        assert not (drawn & ~inside).any(), f"image {index}: drawn pixels outside every box"
    assert boxes_checked > 60


def test_images_without_objects_are_valid() -> None:
    empty = [make_image(0, i) for i in range(40) if len(make_image(0, i).labels) == 0]
    assert empty, "some images are expected to have no objects"
    for sample in empty:
        assert sample.boxes.shape == (0, 4) and sample.boxes.dtype == torch.float32
        assert sample.labels.shape == (0,) and sample.labels.dtype == torch.int64
    none = make_image(0, 0, max_objects=0)
    assert none.boxes.shape == (0, 4) and none.image.shape == (3, 128, 128)


@pytest.mark.parametrize("size", [64, 128, (96, 160), (200, 72)])
def test_requested_size_is_honoured(size: int | tuple[int, int]) -> None:
    height, width = (size, size) if isinstance(size, int) else size
    for index in range(10):
        sample = make_image(4, index, size)
        assert sample.image.shape == (3, height, width)
        assert (sample.boxes[:, 2] <= width).all() and (sample.boxes[:, 3] <= height).all()


def test_too_small_images_are_refused() -> None:
    with pytest.raises(ValueError, match="16"):
        make_image(0, 0, 8)
