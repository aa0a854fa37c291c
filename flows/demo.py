"""``make demo``: the detector end to end on this machine, no server and no cloud.

Generates synthetic shapes, trains the ``tiny`` preset in-process for a fixed number of steps,
evaluates COCO mAP on held-out images, writes a checkpoint and a PNG of detections, and prints where
everything is.

    python -m flows.demo [--out demo-output] [--steps 900]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from detector import build_detector, load_checkpoint, save_checkpoint
from detector.synthetic import CATEGORIES, make_image
from pipeline.evaluate import ImageDT, ImageGT, coco_metrics

CLASS_NAMES = ["__background__", *CATEGORIES]
COLOURS = {1: "red", 2: "yellow", 3: "cyan"}


def train(steps: int, batch_size: int, size: int, lr: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector("tiny", len(CLASS_NAMES), class_names=CLASS_NAMES).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        scale = (0.1 + 0.9 * step / warmup) if step < warmup else 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        samples = [make_image(0, (step - 1) * batch_size + i, size) for i in range(batch_size)]
        losses = model(
            [s.image.float() / 255 for s in samples], [{"boxes": s.boxes, "labels": s.labels} for s in samples]
        )
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            rate = step * batch_size / (time.perf_counter() - start)
            print(f"  step {step}/{steps}  loss {total.item():.3f}  ({rate:.0f} images/s)", flush=True)
    return model.eval()


def evaluate(model: torch.nn.Module, num_images: int, size: int) -> tuple[dict, list]:
    gt, dt, shown = [], [], []
    with torch.inference_mode():
        for start in range(0, num_images, 16):
            samples = [make_image(1, i, size) for i in range(start, min(num_images, start + 16))]
            outputs = model([s.image.float() / 255 for s in samples])
            for i, (sample, out) in enumerate(zip(samples, outputs)):
                gt.append(ImageGT(str(start + i), size, size, sample.boxes.numpy(), sample.labels.numpy()))
                dt.append(ImageDT(str(start + i), out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()))
                if len(shown) < 8:
                    shown.append((sample.image, out))
    return coco_metrics(gt, dt, CLASS_NAMES), shown


def draw(shown: list, path: Path, threshold: float = 0.5) -> None:
    tiles = []
    for image, out in shown:
        keep = out["scores"] >= threshold
        labels = [
            f"{CLASS_NAMES[int(lab)]} {score:.2f}" for lab, score in zip(out["labels"][keep], out["scores"][keep])
        ]
        colours = [COLOURS.get(int(lab), "white") for lab in out["labels"][keep]]
        if not keep.any():
            tiles.append(image)
            continue
        tiles.append(draw_bounding_boxes(image, out["boxes"][keep], labels=labels, colors=colours, width=2))
    write_png(make_grid(tiles, nrow=4, padding=4), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    print(f"1/3  training the 'tiny' Faster R-CNN on generated shapes ({args.steps} steps of {args.batch_size})")
    model = train(args.steps, args.batch_size, args.image_size, lr=0.02)
    checkpoint = args.out / "model.pt"
    save_checkpoint(model, checkpoint)
    model = load_checkpoint(checkpoint).eval()  # what users get: the checkpoint, loaded safely

    print(f"2/3  evaluating on {args.eval_images} held-out images")
    metrics, shown = evaluate(model, args.eval_images, args.image_size)
    png = args.out / "detections.png"
    print("3/3  drawing detections")
    draw(shown, png)

    print()
    print(
        f"mAP@[.5:.95] {metrics['AP']:.3f}   mAP@0.5 {metrics['AP50']:.3f}   "
        f"({metrics['num_images']} images, {metrics['num_gt_boxes']} boxes)"
    )
    for row in metrics["per_class"]:
        print(f"  {row['name']:<10} AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}")
    print(f"\ncheckpoint  {checkpoint}\ndetections  {png}\ntime        {time.perf_counter() - began:.0f} s")
    print(
        f"\nnext: detectflow synth data/shapes --images 64 && "
        f"detectflow infer data/shapes out/shapes --model {checkpoint} && "
        f'detectflow query out/shapes "SELECT label_name, count(*) FROM detections GROUP BY 1"'
    )


if __name__ == "__main__":
    main()
