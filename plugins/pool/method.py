"""The ``pool`` stage: shrink every image's patch grid by a factor ``kernel`` per side."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenpress import Method, MethodConfig, StageContext, TokenState, hookimpl
from tokenpress_plugins.pool.grid import cell_assignment, pool_grid, pooled_size


class PoolConfig(MethodConfig):
    """Parameters of ``pool``."""

    kernel: int = Field(2, ge=1, le=64, description="Window (and stride) per side; 1 is the identity.")
    mode: Literal["avg", "max", "bilinear"] = Field("avg", description="Average, max, or bilinear resize.")


class Pool(Method):
    """Pool the patch grid; the output is a new dense grid (positions follow the new grid)."""

    name = "pool"
    Config = PoolConfig
    points = ("post_encoder", "projector")
    description = "2-D avg/max pooling or bilinear resizing of the patch grid (kernel x kernel -> 1)."
    config: PoolConfig

    def _pool(self, tokens: TokenState) -> TokenState:
        if self.config.kernel == 1:
            return tokens
        grid = tokens.dense_grid()  # (I, t, h, w, D)
        images, frames, height, width, dim = grid.shape
        pooled = pool_grid(grid.reshape(images * frames, height, width, dim), self.config.kernel, self.config.mode)
        out_height, out_width = pooled.shape[1:3]
        embeddings = pooled.reshape(images, frames * out_height * out_width, dim)
        per_frame = cell_assignment(height, width, self.config.kernel, grid.device)
        frame_offset = torch.arange(frames, device=grid.device).repeat_interleave(height * width)
        assign = (per_frame.repeat(frames) + frame_offset * out_height * out_width).expand(images, -1)
        return tokens.replace(embeddings, grid=(frames, out_height, out_width), assign=assign)

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(tokens)

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(context.project(tokens))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        return None  # depends on the grid, not only the count: see expected_grid

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return pooled_size(height, width, self.config.kernel)
