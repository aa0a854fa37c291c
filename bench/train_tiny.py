"""The tiny preset learns: train in one process on generated shapes until mAP@0.5 ≥ 0.9 on held-out
generated images (another seed), evaluating every ``--eval-every`` steps with pycocotools.

    .venv/bin/python bench/train_tiny.py [--quick]

Records the time and steps to reach the target, training images/s and the final AP/AP50 in
bench/results/train_tiny.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import write_result  # noqa: E402

from detector import build_detector  # noqa: E402
from detector.synthetic import CATEGORIES, make_image  # noqa: E402
from pipeline.evaluate import ImageDT, ImageGT, coco_metrics  # noqa: E402

CLASS_NAMES = ["__background__", *CATEGORIES]


def evaluate(model: torch.nn.Module, num_images: int, size: int, seed: int = 1) -> dict:
    model.eval()
    gt, dt = [], []
    with torch.inference_mode():
        for start in range(0, num_images, 16):
            samples = [make_image(seed, i, size) for i in range(start, min(start + 16, num_images))]
            outputs = model([s.image.float() / 255 for s in samples])
            for i, (sample, out) in enumerate(zip(samples, outputs)):
                image_id = str(start + i)
                gt.append(ImageGT(image_id, size, size, sample.boxes.numpy(), sample.labels.numpy()))
                dt.append(ImageDT(image_id, out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()))
    model.train()
    return coco_metrics(gt, dt, CLASS_NAMES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (no target expected)")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.eval_every, args.eval_images = 60, 30, 32

    torch.manual_seed(0)
    model = build_detector("tiny", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    warmup = min(200, args.max_steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 5% over max_steps
        if step < warmup:
            return args.lr * (0.1 + 0.9 * step / warmup)
        progress = (step - warmup) / max(1, args.max_steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    history, evaluations = [], []
    reached = None
    train_seconds = 0.0
    start = time.perf_counter()
    for step in range(1, args.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        tick = time.perf_counter()
        samples = [make_image(0, (step - 1) * args.batch_size + i, args.size) for i in range(args.batch_size)]
        losses = model(
            [s.image.float() / 255 for s in samples], [{"boxes": s.boxes, "labels": s.labels} for s in samples]
        )
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - tick
        history.append(total.item())
        if step % args.eval_every == 0 or step == args.max_steps:
            metrics = evaluate(model, args.eval_images, args.size)
            elapsed = time.perf_counter() - start
            evaluations.append(
                {
                    "step": step,
                    "elapsed_s": elapsed,
                    "AP": metrics["AP"],
                    "AP50": metrics["AP50"],
                    "loss": float(np.mean(history[-50:])),
                }
            )
            print(
                f"step {step}: loss {np.mean(history[-50:]):.3f} AP {metrics['AP']:.3f} "
                f"AP50 {metrics['AP50']:.3f} ({elapsed:.0f}s)",
                flush=True,
            )
            if metrics["AP50"] >= args.target and reached is None:
                reached = {
                    "step": step,
                    "elapsed_s": elapsed,
                    "AP": metrics["AP"],
                    "AP50": metrics["AP50"],
                    "per_class": metrics["per_class"],
                }
                break
    result = {
        "setting": {k: v for k, v in vars(args).items()},
        "target_AP50": args.target,
        "reached": reached,
        "train_images_per_s": len(history) * args.batch_size / train_seconds,
        "evaluations": evaluations,
    }
    write_result("train_tiny_quick" if args.quick else "train_tiny", result)
    if reached is None and not args.quick:
        sys.exit(f"target AP50 {args.target} not reached in {args.max_steps} steps")


if __name__ == "__main__":
    main()
