"""Anchor generation: one anchor per (scale, aspect ratio) at every feature-map cell.

For a level with sizes ``S`` and aspect ratios ``R`` (``h/w``), the cell anchors are the
``|R|·|S|`` boxes of area ``s²`` and ratio ``r`` centred on the origin (ratios outer, sizes inner,
rounded to whole pixels); they are shifted by ``stride`` to every cell. Anchors of a level are
ordered cell by cell in row-major order and, within a cell, in cell-anchor order — the same order in
which the RPN head's outputs are flattened (``[N, A, H, W] → [N, H·W·A]``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``[len(ratios)·len(sizes), 4]`` anchors centred on (0, 0)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps. Holds no parameters.

    Results are cached per (feature sizes, strides, device, dtype); the cache keeps the most
    recently used ``cache_size`` entries so that memory stays bounded with varied image sizes.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        cache_size: int = 32,
    ):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError("need one tuple of aspect ratios per tuple of sizes (one per level)")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, list[Tensor]] = OrderedDict()

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(
        self,
        padded_size: tuple[int, int],
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors per level, each ``[H_l·W_l·A_l, 4]``, for a batch padded to ``padded_size``.

        The stride of level ``l`` is ``padded_size // feature_size_l`` (integer division, per axis).
        """
        if len(feature_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"anchor generator has {len(self.cell_anchors)} levels but got {len(feature_sizes)} feature maps"
            )
        strides = tuple((padded_size[0] // h, padded_size[1] // w) for h, w in feature_sizes)
        key = (tuple(map(tuple, feature_sizes)), strides, str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        anchors = [
            self._grid_anchors(base.to(device=device, dtype=dtype), size, stride)
            for base, size, stride in zip(self.cell_anchors, feature_sizes, strides)
        ]
        self._cache[key] = anchors
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return anchors

    @staticmethod
    def _grid_anchors(base: Tensor, feature_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        height, width = feature_size
        shifts_x = torch.arange(0, width, dtype=torch.int32, device=base.device) * stride[1]
        shifts_y = torch.arange(0, height, dtype=torch.int32, device=base.device) * stride[0]
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(base.dtype)
        return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
