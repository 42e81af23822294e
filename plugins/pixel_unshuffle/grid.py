"""Pure tensor code: fold r x r windows of a batch of patch grids into the channel dimension."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unshuffled_size(height: int, width: int, ratio: int) -> tuple[int, int]:
    """Output grid: a partial window at the edge (zero-padded) still gives a cell."""
    return math.ceil(height / ratio), math.ceil(width / ratio)


def unshuffle(grid: torch.Tensor, ratio: int) -> torch.Tensor:
    """(I, h, w, C) -> (I, ceil(h/r), ceil(w/r), r*r*C); window cells in raster order, channels last.

    ``out[i, y, x] = concat(grid[i, r*y + dy, r*x + dx] for dy in range(r) for dx in range(r))``.
    """
    images, height, width, channels = grid.shape
    out_height, out_width = unshuffled_size(height, width, ratio)
    padded = F.pad(grid, (0, 0, 0, out_width * ratio - width, 0, out_height * ratio - height))
    windows = padded.reshape(images, out_height, ratio, out_width, ratio, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(images, out_height, out_width, ratio * ratio * channels)
