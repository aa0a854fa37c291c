"""``loss_curves.png``: the loss terms over the steps of a run."""

from __future__ import annotations

import io
from typing import Any

LOSSES = ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def loss_curves_png(metrics: list[dict[str, Any]]) -> bytes:
    """A PNG of the total loss and its terms (log scale) from the records of ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for key in LOSSES:
        axis.plot(steps, [m[key] for m in metrics], label=key, linewidth=2 if key == "loss" else 1)
    axis.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
