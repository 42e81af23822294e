"""The Q-Former as pure tensor code (no model knowledge): visual tokens (I, N, C) with their cell
centres (I, N, 2) in, K query outputs (I, K, D) out.

Each block lets the queries attend to the visual tokens: content logits (queries against keys) plus
a locality term, ``-sharpness * |home - centre|^2``, that ties each query to a home point of the
image. It starts as soft region pooling: the content projections start at zero, values and the
first block's output projection at the identity, the homes on a regular grid, the sharpness such
that a query reads its own region (a Gaussian half a region wide), and every later update at zero.
So the unfitted module is "pool into K regions, then the model's projector"; fitting learns what to
read.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def query_homes(count: int) -> tuple[torch.Tensor, float]:
    """Home points (count, 2) in [0, 1]^2 (row, column): cell centres of the smallest grid with
    ``round(sqrt(count))`` rows that has ``count`` cells, filled in raster order; and the initial
    sharpness, a Gaussian half a cell wide."""
    rows = max(1, round(math.sqrt(count)))
    cols = -(-count // rows)
    cells = torch.arange(count)
    homes = torch.stack([(cells // cols + 0.5) / rows, (cells % cols + 0.5) / cols], dim=-1)
    sigma = 0.5 / max(rows, cols)
    return homes, 1.0 / (2 * sigma ** 2)


class QueryBlock(nn.Module):
    """Cross-attention of the queries to the visual tokens (with the locality term), then an MLP."""

    def __init__(self, width: int, heads: int, sharpness: float, first: bool) -> None:
        super().__init__()
        self.heads = heads
        self.query_norm = nn.LayerNorm(width)
        self.key_norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.log_sharpness = nn.Parameter(torch.full((heads,), math.log(sharpness)))
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        with torch.no_grad():
            for layer in (self.query, self.mlp[3]):
                layer.weight.zero_()
                layer.bias.zero_()
            self.value.weight.copy_(torch.eye(width))
            self.value.bias.zero_()
            self.out.weight.copy_(torch.eye(width) if first else torch.zeros(width, width))
            self.out.bias.zero_()

    def forward(self, state: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor,
                homes: torch.Tensor) -> torch.Tensor:
        images, queries, width = state.shape
        head_dim = width // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (I, L, C) -> (I, H, L, C/H)
            return x.view(images, x.shape[1], self.heads, head_dim).transpose(1, 2)

        q = split(self.query(self.query_norm(state)))
        k = split(self.key(self.key_norm(tokens)))
        v = split(self.value(tokens))
        distance = (homes.unsqueeze(2) - centres.unsqueeze(1)).square().sum(-1)  # (I, K, N)
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        logits = logits - self.log_sharpness.exp().view(1, -1, 1, 1) * distance.unsqueeze(1)
        logits = logits.masked_fill(~valid.view(images, 1, 1, -1), torch.finfo(logits.dtype).min)
        read = (logits.softmax(-1) @ v).transpose(1, 2).reshape(images, queries, width)
        state = state + self.out(read)
        return state + self.mlp(state)


class QFormerModule(nn.Module):
    """Learned queries, ``layers`` query blocks, then a projector to the LLM's width."""

    def __init__(self, projector: nn.Module, width: int, queries: int, heads: int, layers: int) -> None:
        super().__init__()
        homes, sharpness = query_homes(queries)
        self.homes = nn.Parameter(homes)
        self.queries = nn.Parameter(torch.zeros(queries, width))
        self.blocks = nn.ModuleList(QueryBlock(width, heads, sharpness, index == 0) for index in range(layers))
        self.projector = projector

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """``tokens`` (I, N, C) encoder-space, ``valid`` (I, N), ``centres`` (I, N, 2) -> (I, K, D)."""
        # copies, not expanded views: a view of a parameter requires grad even under no_grad, which
        # module hooks (FlopCounterMode's tracker) refuse
        state = self.queries.to(tokens.dtype).repeat(tokens.shape[0], 1, 1)
        homes = self.homes.to(tokens.dtype).repeat(tokens.shape[0], 1, 1)
        centres = centres.to(tokens.dtype)
        for block in self.blocks:
            state = block(state, tokens, valid, centres, homes)
        return self.projector(state)
