"""Paper-level unit tests of the detector's parts (Ren et al. 2015)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

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


def _random_boxes(count: int, generator: torch.Generator, extent: float = 100.0) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator) * extent
    return torch.cat([corners, corners + 4 + torch.rand(count, 2, generator=generator) * extent / 2], dim=1)


@pytest.mark.parametrize("low_quality", [False, True])
def test_batched_matching_equals_matching_each_image(low_quality: bool) -> None:
    from torchvision.ops import box_iou

    generator = torch.Generator().manual_seed(0)
    anchors = _random_boxes(300, generator).round()  # rounding creates IoU ties
    gt_per_image = [_random_boxes(n, generator).round() for n in (3, 0, 1, 5)]
    gt_per_image[3][4] = gt_per_image[3][1]  # a duplicate gt: ties between gts
    matcher = Matcher(0.6, 0.3, allow_low_quality_matches=low_quality)
    gt_image = torch.repeat_interleave(torch.arange(4), torch.tensor([len(g) for g in gt_per_image]))
    all_gt = torch.cat(gt_per_image)
    matches, values = matcher.match_per_image(box_iou(all_gt, anchors), gt_image, 4)
    offset = 0
    for i, gt in enumerate(gt_per_image):
        expected, expected_values = matcher(box_iou(gt, anchors))
        expected = torch.where(expected >= 0, expected + offset, expected)
        assert torch.equal(matches[i], expected), f"image {i}"
        torch.testing.assert_close(values[i], expected_values)
        offset += len(gt)
    assert (matches[1] == -1).all() and (values[1] == -1).all()  # no gt: all below the low threshold


def test_rpn_labels_a_batch_like_each_image_alone() -> None:
    rpn = _rpn()
    generator = torch.Generator().manual_seed(1)
    anchors = _random_boxes(200, generator)
    targets = [{"boxes": _random_boxes(n, generator)} for n in (2, 0, 4)]
    sizes = [(150, 150), (120, 90), (160, 140)]
    labels, matched = rpn.label_anchors(anchors, targets, sizes)
    assert labels.shape == (3, 200) and matched.shape == (3, 200, 4)
    for i, (target, size) in enumerate(zip(targets, sizes)):
        alone_labels, alone_matched = rpn.label_anchors(anchors, [target], [size])
        assert torch.equal(labels[i], alone_labels[0])
        positive = labels[i] == 1
        assert torch.equal(matched[i][positive], alone_matched[0][positive])
    assert (labels[1] == 0).all()
    assert (labels[0] == 1).sum() >= 2 and (labels[2] == 1).sum() >= 4  # every gt has an anchor


def test_box_head_sampling_batched_over_images() -> None:
    model = build_detector("tiny", num_classes=4, box_batch_size_per_image=16, box_positive_fraction=0.25)
    generator = torch.Generator().manual_seed(2)
    proposals = [_random_boxes(40, generator), _random_boxes(25, generator), _random_boxes(3, generator)]
    targets = [
        {"boxes": _random_boxes(2, generator), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
        {"boxes": _random_boxes(1, generator), "labels": torch.tensor([2])},
    ]
    rois, labels, regression_targets = model.roi_heads.sample_proposals(proposals, targets)
    counts = [len(r) for r in rois]
    assert counts[0] == 16 and counts[1] == 16 and counts[2] == 4  # image 2: 3 proposals + its gt
    assert len(labels) == len(regression_targets) == sum(counts)
    per_image = labels.split(counts)
    assert 1 <= int((per_image[0] > 0).sum()) <= 4  # at most 25 % foreground, its gts included
    assert set(per_image[0].tolist()) <= {0, 1, 3}
    assert (per_image[1] == 0).all()  # no gt: every RoI is background
    assert 2 in per_image[2].tolist() and set(per_image[2].tolist()) <= {0, 2}
    # Image 2's gt box is one of its RoIs, with a zero regression target.
    gt_row = int((torch.cat(rois) == targets[2]["boxes"]).all(dim=1).nonzero()[0, 0])
    torch.testing.assert_close(regression_targets[gt_row], torch.zeros(4))


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


@pytest.mark.parametrize("preset", ["vgg16_paper", "tiny", "resnet50_fpn"])
def test_roi_pooling_is_7x7_whatever_the_roi_size(preset: str) -> None:
    model = build_detector(preset, num_classes=3)
    channels = model.backbone.out_channels
    features = OrderedDict()
    for level, stride in enumerate([16] if preset == "vgg16_paper" else [8] if preset == "tiny" else [4, 8, 16, 32]):
        features[str(level)] = torch.rand(2, channels, 256 // stride, 256 // stride)
    rois = [torch.tensor([[0.0, 0, 3, 3], [10, 10, 250, 250], [1, 2, 60, 30]]), torch.tensor([[5.0, 7, 40, 90]])]
    chunks, order = model.roi_heads.box_roi_pool(features, rois, [(256, 256), (256, 256)])
    pooled = torch.cat(chunks)
    assert pooled.shape == (4, channels, 7, 7)
    if preset == "resnet50_fpn":  # RoIs of different sizes come from different levels
        assert len(chunks) > 1 and sorted(order.tolist()) == [0, 1, 2, 3]


def test_fpn_roi_align_equals_torchvision_multiscale_roi_align() -> None:
    from torchvision.ops import MultiScaleRoIAlign

    from detector.roi_heads import FPNRoIAlign

    generator = torch.Generator().manual_seed(5)
    features = OrderedDict(
        (str(level), torch.rand(3, 8, 320 // stride, 288 // stride, generator=generator))
        for level, stride in enumerate([4, 8, 16, 32])
    )
    features["pool"] = torch.rand(3, 8, 5, 5, generator=generator)
    proposals = [_random_boxes(30, generator, extent=250), _random_boxes(0, generator), _random_boxes(9, generator)]
    proposals[0][:5] *= 0.05  # tiny boxes: the finest level
    proposals[0][5:8] = torch.tensor([[0.0, 0, 250, 300], [10, 0, 280, 290], [0, 0, 460, 470]])  # the coarsest
    sizes = [(320, 270), (300, 288), (200, 200)]
    chunks, order = FPNRoIAlign(["0", "1", "2", "3"], 7, 2)(features, proposals, sizes)
    expected = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, proposals, sizes)
    assert len(chunks) == 4
    actual = torch.empty_like(expected)
    actual[order] = torch.cat(chunks)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # Mobilenet-style: two maps at the same stride put every RoI on the first, in proposal order.
    same_stride = OrderedDict((name, features["2"]) for name in ("0", "1"))
    chunks, order = FPNRoIAlign(["0", "1", "2", "3"], 7, 2)(same_stride, proposals, sizes)
    assert order is None and len(chunks) == 1
    torch.testing.assert_close(chunks[0], MultiScaleRoIAlign(["0", "1"], 7, 2)(same_stride, proposals, sizes))


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_transform_matches_torchvision(channels_last: bool) -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    generator = torch.Generator().manual_seed(3)
    sizes = [(120, 160), (300, 200), (120, 160), (61, 333), (120, 160), (1, 1000)]
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    ours = build_detector("tiny", num_classes=3, channels_last=channels_last).transform
    reference = GeneralizedRCNNTransform(
        ours.min_size, ours.max_size, list(ours.image_mean), list(ours.image_std), ours.size_divisible
    ).eval()
    targets = [{"boxes": torch.tensor([[1.0, 1, 20, 30]]), "labels": torch.tensor([1])} for _ in sizes]
    batch, image_sizes, scaled = ours(images[:-1], targets[:-1])
    expected, expected_targets = reference(images[:-1], [dict(t) for t in targets[:-1]])
    assert image_sizes == expected.image_sizes
    assert batch.shape == expected.tensors.shape and batch.shape[-1] % ours.size_divisible == 0
    assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # Bit for bit in torchvision's layout; the NHWC resize kernel may round differently.
    torch.testing.assert_close(batch, expected.tensors, atol=1e-6 if channels_last else 0, rtol=0)
    for ours_target, reference_target in zip(scaled, expected_targets):
        torch.testing.assert_close(ours_target["boxes"], reference_target["boxes"])
    # A 1-pixel-high image still resizes (to at least 1 pixel) instead of failing.
    assert ours(images[-1:])[1] == [(1, ours.max_size)]


def _calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Running statistics set to the exact statistics of ``images`` (fresh ones give degenerate features)."""
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass gives the batch statistics
    model.backbone.train()
    with torch.no_grad():
        model.backbone(images)
    model.eval()


