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
from tokenpress.errors import CompressionError, InputError
from tokenpress.weights import projector_copy
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
    identity_params = None
    example_params = {"queries": 8}
    config: QFormerConfig

    def setup(self, adapter: Any) -> None:
        width = adapter.encoder_width()
        if width % self.config.heads:
            raise InputError(f"params.heads: {self.config.heads} does not divide the encoder width {width}")

    def build_weights(self, adapter: Any) -> nn.Module:
        width, llm_width = adapter.encoder_width(), adapter.text_config.hidden_size
        projector = adapter.projector_mlp()
        if projector is not None and projector.second.out_features == llm_width:
            head = projector_copy(projector)
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            head = nn.Sequential(nn.Linear(width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
            with torch.no_grad():
                for layer in (head[0], head[2]):
                    bound = layer.in_features ** -0.5
                    layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                    layer.bias.zero_()
        with torch.random.fork_rng():  # the key projections' default init, reproducible, global RNG untouched
            torch.manual_seed(self.config.seed)
            return QFormerModule(head, width, self.config.queries, self.config.heads, self.config.layers)

    def weights_shaping(self) -> dict[str, Any]:
        return {"queries": self.config.queries, "heads": self.config.heads, "layers": self.config.layers}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        if tokens.space != "encoder":
            raise CompressionError(f"{context.stage.label()}: qformer replaces the projector and needs tokens in "
                                   "encoder space; put it before any stage that projects them")
        assert self.weights is not None
        out = self.weights(tokens.embeddings, tokens.valid, tokens.cell_centres())
        return tokens.summarize(out, space="llm")

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        return torch.full_like(tokens_in, self.config.queries)
