"""The public API: bad input, zero-box targets, overrides, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

from detector import build_detector, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("tiny", num_classes=4)


def _target(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


GOOD = torch.rand(3, 64, 80)


@pytest.mark.parametrize(
    "images,message",
    [
        ([], "empty list"),
        ([GOOD, torch.rand(64, 80)], "image 1: expected a [3,H,W]"),
        ([torch.rand(1, 3, 64, 64)], "image 0: expected a [3,H,W]"),
        ([GOOD, GOOD, torch.rand(4, 64, 64)], "image 2: expected 3 channels"),
        ([torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)], "image 0: expected a float tensor"),
        ([GOOD, "not a tensor"], "image 1: expected a tensor"),
        (GOOD, "must be a list"),
    ],
)
def test_bad_images_raise_value_error_naming_the_image(model, images, message) -> None:
    model.eval()
    with pytest.raises(ValueError) as info:
        model(images)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "target,message",
    [
        (_target([[0, 0, float("nan"), 10]], [1]), "target 1: boxes contain NaN"),
        (_target([[5, 5, 5, 10]], [1]), "target 1: box 0"),
        (_target([[0, 0, 10, 10], [20, 20, 10, 30]], [1, 2]), "target 1: box 1"),
        (_target([[0, 0, 10, 10]], [4]), "target 1: label 4"),
        (_target([[0, 0, 10, 10]], [0]), "target 1: label 0"),
        ({"boxes": torch.zeros(1, 5), "labels": torch.tensor([1])}, "target 1: boxes must be a [M,4]"),
        ({"boxes": torch.zeros(1, 4)}, "target 1: expected a dict"),
        ({"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1.0])}, "target 1: labels must be integers"),
    ],
)
def test_bad_targets_raise_value_error_naming_the_image(model, target, message) -> None:
    model.train()
    with pytest.raises(ValueError) as info:
        model([GOOD, GOOD], [_target([[1, 1, 20, 20]], [1]), target])
    assert message in str(info.value)


def test_training_needs_targets(model) -> None:
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model([GOOD])


def test_zero_box_target_is_valid_and_trains(model) -> None:
    model.train()
    losses = model([GOOD, torch.rand(3, 70, 50)], [_target([], []), _target([], [])])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_eval_output_format(model) -> None:
    model.eval()
    with torch.inference_mode():
        outputs = model([GOOD, torch.rand(3, 100, 40)])
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, [(64, 80), (100, 40)]):
        assert set(out) == {"boxes", "scores", "labels"}
        assert out["labels"].dtype == torch.int64 and out["boxes"].shape[1] == 4
        if len(out["boxes"]):
            assert out["boxes"][:, 2].max() <= w + 1e-4 and out["boxes"][:, 3].max() <= h + 1e-4


def test_unknown_override_and_preset() -> None:
    with pytest.raises(ValueError, match="unknown detector setting.*box_score_threshold"):
        build_detector("tiny", 3, box_score_threshold=0.5)
    with pytest.raises(ValueError, match="unknown preset 'resnet101'"):
        build_detector("resnet101", 3)
    model = build_detector("tiny", 3, box_score_thresh=0.5, box_detections_per_img=7)
    assert model.roi_heads.score_thresh == 0.5 and model.roi_heads.detections_per_img == 7


def test_checkpoint_round_trip_path_and_file_object(tmp_path) -> None:
    torch.manual_seed(1)
    names = ["__background__", "circle", "square", "triangle"]
    model = build_detector("tiny", 4, class_names=names, box_score_thresh=0.0).eval()
    images = [torch.rand(3, 96, 96)]
    with torch.inference_mode():
        expected = model(images)

    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    buffer.seek(0)
    for source in (path, str(path), buffer):
        loaded = load_checkpoint(source).eval()
        assert (loaded.preset, loaded.num_classes, loaded.class_names) == ("tiny", 4, names)
        assert loaded.overrides == {"box_score_thresh": 0.0}
        with torch.inference_mode():
            actual = loaded(images)
        torch.testing.assert_close(actual[0]["boxes"], expected[0]["boxes"])
        torch.testing.assert_close(actual[0]["scores"], expected[0]["scores"])

    # The file holds plain containers and tensors only: torch's safe loader accepts it.
    payload = torch.load(path, weights_only=True)
    assert payload["preset"] == "tiny"


def test_checkpoint_mismatch_and_bare_state_dict(tmp_path) -> None:
    model = build_detector("tiny", 4)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    with pytest.raises(ValueError, match="of preset 'tiny', not 'resnet50_fpn'"):
        load_checkpoint(path, preset="resnet50_fpn")
    with pytest.raises(ValueError, match="has 4 classes, not 7"):
        load_checkpoint(path, num_classes=7)

    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="say which preset"):
        load_checkpoint(bare)
    loaded = load_checkpoint(bare, preset="tiny")
    assert loaded.num_classes == 4
    with pytest.raises(ValueError, match="do not fit preset"):
        load_checkpoint(bare, preset="tiny", num_classes=6)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a detector checkpoint"):
        load_checkpoint(garbage)


def test_checkpoint_with_code_is_refused(tmp_path) -> None:
    """A pickle that would run code on load is rejected by weights_only loading."""

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "detectflow.detector/1", "payload": Exploit()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(path)
