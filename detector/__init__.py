"""detectflow's Faster R-CNN (Ren et al. 2015), written from its parts in pure PyTorch.

Usage: ``model = build_detector("tiny", num_classes=4)``; ``save_checkpoint(model, path)``;
``load_checkpoint(path)``. ``PRESETS`` names the available configurations.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, DetectorConfig
from .model import FasterRCNN, build_detector

__all__ = ["PRESETS", "DetectorConfig", "FasterRCNN", "build_detector", "load_checkpoint", "save_checkpoint"]
