"""The ``qformer`` stage (at ``projector``): ``queries`` learned queries read every image's visual
tokens by cross-attention (BLIP-2's Q-Former) and become that many summary tokens, projected to the
LLM's width; it replaces the model's projector. ``tokenpress fit`` trains it; unfitted it pools the
image into ``queries`` soft regions and applies a copy of the model's projector."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tokenpress import Method, StageContext, TokenState, WeightedConfig, hookimpl
from tokenpress.core.errors import InputError
from tokenpress.core.flops import StageShape
from tokenpress.core.weights import starting_projector
from tokenpress_plugins.qformer.module import QFormerModule


class QFormerConfig(WeightedConfig):
    """Parameters of ``qformer``."""

    queries: int = Field(32, ge=1, le=1024, description="Learned queries: the tokens every image (tile row) becomes.")
    heads: int = Field(4, ge=1, le=64, description="Heads of the query blocks (must divide the encoder width).")
    layers: int = Field(2, ge=1, le=12, description="Query blocks (cross-attention + MLP).")
    seed: int = Field(0, description="Seed of the initial projector where the model's projector is not an MLP.")


class QFormer(Method):
    """N learned queries distil the visual tokens by cross-attention (BLIP-2's Q-Former)."""

    name = "qformer"
    Config = QFormerConfig
    points = ("projector",)
    description = "Learned queries read the image by cross-attention and replace its tokens (BLIP-2's Q-Former)."
    approach = "query"
    paper = "Li et al., BLIP-2, ICML 2023"
    year = 2023
    identity_params = None
    example_params = {"queries": 8}

    @classmethod
    def params_for_tokens(cls, tokens: int, keep_ratio: float) -> dict[str, Any]:
        """As many queries as ``keep_ratio`` of the image's tokens."""
        return {"queries": max(1, round(tokens * keep_ratio))}
    replaces_projector = True
    summary_tokens = True
    config: QFormerConfig

    def setup(self, adapter: Any) -> None:
        width = adapter.encoder_width()
        if width % self.config.heads:
            raise InputError(f"params.heads: {self.config.heads} does not divide the encoder width {width}")

    def build_weights(self, adapter: Any) -> nn.Module:
        head = starting_projector(adapter, self.config.seed)
        with torch.random.fork_rng():  # the key projections' default init, reproducible, global RNG untouched
            torch.manual_seed(self.config.seed)
            config = self.config
            return QFormerModule(head, adapter.encoder_width(), config.queries, config.heads, config.layers)

    def weights_shaping(self) -> dict[str, Any]:
        return {"queries": self.config.queries, "heads": self.config.heads, "layers": self.config.layers}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        context.require_encoder_space(tokens)
        assert self.weights is not None
        out = self.weights(tokens.embeddings, tokens.valid, tokens.cell_centres())
        return tokens.summarize(out, space="llm")

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        return torch.full_like(tokens_in, self.config.queries)

    def stage_flops(self, shape: StageShape) -> float:
        """Per block: key/value projections of the tokens, query/output projections and the MLP of the
        queries, and queries x tokens logits and reads; then the projector on the queries."""
        tokens, queries, width = shape.tokens_in, shape.tokens_out, shape.encoder_width
        block = 4.0 * tokens * width ** 2 + 12.0 * queries * width ** 2 + 4.0 * queries * tokens * width
        hidden = shape.projector_hidden or shape.llm_width
        head = 2.0 * queries * (width * hidden + hidden * shape.llm_width)
        return self.config.layers * block + head
