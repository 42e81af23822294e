"""The ``pool`` stage: shrink every image's patch grid by a factor ``kernel`` per side."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenpress import Method, MethodConfig, StageContext, TokenState, hookimpl
from tokenpress_plugins.pool.grid import pool_grid, pooled_size

#: The largest pooling window per side.
MAX_KERNEL = 64


class PoolConfig(MethodConfig):
    """Parameters of ``pool``."""

    kernel: int = Field(2, ge=1, le=MAX_KERNEL, description="Window (and stride) per side; 1 is the identity.")
    mode: Literal["avg", "max", "bilinear"] = Field("avg", description="Average, max, or bilinear resize.")


class Pool(Method):
    """Pool the patch grid; the output is a new dense grid (positions follow the new grid)."""

    name = "pool"
    Config = PoolConfig
    points = ("post_encoder", "projector")
    description = "2-D avg/max pooling or bilinear resizing of the patch grid (kernel x kernel -> 1)."
    approach = "transform"
    identity_params = {"kernel": 1}
    example_params = {"kernel": 2}
    config: PoolConfig

    def _pool(self, tokens: TokenState) -> TokenState:
        if self.config.kernel == 1:
            return tokens
        return tokens.regrid(lambda grid: pool_grid(grid, self.config.kernel, self.config.mode), self.config.kernel)

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(tokens)

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(context.project(tokens))

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict:
        """The square kernel closest to keeping ``keep_ratio`` (0.25 -> 2, 0.11 -> 3), at most the largest."""
        return {"kernel": min(MAX_KERNEL, max(1, round(keep_ratio ** -0.5))), "mode": "avg"}

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        return None  # depends on the grid, not only the count: see expected_grid

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return pooled_size(height, width, self.config.kernel)
