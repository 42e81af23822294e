"""Pure tensor code: pool or resize a batch of patch grids, and where each input cell went."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pooled_size(height: int, width: int, kernel: int) -> tuple[int, int]:
    """Output grid of a stride-``kernel`` pooling (a partial window at the edge still gives a cell)."""
    return math.ceil(height / kernel), math.ceil(width / kernel)


def pool_grid(grid: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Pool (I, h, w, D) features with a ``kernel`` x ``kernel`` window and the same stride.

    ``mode`` is ``avg``, ``max`` or ``bilinear`` (resize to the pooled size, corners not aligned).
    """
    channels_first = grid.permute(0, 3, 1, 2)
    height, width = grid.shape[1:3]
    if mode == "avg":
        out = F.avg_pool2d(channels_first, kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
    elif mode == "max":
        out = F.max_pool2d(channels_first, kernel, stride=kernel, ceil_mode=True)
    elif mode == "bilinear":
        out = F.interpolate(channels_first, size=pooled_size(height, width, kernel), mode="bilinear",
                            align_corners=False, antialias=False)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return out.permute(0, 2, 3, 1)
