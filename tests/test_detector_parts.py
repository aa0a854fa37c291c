"""Paper-level unit tests of the detector's parts (Ren et al. 2015)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from detector import PRESETS, build_detector
from detector.anchors import AnchorGenerator, cell_anchors
from detector.boxes import BoxCoder, clip_boxes
from detector.rpn import RegionProposalNetwork, RPNHead
from detector.sampling import Matcher, sample_balanced


def _rpn(**kwargs) -> RegionProposalNetwork:
    settings = dict(
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 100, "testing": 100},
        post_nms_top_n={"training": 50, "testing": 50},
        nms_thresh=0.7,
    )
    settings.update(kwargs)
    return RegionProposalNetwork(AnchorGenerator(((32,),), ((1.0,),)), RPNHead(4, 1), **settings)


def test_vgg16_paper_map_and_anchors_on_800px() -> None:
    model = build_detector("vgg16_paper", num_classes=21).eval()
    with torch.inference_mode():
        features = model.backbone(torch.zeros(1, 3, 800, 800))
    assert features["0"].shape == (1, 512, 50, 50)
    anchors = model.rpn.anchor_generator((800, 800), [(50, 50)], torch.device("cpu"))
    assert len(anchors) == 1 and anchors[0].shape == (22_500, 4)
    per_cell = anchors[0].view(50, 50, 9, 4)
    # Cell (0, 0) is centred on the origin, the next cell is shifted by the stride of 16.
    torch.testing.assert_close(per_cell[0, 1] - per_cell[0, 0], torch.tensor([16.0, 0, 16, 0]).expand(9, 4))
    torch.testing.assert_close(per_cell[1, 0] - per_cell[0, 0], torch.tensor([0.0, 16, 0, 16]).expand(9, 4))
    widths = per_cell[0, 0, :, 2] - per_cell[0, 0, :, 0]
    heights = per_cell[0, 0, :, 3] - per_cell[0, 0, :, 1]
    areas = (widths * heights).view(3, 3)  # ratio-major, scale-minor
    for i, scale in enumerate((128, 256, 512)):
        assert torch.allclose(areas[:, i], torch.tensor(float(scale**2)), rtol=0.02)
    ratios = (heights / widths).view(3, 3)
    for j, ratio in enumerate((0.5, 1.0, 2.0)):
        assert torch.allclose(ratios[j], torch.tensor(ratio), rtol=0.02)


def test_cell_anchors_are_centred_and_cached() -> None:
    base = cell_anchors((32, 64), (0.5, 1.0, 2.0))
    assert base.shape == (6, 4)
    torch.testing.assert_close(base[:, :2], -base[:, 2:])
    generator = AnchorGenerator(((32,),), ((1.0,),))
    first = generator((64, 64), [(8, 8)], torch.device("cpu"))
    assert generator((64, 64), [(8, 8)], torch.device("cpu")) is first
    assert generator((64, 96), [(8, 12)], torch.device("cpu"))[0].shape == (96, 4)


def test_anchor_labelling_rules() -> None:
    rpn = _rpn()
    anchors = torch.tensor(
        [
            [0, 0, 10, 10],  # IoU 1 with gt 0 → positive
            [0, 0, 10, 12],  # IoU 0.83 with gt 0 → positive
            [0, 0, 10, 20],  # IoU 0.5 → ignored (between 0.3 and 0.7)
            [50, 50, 60, 60],  # IoU 0 → negative
            [100, 100, 140, 140],  # gt 1's best (IoU 0.25 < 0.3) → positive by the best-anchor rule
            [100, 100, 140, 140],  # a tie of gt 1's best → positive too
            [100, 100, 180, 180],  # IoU 0.0625 with gt 1 → negative
        ],
        dtype=torch.float32,
    )
    gt = torch.tensor([[0, 0, 10, 10], [100, 100, 120, 120]], dtype=torch.float32)
    labels, matched = rpn.label_anchors(anchors, [{"boxes": gt}], [(200, 200)])
    assert labels[0].tolist() == [1, 1, -1, 0, 1, 1, 0]
    torch.testing.assert_close(matched[0, 4], gt[1])
    torch.testing.assert_close(matched[0, 1], gt[0])

    # No gt: all anchors negative.
    empty = torch.zeros((0, 4))
    labels, _ = rpn.label_anchors(anchors, [{"boxes": empty}], [(200, 200)])
    assert labels[0].tolist() == [0] * 7

    # Paper §3.3: anchors crossing the boundary are ignored in training.
    labels, _ = _rpn(allowed_border=0.0).label_anchors(anchors, [{"boxes": gt}], [(150, 150)])
    assert labels[0].tolist() == [1, 1, -1, 0, 1, 1, -1]


def test_matcher_thresholds_and_best_match_ties() -> None:
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.6, 0.05, 0.2]])
    matches, values = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert matches.tolist() == [0, -2, -1, -1]
    torch.testing.assert_close(values, torch.tensor([0.9, 0.6, 0.1, 0.2]))
    matches, _ = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert matches.tolist() == [0, 1, -1, -1]


@pytest.mark.parametrize("num_pos,num_neg", [(0, 1000), (10, 1000), (500, 1000), (300, 20), (0, 0)])
def test_sampler_limits(num_pos: int, num_neg: int) -> None:
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(50)])
    labels = labels[torch.randperm(labels.numel())].view(1, -1).repeat(3, 1)
    pos, neg = sample_balanced(labels, batch_size_per_image=256, positive_fraction=0.5)
    for row in range(3):
        assert int(pos[row].sum()) == min(num_pos, 128)
        assert int(neg[row].sum()) == min(num_neg, 256 - min(num_pos, 128))
        assert bool((labels[row][pos[row]] == 1).all()) and bool((labels[row][neg[row]] == 0).all())
    assert not (pos & neg).any()
    # Random: different images pick different subsets.
    if 128 < num_pos:
        assert not torch.equal(pos[0], pos[1])


def test_box_coder_round_trip() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(100, 2, generator=generator) * 200
    reference = torch.cat([reference, reference + 5 + torch.rand(100, 2, generator=generator) * 100], dim=1)
    boxes = torch.rand(100, 2, generator=generator) * 200
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(100, 2, generator=generator) * 100], dim=1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        decoded = coder.decode(coder.encode(boxes, reference), reference)
        torch.testing.assert_close(decoded[:, 0], boxes, atol=1e-3, rtol=1e-5)
    # exp is clamped: huge deltas give large but finite boxes.
    huge = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), reference[:1])
    assert torch.isfinite(huge).all()


def test_proposal_layer_clip_min_size_top_n_and_nms() -> None:
    rpn = _rpn(min_size=5.0, nms_thresh=0.5).eval()
    anchors = torch.tensor(
        [
            [-20, -20, 30, 30],  # best score, crosses the border → clipped to the image
            [-19, -19, 31, 31],  # overlaps the first heavily → removed by NMS
            [40, 40, 42, 42],  # 2 px: below min_size
            [60, 60, 90, 90],
            [10, 60, 40, 90],
        ],
        dtype=torch.float32,
    )
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 2)
    deltas = torch.zeros(2, 5, 4)
    proposals = rpn.propose(logits, deltas, anchors, [5], [(80, 100), (80, 100)])
    assert len(proposals) == 2
    expected = torch.tensor([[0, 0, 30, 30], [60, 60, 90, 80], [10, 60, 40, 80]], dtype=torch.float32)
    for image_proposals in proposals:
        torch.testing.assert_close(image_proposals, expected)
    # Pre-NMS top-N = 2 keeps only the two best anchors, of which NMS keeps one.
    rpn.pre_nms_top_n_test = 2
    assert rpn.propose(logits, deltas, anchors, [5], [(80, 100)] * 2)[0].shape == (1, 4)
    # Post-NMS top-N = 2 keeps the two best survivors of each image.
    rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test = 100, 2
    torch.testing.assert_close(rpn.propose(logits, deltas, anchors, [5], [(80, 100)] * 2)[1], expected[:2])


def test_clip_boxes_per_row_sizes() -> None:
    boxes = torch.tensor([[-5.0, -5, 500, 500], [-5.0, -5, 500, 500]])
    clipped = clip_boxes(boxes, torch.tensor([100.0, 50]), torch.tensor([200.0, 80]))
    assert clipped.tolist() == [[0, 0, 200, 100], [0, 0, 80, 50]]


@pytest.mark.parametrize("preset", ["vgg16_paper", "tiny", "mobilenet_v3_large_320_fpn"])
def test_roi_pooling_is_7x7_whatever_the_roi_size(preset: str) -> None:
    model = build_detector(preset, num_classes=3)
    stride = 16 if preset == "vgg16_paper" else 8
    channels = model.backbone.out_channels
    features = OrderedDict([("0", torch.rand(2, channels, 256 // stride, 256 // stride))])
    if preset.startswith("mobilenet"):
        features["1"] = torch.rand(2, channels, 8, 8)
    rois = [torch.tensor([[0.0, 0, 3, 3], [10, 10, 250, 250]]), torch.tensor([[5.0, 7, 40, 90]])]
    pooled = model.roi_heads.box_roi_pool(features, rois, [(256, 256), (256, 256)])
    assert pooled.shape == (3, channels, 7, 7)


def test_presets_follow_the_paper_and_torchvision() -> None:
    paper = PRESETS["vgg16_paper"]
    assert (paper.rpn_pre_nms_top_n_train, paper.rpn_pre_nms_top_n_test) == (12000, 6000)
    assert (paper.rpn_post_nms_top_n_train, paper.rpn_post_nms_top_n_test) == (2000, 300)
    assert (paper.rpn_fg_iou_thresh, paper.rpn_bg_iou_thresh, paper.rpn_nms_thresh) == (0.7, 0.3, 0.7)
    assert (paper.box_batch_size_per_image, paper.box_positive_fraction) == (128, 0.25)
    assert (paper.box_bg_iou_low, paper.box_bg_iou_thresh) == (0.1, 0.5)
    assert (paper.min_size, paper.max_size, paper.box_roi_pool) == (600, 1000, "roi_pool")
    model = build_detector("vgg16_paper", num_classes=21)
    assert model.roi_heads.box_head.fc6.out_features == 4096
    assert model.rpn.head.cls_logits.out_channels == 9


def test_box_head_ignores_proposals_below_bg_low() -> None:
    model = build_detector("vgg16_paper", num_classes=3)
    heads = model.roi_heads
    gt = {"boxes": torch.tensor([[0.0, 0, 100, 100]]), "labels": torch.tensor([2])}
    proposals = [
        torch.tensor([[0.0, 0, 90, 100], [0, 0, 100, 30], [300, 300, 400, 400], [0, 0, 100, 40]], dtype=torch.float32)
    ]
    rois, labels, targets = heads.sample_proposals(proposals, [gt])
    # fg (IoU .9 and the gt itself) → class 2; IoU .3/.4 → background; IoU 0 (< 0.1) → ignored.
    assert sorted(labels.tolist()) == [0, 0, 2, 2]
    assert not any(torch.equal(r, torch.tensor([300.0, 300, 400, 400])) for r in rois[0])
    assert targets.shape == (4, 4)
