"""Detector checkpoints: weights plus what is needed to rebuild the model (preset, class count,
class names, overrides). Stored as plain containers and tensors so that they load with
``torch.load(weights_only=True)``: loading a checkpoint never executes code from it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import IO, Any

import torch

from .config import PRESETS
from .model import FasterRCNN, build_detector

FORMAT = "detectflow.detector/1"
FileLike = str | os.PathLike | IO[bytes]


def save_checkpoint(model: FasterRCNN, file: FileLike, class_names: Sequence[str] | None = None) -> None:
    """Write ``model``'s weights and metadata to a path or binary file object."""
    names = list(class_names) if class_names is not None else model.class_names
    if names is not None and len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names for {model.num_classes} classes (index 0 = background)")
    payload = {
        "format": FORMAT,
        "preset": model.preset,
        "num_classes": model.num_classes,
        "class_names": names,
        "overrides": _plain(model.overrides),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, file)


def checkpoint_class_names(file: FileLike | bytes) -> list[str] | None:
    """The class names (index = label, ``[0]`` the background) a checkpoint of ours records, without
    building the model; None for a bare state dict or a checkpoint without names."""
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read a detector checkpoint from {_name(file)}: {exc}") from exc
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return payload.get("class_names")
    return None


def load_checkpoint(
    file: FileLike,
    *,
    preset: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    **overrides: Any,
) -> FasterRCNN:
    """Rebuild a detector from a checkpoint written by :func:`save_checkpoint`, or from a bare
    torchvision ``state_dict`` when ``preset`` is given (``num_classes`` is then read from the
    weights unless given). ``preset``/``num_classes`` given for one of our checkpoints must match
    it. Extra ``overrides`` (e.g. ``box_score_thresh``) apply on top of the recorded ones.
    """
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read a detector checkpoint from {_name(file)}: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{_name(file)} does not hold a checkpoint or a state dict")

    if payload.get("format") == FORMAT:
        if preset is not None and preset != payload["preset"]:
            raise ValueError(f"checkpoint {_name(file)} is of preset {payload['preset']!r}, not {preset!r}")
        if num_classes is not None and num_classes != payload["num_classes"]:
            raise ValueError(f"checkpoint {_name(file)} has {payload['num_classes']} classes, not {num_classes}")
        model = build_detector(
            payload["preset"],
            payload["num_classes"],
            class_names=payload.get("class_names"),
            **{**payload.get("overrides", {}), **overrides},
        )
        state_dict = payload["state_dict"]
    else:
        if preset is None:
            raise ValueError(f"{_name(file)} is a bare state dict: say which preset it is (one of {sorted(PRESETS)})")
        state_dict = payload.get("model", payload)  # torchvision's reference scripts nest it
        if num_classes is None:
            weight = state_dict.get("roi_heads.box_predictor.cls_score.weight")
            if weight is None:
                raise ValueError(f"{_name(file)} has no roi_heads.box_predictor.cls_score.weight: not a detector")
            num_classes = int(weight.shape[0])
        model = build_detector(preset, num_classes, **overrides)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {_name(file)} do not fit preset {model.preset!r}: {exc}") from exc
    return model


def _plain(value: Any) -> Any:
    """Overrides as JSON-like plain values (tuples become lists) for ``weights_only`` loading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _name(file: Any) -> str:
    if isinstance(file, (str, os.PathLike)):
        return repr(os.fspath(file))
    return getattr(file, "name", None) or "the given file object"
