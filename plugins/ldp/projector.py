"""The LDP module as pure tensor code (no model knowledge): grids (G, h, w, C) in, (G, h', w', D) out."""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseBlock(nn.Module):
    """``x + pointwise(hardswish(norm(depthwise(x))))``: a 3x3 depthwise convolution (stride 1) and a
    pointwise layer, residual; the pointwise layer starts at zero, so the block starts as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.pointwise = nn.Linear(width, width)
        nn.init.zeros_(self.pointwise.weight)
        nn.init.zeros_(self.pointwise.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        mixed = self.depthwise(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return grid + self.pointwise(nn.functional.hardswish(self.norm(mixed)))


class Downsample(nn.Module):
    """A 3x3 depthwise convolution with stride ``stride`` (padding 1), then a residual pointwise
    layer. It starts as ``stride`` x ``stride`` average pooling: the kernel weighs the window's cells
    alike and the pointwise layer starts at zero."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(width, width, 2 * stride - 1 if stride > 1 else 3, stride=stride,
                                   padding=stride - 1 if stride > 1 else 1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.pointwise = nn.Linear(width, width)
        with torch.no_grad():
            kernel = torch.zeros_like(self.depthwise.weight)
            offset = stride - 1  # the window (stride*y .. stride*y + stride - 1) in kernel coordinates
            kernel[:, :, offset:offset + stride, offset:offset + stride] = 1.0 / stride ** 2
            self.depthwise.weight.copy_(kernel)
            self.depthwise.bias.zero_()
        nn.init.zeros_(self.pointwise.weight)
        nn.init.zeros_(self.pointwise.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        height, width = grid.shape[1:3]
        pad_h, pad_w = (-height) % self.stride, (-width) % self.stride  # a partial window at the edge is a cell
        channels_first = nn.functional.pad(grid.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h))
        down = self.depthwise(channels_first).permute(0, 2, 3, 1)
        return down + self.pointwise(nn.functional.hardswish(self.norm(down)))


class LDPModule(nn.Module):
    """Pointwise MLP (encoder width -> LLM width), a stride-1 depthwise block, a strided downsample."""

    def __init__(self, mlp: nn.Sequential, width: int, stride: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.mix = DepthwiseBlock(width)
        self.down = Downsample(width, stride)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.down(self.mix(self.mlp(grid)))
