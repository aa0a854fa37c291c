"""What the driver derives from the job and the cluster, for the workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainPlan:
    """``num_classes`` counts the background (``spec.num_classes`` or the dataset's);
    ``class_names[label]`` (``[0]`` is ``"__background__"``; labels the dataset lacks are named
    ``classN``); ``use_gpu``: every worker has a GPU."""

    num_classes: int
    class_names: tuple[str, ...]
    use_gpu: bool
