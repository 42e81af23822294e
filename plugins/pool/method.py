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
    identity_params = {"kernel": 1}
    example_params = {"kernel": 2}
    config: PoolConfig

    def _pool(self, tokens: TokenState) -> TokenState:
        if self.config.kernel == 1:
            return tokens
        kernel, device = self.config.kernel, tokens.embeddings.device
        # Images may have different grids (Qwen2.5-VL sizes, LLaVA-NeXT tiles): pool each group of
        # equal grids in one call.
        sizes = tokens.grid_sizes()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for image, size in enumerate(sizes):
            groups.setdefault(size, []).append(image)
        out_grids = list(sizes)
        pooled_rows: dict[int, torch.Tensor] = {}
        assign = torch.full(tokens.valid.shape, -1, dtype=torch.long, device=device)
        for (frames, height, width), images in groups.items():
            grid = torch.stack([tokens.dense_grid(i) for i in images])  # (G, t, h, w, D)
            dim = grid.shape[-1]
            pooled = pool_grid(grid.reshape(-1, height, width, dim), kernel, self.config.mode)
            out_height, out_width = pooled.shape[1:3]
            pooled = pooled.reshape(len(images), frames * out_height * out_width, dim)
            per_frame = cell_assignment(height, width, kernel, device)
            frame_offset = torch.arange(frames, device=device).repeat_interleave(height * width)
            cells = per_frame.repeat(frames) + frame_offset * out_height * out_width
            for row, image in enumerate(images):
                pooled_rows[image] = pooled[row]
                assign[image, : cells.numel()] = cells
                out_grids[image] = (frames, out_height, out_width)
        width = max(row.shape[0] for row in pooled_rows.values())
        embeddings = torch.stack([
            torch.nn.functional.pad(pooled_rows[i], (0, 0, 0, width - pooled_rows[i].shape[0]))
            for i in range(tokens.num_images)
        ])
        return tokens.replace(embeddings, grid=out_grids, assign=assign)

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(tokens)

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._pool(context.project(tokens))

    @classmethod
    def params_for_keep(cls, keep_ratio: float) -> dict:
        """The square kernel closest to keeping ``keep_ratio`` (0.25 -> 2, 0.11 -> 3)."""
        return {"kernel": max(1, round(keep_ratio ** -0.5)), "mode": "avg"}

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        return None  # depends on the grid, not only the count: see expected_grid

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return pooled_size(height, width, self.config.kernel)
