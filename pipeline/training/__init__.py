"""Distributed training on Ray Train: DDP over N workers (gloo on CPU, NCCL on GPU), each streaming
its own share of the dataset, checkpoints in object storage, automatic restore after a lost worker,
and ``resume`` of an interrupted run.

One :class:`~pipeline.jobs.TrainSpec` describes the job. The driver (:func:`train`) checks it
(:func:`preflight`), connects to the cluster, derives a small :class:`TrainPlan` (class count and
names, GPU or not) and hands both, unchanged, to every Ray Train worker; workers read and write
storage only with ``spec.storage``.

Modules, one concept each:

- ``stream``: the input stream — which images each worker sees in each epoch, in which batches;
- ``schedule``: the learning-rate schedule; ``step``: the optimiser and one optimisation step;
- ``checkpoints``: training checkpoints in ``MODEL_OUT/checkpoints/`` and restoring from them;
- ``validation``: COCO AP of the model on the validation dataset, during training;
- ``metrics``: ``MODEL_OUT/metrics.jsonl``; ``plots``: ``loss_curves.png``;
- ``progress``: records from rank 0 to the driver's log, and where each worker runs;
- ``loop``: what each Ray Train worker runs; ``driver``: :func:`preflight` and :func:`train`.

The final model is ``MODEL_OUT/model.pt``, a detector checkpoint for ``detectflow infer``.
"""

from __future__ import annotations

from .checkpoints import checkpoint_uris, latest_checkpoint
from .driver import TrainSummary, preflight, train
from .plan import TrainPlan
from .plots import loss_curves_png
from .progress import format_progress
from .schedule import lr_factor
from .stream import epoch_chunk, steps_per_epoch
from .validation import validation_metrics

__all__ = [
    "TrainPlan",
    "TrainSummary",
    "checkpoint_uris",
    "epoch_chunk",
    "format_progress",
    "latest_checkpoint",
    "loss_curves_png",
    "lr_factor",
    "preflight",
    "steps_per_epoch",
    "train",
    "validation_metrics",
]
