"""Does the model wait for its input? The training input pipeline against pre-decoded batches, A/B
interleaved in one run: one training worker in this process (the in-process equivalent of one Ray
Train worker, which gets both torch threads of this 2-core machine), tiny preset, batch 8, generated
128 px images, the recipe's optimiser; the same step function as ``pipeline.training.loop``.

- ``end_to_end``: batches read, decoded, given their targets and flipped ahead of the step by the
  loader (``--loader-workers`` processes, as the training loop runs it); a step is timed from
  asking for its batch to the updated weights. Every block starts a fresh loader, whose start-up
  (processes, first shard read, first batch) is counted;
- ``in_process``: the same stream decoded in the step's process, between steps (``loader_workers=0``);
- ``pre_decoded``: batches of the same stream decoded before the clock starts: the step alone.

Blocks of ``--block`` steps rotate through the three modes for ``--rounds`` rounds. Target: the
end-to-end step within 10 % of the pre-decoded one.

    .venv/bin/python bench/train_input.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _common import write_result  # noqa: E402

from detector import build_detector  # noqa: E402
from detector.synthetic import CATEGORIES  # noqa: E402
from pipeline.ingest import ingest_synthetic  # noqa: E402
from pipeline.jobs import TrainSpec  # noqa: E402
from pipeline.training.step import build_optimiser, train_step  # noqa: E402
from pipeline.training.stream import RunBatches, StreamSettings, batch_loader, steps_per_epoch  # noqa: E402

MODES = ("end_to_end", "in_process", "pre_decoded")


class Trainer:
    """The model, its optimiser and the stream, stepping as the training loop steps."""

    def __init__(self, spec: TrainSpec, dataset, total: int):
        torch.manual_seed(0)
        self.model = build_detector("tiny", len(CATEGORIES) + 1).train()
        self.per_epoch = steps_per_epoch(dataset, 1, spec.batch_size)
        self.optimiser = build_optimiser(self.model, spec, 1, total, self.per_epoch)
        self.settings = StreamSettings(spec.batch_size, spec.seed, spec.hflip, None)
        self.dataset, self.spec, self.step = dataset, spec, 0

    def run_step(self, images, targets) -> float:
        record = train_step(
            self.model, self.optimiser, images, targets, device=torch.device("cpu"), clip_grad_norm=None, amp=False
        )
        self.step += 1
        return len(images) / record["images_per_s"]

    def streamed(self, steps: int, loader_workers: int) -> tuple[list[float], list[float], list[float]]:
        """Seconds per step with the wait for input, of the step alone, and of the wait, over
        ``steps`` steps."""
        run = RunBatches(self.dataset, self.settings, rank=0, world=1, start=self.step, stop=self.step + steps)
        whole, alone, waits = [], [], []
        waiting = time.perf_counter()
        for _epoch, (_ids, images, targets) in batch_loader(run, workers=loader_workers, pin_memory=False):
            waits.append(time.perf_counter() - waiting)
            alone.append(self.run_step(images, targets))
            whole.append(waits[-1] + alone[-1])
            waiting = time.perf_counter()
        return whole, alone, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=24, help="steps per block")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--loader-workers", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.block, args.images = 1, 6, 128
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-input-"))
    try:
        dataset = ingest_synthetic(f"file://{work}/train", num_images=args.images, image_size=128, shard_size=256)
        spec = TrainSpec(dataset.uri, f"file://{work}/model", preset="tiny", workers=1, batch_size=8)
        trainer = Trainer(spec, dataset, total=args.rounds * args.block * len(MODES))
        decoded = RunBatches(dataset, trainer.settings, rank=0, world=1, start=0, stop=trainer.per_epoch)
        pre_decoded = [batch for _, batch in decoded]
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        step_alone: dict[str, list[float]] = {mode: [] for mode in MODES}
        input_wait: dict[str, list[float]] = {mode: [] for mode in MODES[:2]}
        for _ in range(args.rounds):
            for mode in MODES:
                if mode == "pre_decoded":
                    for _ in range(args.block):
                        _ids, images, targets = pre_decoded[trainer.step % len(pre_decoded)]
                        step_alone[mode].append(trainer.run_step(images, targets))
                    seconds[mode] += step_alone[mode][-args.block :]
                    continue
                workers = args.loader_workers if mode == "end_to_end" else 0
                whole, alone, waits = trainer.streamed(args.block, workers)
                seconds[mode] += whole
                step_alone[mode] += alone
                input_wait[mode] += waits
            print({mode: round(statistics.mean(values), 4) for mode, values in seconds.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = _result(args, seconds, step_alone, input_wait)
    write_result("train_input_quick" if args.quick else "train_input", result)


def _result(args: argparse.Namespace, seconds: dict, step_alone: dict, input_wait: dict) -> dict:
    mean = {mode: statistics.mean(values) for mode, values in seconds.items()}
    images_per_s = {mode: 8 / value for mode, value in mean.items()}
    return {
        "setting": {
            "preset": "tiny",
            "batch_size": 8,
            "image_size": 128,
            "images": args.images,
            "torch_threads": 2,
            "loader_workers": args.loader_workers,
            "steps_per_mode": len(seconds["pre_decoded"]),
            "rounds": args.rounds,
            "block": args.block,
        },
        "seconds_per_step": mean,
        "end_to_end_images_per_s": images_per_s,
        "step_alone_images_per_s": {mode: 8 / statistics.mean(values) for mode, values in step_alone.items()},
        "end_to_end_vs_pre_decoded": mean["end_to_end"] / mean["pre_decoded"],
        "in_process_vs_pre_decoded": mean["in_process"] / mean["pre_decoded"],
        # robust to other load on the machine: the share of a step spent waiting for its batch
        "input_wait_s": {mode: statistics.mean(values) for mode, values in input_wait.items()},
        "input_wait_fraction": {mode: sum(input_wait[mode]) / sum(seconds[mode]) for mode in input_wait},
        "target": "end_to_end_vs_pre_decoded ≤ 1.10",
        "seconds_per_step_runs": seconds,
    }


if __name__ == "__main__":
    main()