@pytest.mark.parametrize(
    "preset,overrides",
    [("tiny", {}), ("mobilenet_v3_large_320_fpn", {"min_size": 160, "max_size": 240})],
)
def test_inference_fast_paths_keep_the_features(preset: str, overrides: dict) -> None:
    """Default inference (channels-last batch, batch norms folded into a cached copy of the backbone)
    gives the features of the plain backbone up to rounding, and follows weight changes."""
    torch.manual_seed(0)
    fast = build_detector(preset, num_classes=3, **overrides)
    exact = build_detector(preset, num_classes=3, channels_last=False, fold_batchnorm=False, **overrides)
    assert list(fast.state_dict()) == list(exact.state_dict())
    generator = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 150, 200, generator=generator), torch.rand(3, 170, 120, generator=generator)]
    _calibrate_batchnorm(fast, fast.transform(images)[0])

    def features(model):
        with torch.inference_mode():
            batch = model.transform(images)[0]
            backbone = model._inference_backbone.get(model.backbone) if model._inference_backbone else model.backbone
            return batch, backbone(batch)

    for _ in range(2):  # a weight change between the rounds: the folded copy must follow it
        exact.load_state_dict(fast.state_dict())
        fast.eval()
        exact.eval()
        batch, fast_features = features(fast)
        _, exact_features = features(exact)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        folded = fast._inference_backbone.get(fast.backbone)
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
        for name, expected in exact_features.items():
            scale = expected.abs().max()
            assert scale > 1e-3, "degenerate features make the comparison meaningless"
            torch.testing.assert_close(fast_features[name], expected, rtol=0, atol=1e-4 * float(scale))
        with torch.no_grad():
            for parameter in fast.backbone.parameters():
                parameter.mul_(1.01)
    assert fast._inference_backbone.get(fast.backbone) is not folded
    # The cache is not part of copies: a deep copy folds its own backbone.
    assert copy.deepcopy(fast)._inference_backbone._entry is None


