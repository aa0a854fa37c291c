"""Our Faster R-CNN versus torchvision's, same weights and inputs, interleaved in one process.

CPU (torch threads = cores), batch 8 of 480×640 images, eval + inference_mode; A/B alternate each
repeat after warm-up; the median of the repeats gives images/s and the ratio ours / torchvision.
Also records the speed of ours with channels_last, and of the vgg16_paper and tiny presets (ours
only). ``--quick`` runs mobilenet_v3_large_320_fpn only, one repeat (resnet50_fpn takes ~40 s a
batch per model on 2 cores).

    .venv/bin/python bench/detector.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# This file is named like the `detector` package: keep its folder behind the project on sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import torch  # noqa: E402
from _common import median, timed, write_result  # noqa: E402
from torchvision.models.detection import (  # noqa: E402
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_resnet50_fpn,
)

from detector import build_detector  # noqa: E402

REFERENCES = {
    "mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
    "resnet50_fpn": fasterrcnn_resnet50_fpn,
}


def _realistic(model: torch.nn.Module) -> None:
    """Random weights with calibrated batch-norm and spread class scores: the model then produces a
    realistic number of proposals and detections (random init alone gives degenerate outputs)."""
    generator = torch.Generator().manual_seed(0)
    model.backbone.train()
    with torch.no_grad():
        for _ in range(2):
            model.backbone(torch.rand(2, 3, 160, 160, generator=generator))
        model.rpn.head.cls_logits.weight.normal_(0, 1.0, generator=generator)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5, generator=generator)
        model.roi_heads.box_predictor.cls_score.bias[1:6] = 3.0  # a few frequent classes
    model.eval()


def run(batch: int, height: int, width: int, repeats: int, presets: list[str]) -> dict:
    torch.manual_seed(0)
    images = [torch.rand(3, height, width) for _ in range(batch)]
    figures = {}
    for preset in presets:
        reference = REFERENCES[preset](weights=None, weights_backbone=None, num_classes=91)
        _realistic(reference)
        ours = build_detector(preset, 91).eval()
        ours.load_state_dict(reference.state_dict())
        ours_cl = build_detector(preset, 91).eval().to(memory_format=torch.channels_last)
        ours_cl.load_state_dict(reference.state_dict())
        candidates = {"torchvision": reference, "ours": ours, "ours_channels_last": ours_cl}
        times: dict[str, list[float]] = {name: [] for name in candidates}
        with torch.inference_mode():
            for model in candidates.values():  # warm-up
                model(images[:2])
            for _ in range(repeats):
                for name, model in candidates.items():
                    times[name].append(timed(lambda m=model: m(images)))
            detections = sum(len(d["boxes"]) for d in ours(images))
        per_second = {name: batch / median(t) for name, t in times.items()}
        figures[preset] = {
            "images_per_s": per_second,
            "seconds_per_batch": times,
            "ratio_ours_vs_torchvision": per_second["ours"] / per_second["torchvision"],
            "ratio_ours_channels_last_vs_torchvision": per_second["ours_channels_last"] / per_second["torchvision"],
            "detections_in_batch": detections,
        }
        print(
            preset,
            {k: round(v, 3) for k, v in per_second.items()},
            "ratio",
            round(figures[preset]["ratio_ours_vs_torchvision"], 3),
        )
    return figures


def ours_only(preset: str, batch: int, height: int, width: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_detector(preset, 21).eval()
    images = [torch.rand(3, height, width) for _ in range(batch)]
    with torch.inference_mode():
        model(images[:1])
        seconds = [timed(lambda: model(images)) for _ in range(repeats)]
    result = {
        "images_per_s": batch / median(seconds),
        "seconds_per_batch": seconds,
        "batch": batch,
        "input": [height, width],
        "resized_to_min_size": model.config.min_size,
    }
    print(preset, round(result["images_per_s"], 3), "images/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, mobilenet only (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    repeats = args.repeats or (1 if args.quick else 3)
    presets = ["mobilenet_v3_large_320_fpn"] if args.quick else ["mobilenet_v3_large_320_fpn", "resnet50_fpn"]
    result = {
        "setting": {"device": "cpu", "batch": 8, "input": [480, 640], "repeats": repeats, "mode": "inference_mode"},
        "versus_torchvision": run(8, 480, 640, repeats, presets),
        "ours_only": {
            "tiny": ours_only("tiny", 8, 128, 128, max(repeats, 3)),
            "vgg16_paper": ours_only("vgg16_paper", 1, 480, 640, 1 if args.quick else 2),
        },
    }
    write_result("detector_quick" if args.quick else "detector", result)


if __name__ == "__main__":
    main()
