"""Our Faster R-CNN against torchvision's, on the same weights and inputs (eval mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_resnet50_fpn

from detector import build_detector

NUM_CLASSES = 6
REFERENCES = {
    # resnet50 runs at a reduced resolution to keep the test fast on 2 cores.
    "resnet50_fpn": (fasterrcnn_resnet50_fpn, {"min_size": 256, "max_size": 400}),
    "mobilenet_v3_large_320_fpn": (fasterrcnn_mobilenet_v3_large_320_fpn, {}),
}
# Our inference speed-ups (channels-last batch, batch norms folded) change rounding, and rounding
# reorders the near-tied scores of random weights; without them we compute what torchvision does.
EXACT = {"channels_last": False, "fold_batchnorm": False}
SETTINGS = [
    {},
    {"box_score_thresh": 0.3, "box_nms_thresh": 0.3, "box_detections_per_img": 20},
    {"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 25, "rpn_nms_thresh": 0.5, "box_score_thresh": 0.1},
]


def _make_realistic(model: torch.nn.Module, seed: int) -> None:
    """Random weights that behave like a trained model's: batch-norm statistics calibrated on random
    images (fresh statistics give mobilenet features of ~1e-8, where every objectness ties and the
    NMS order among ties is arbitrary), objectness and class scores spread out so that there are
    detections with distinct scores."""
    generator = torch.Generator().manual_seed(seed)
    model.backbone.train()
    with torch.no_grad():
        for _ in range(3):
            model.backbone(torch.rand(2, 3, 160, 160, generator=generator))
        model.rpn.head.cls_logits.weight.normal_(0, 1.0, generator=generator)
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 0.5, generator=generator)
        predictor.cls_score.bias.copy_(torch.tensor([0.0, 2.0, 1.5, 1.0, 0.5, 0.0]))
        predictor.bbox_pred.weight.normal_(0, 0.05, generator=generator)
    model.eval()


def _reference(preset: str, **overrides):
    """torchvision's model from a fixed seed, made realistic, and the kwargs it was built with."""
    ctor, base = REFERENCES[preset]
    torch.manual_seed(0)
    model = ctor(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **{**base, **overrides})
    _make_realistic(model, seed=1)
    return model, {**base, **overrides}


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.rand(3, h, w, generator=generator) for h, w in [(240, 320), (300, 200), (181, 257)]]


def _assert_same(reference: list[dict], ours: list[dict], capacity: int) -> None:
    """Same detections per image up to float rounding: equal counts, and a one-to-one pairing with
    equal labels, boxes within 1e-3 px and scores within 1e-4. (Pairing rather than sorting, since
    scores equal to 1e-7 may sort either way.) When an image's list is full (``capacity``
    detections), the detections scoring within 1e-4 of its lowest score compete for the last places
    on rounding-level differences, so those may differ."""
    assert len(reference) == len(ours)
    for i, (ref, out) in enumerate(zip(reference, ours)):
        assert out["labels"].dtype == torch.int64
        assert len(ref["boxes"]) == len(out["boxes"]), f"image {i}: detection counts differ"
        full = len(ref["boxes"]) == capacity
        cutoff = float(torch.minimum(ref["scores"].min(), out["scores"].min())) if full and capacity else -1.0
        box_diff = (ref["boxes"][:, None, :] - out["boxes"][None, :, :]).abs().amax(dim=2).numpy()
        score_diff = (ref["scores"][:, None] - out["scores"][None, :]).abs().numpy()
        same_label = (ref["labels"][:, None] == out["labels"][None, :]).numpy()
        candidates = same_label & (box_diff <= 1e-3) & (score_diff <= 1e-4)
        taken = np.zeros(len(out["boxes"]), dtype=bool)
        for j in range(len(ref["boxes"])):
            free = np.flatnonzero(candidates[j] & ~taken)
            if free.size:
                taken[free[0]] = True
                continue
            assert float(ref["scores"][j]) <= cutoff + 1e-4, (
                f"image {i}: reference detection {j} (label {int(ref['labels'][j])}, "
                f"score {float(ref['scores'][j]):.6f}, box {ref['boxes'][j].tolist()}) has no match"
            )
        assert (out["scores"][torch.from_numpy(~taken)] <= cutoff + 1e-4).all(), f"image {i}: unmatched detections"


@pytest.mark.parametrize("preset", sorted(REFERENCES))
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_eval_outputs_match_torchvision(preset: str, setting: int) -> None:
    reference, kwargs = _reference(preset, **SETTINGS[setting])
    ours = build_detector(preset, NUM_CLASSES, **kwargs, **EXACT).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = _images()
    with torch.inference_mode():
        expected = reference(images)
        actual = ours(images)
    assert sum(len(d["boxes"]) for d in expected) > 10, "the reference should produce detections"
    _assert_same(expected, actual, ours.config.box_detections_per_img)


@pytest.mark.parametrize("preset", sorted(REFERENCES))
def test_state_dicts_are_interchangeable(preset: str) -> None:
    reference, kwargs = _reference(preset)
    ours = build_detector(preset, NUM_CLASSES, **kwargs, **EXACT)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert list(ref_state) == list(our_state)
    assert all(ref_state[k].shape == our_state[k].shape for k in ref_state)

    # The reverse direction: torchvision's model runs our weights.
    torch.manual_seed(5)
    ours = build_detector(preset, NUM_CLASSES, **kwargs, **EXACT)
    _make_realistic(ours, seed=6)
    reference.load_state_dict(ours.state_dict(), strict=True)
    images = _images()[:2]
    with torch.inference_mode():
        _assert_same(reference(images), ours(images), ours.config.box_detections_per_img)


def test_mobilenet_large_fpn_state_dict_matches() -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    reference = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    ours = build_detector("mobilenet_v3_large_fpn", NUM_CLASSES)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.config.min_size == reference.transform.min_size[0]
    assert ours.config.rpn_score_thresh == reference.rpn.score_thresh


# Sampling made deterministic: every labelled anchor and RoI is sampled (batch sizes beyond the
# number of candidates, positive fraction 1), so both models compute their losses over the same sets.
SAMPLE_ALL = {
    "rpn_batch_size_per_image": 10**6,
    "rpn_positive_fraction": 1.0,
    "box_batch_size_per_image": 10**6,
    "box_positive_fraction": 1.0,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "min_size": 192,
    "max_size": 320,
}


@pytest.mark.parametrize("preset", sorted(REFERENCES))
def test_train_losses_and_gradients_match_torchvision(preset: str) -> None:
    reference, kwargs = _reference(preset, **SAMPLE_ALL)
    with torch.no_grad():
        # Objectness logits of order 1: saturated sigmoids (all scores 1.0) would make the
        # proposal order among ties, and so the proposals, implementation-defined.
        reference.rpn.head.cls_logits.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    ours = build_detector(preset, NUM_CLASSES, **kwargs, **EXACT)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = _images()[:2]
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 120, 200], [150, 30, 300, 100]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5, 60, 90]]), "labels": torch.tensor([5])},
    ]
    reference.train()
    ours.train()
    expected = reference(images, targets)
    actual = ours(images, targets)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )

    sum(expected.values()).backward()
    sum(actual.values()).backward()
    reference_params = dict(reference.named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference_params.values() if p.grad is not None)
    for name, param in ours.named_parameters():
        reference_grad = reference_params[name].grad
        assert (param.grad is None) == (reference_grad is None), name
        if reference_grad is not None:
            torch.testing.assert_close(
                param.grad, reference_grad, rtol=1e-3, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
            )