def test_folded_backbone_follows_training_steps() -> None:
    torch.manual_seed(0)
    model = build_detector("tiny", num_classes=3)
    images = [torch.rand(3, 96, 96)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model.train()
        losses = model(images, [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1])}])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        model.eval()
        with torch.inference_mode():
            batch = model.transform(images)[0]
            folded = model._inference_backbone.get(model.backbone)(batch)["0"]
            plain = model.backbone(batch)["0"]
        torch.testing.assert_close(folded, plain, rtol=0, atol=1e-4 * float(plain.abs().max()))


def test_fold_batchnorm_follows_the_data_flow() -> None:
    """Named calls as in torchvision's resnet blocks, frozen batch norms, a convolution whose output
    is also used elsewhere (not folded), and a batch norm in training mode (not folded)."""
    from detector.fusion import fold_batchnorm

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = FrozenBatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 8, 1)
            self.bn2 = torch.nn.BatchNorm2d(8)
            self.conv3 = torch.nn.Conv2d(8, 8, 1)
            self.bn3 = torch.nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            y = self.conv2(x)
            return self.bn3(self.conv3(torch.relu(self.bn2(y)) + y))

    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():
        for norm in (block.bn1, block.bn2, block.bn3):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    block.eval()
    x = torch.rand(2, 3, 16, 16)
    expected = block(x)
    folded = fold_batchnorm(block)
    norms = {name for name, m in folded.named_modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))}
    assert norms == {"bn2"}  # conv2's output feeds the residual too
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in folded.parameters())
    # The original is untouched: same layers, same output to the bit, still trainable.
    assert isinstance(block.bn1, FrozenBatchNorm2d) and isinstance(block.bn3, torch.nn.BatchNorm2d)
    assert torch.equal(block(x), expected) and all(p.requires_grad for p in block.parameters())

    block.bn3.train()
    assert "bn3" in {name for name, _ in fold_batchnorm(block).named_modules()}
