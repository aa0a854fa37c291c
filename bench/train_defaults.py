"""The default recipe learns: ``detectflow train DATA OUT --preset tiny --workers 2 --epochs 10`` on
500 generated 128 px images, nothing else set (batch size, learning rate, warm-up and schedule are
the tiny preset's recipe), scored on 200 held-out generated images (another seed) every two epochs
and at the end. Target: AP50 ≥ 0.85. Also records the run's speeds: end to end (input included)
and of the step alone, per worker.

    .venv/bin/python bench/train_defaults.py [--epochs 10] [--images 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from _common import write_result  # noqa: E402

from pipeline.ingest import ingest_synthetic  # noqa: E402
from pipeline.jobs import TrainSpec  # noqa: E402
from pipeline.training import steps_per_epoch, train  # noqa: E402
from pipeline.training.metrics import load_metrics  # noqa: E402
from pipeline.training.recipe import describe_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a recipe setting of TrainSpec to try instead of the default (lr=0.06, hflip=false, "
        "lr_milestones=0.9/0.97, ...); the result goes to train_defaults-<settings>.json",
    )
    args = parser.parse_args()
    overrides = dict(_setting(item) for item in args.set)
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-defaults-"))
    try:
        data = ingest_synthetic(f"file://{work}/train", num_images=args.images, seed=0, image_size=128)
        val = ingest_synthetic(f"file://{work}/val", num_images=200, seed=1, image_size=128, shard_size=100)
        probe = TrainSpec(data.uri, "x", preset="tiny", workers=args.workers, **overrides)
        per_epoch = steps_per_epoch(data, args.workers, probe.batch_size)
        spec = TrainSpec(
            data.uri,
            f"file://{work}/model",
            preset="tiny",
            workers=args.workers,
            epochs=args.epochs,
            val_uri=val.uri,
            val_every=2 * per_epoch,
            **overrides,
        )
        print(f"recipe: {describe_recipe(spec)}", flush=True)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        started = time.perf_counter()
        summary = train(spec, progress=lambda record: print(record, flush=True))
        wall = time.perf_counter() - started
        ray.shutdown()
        metrics = load_metrics(spec.model_out_uri)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    evaluations = [
        {"step": m["step"], "epoch": m["step"] / per_epoch, "val_AP50": m["val_AP50"], "val_AP": m["val_AP"]}
        for m in metrics
        if "val_AP50" in m
    ]
    final = evaluations[-1]
    result = {
        "setting": {
            "command": f"detectflow train DATA OUT --preset tiny --workers {args.workers} --epochs {args.epochs}",
            "train_images": args.images,
            "val_images": 200,
            "image_size": 128,
            "recipe": describe_recipe(spec),
            "spec": {k: v for k, v in spec.public().items() if k not in ("storage", "cluster")},
        },
        "target_AP50": args.target,
        "final_AP50": final["val_AP50"],
        "final_AP": final["val_AP"],
        "met": final["val_AP50"] >= args.target,
        "steps": summary.steps,
        "wall_s": wall,
        "images_per_s_per_worker_step_alone": summary.images_per_s_per_worker,
        "images_per_s_per_worker_end_to_end": summary.end_to_end_images_per_s_per_worker,
        "evaluations": evaluations,
    }
    if overrides:
        result["setting"]["tried"] = args.set
    name = "train_defaults" + "".join(f"-{item.replace('/', '_')}" for item in args.set)
    write_result(name, result)


def _setting(item: str) -> tuple[str, object]:
    """``name=value`` as a TrainSpec keyword: numbers, true/false, ``a/b`` tuples of numbers."""
    name, _, text = item.partition("=")
    if text in ("true", "false"):
        return name, text == "true"
    if "/" in text or name == "lr_milestones":
        return name, tuple(float(part) for part in text.split("/") if part)
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


if __name__ == "__main__":
    main()
