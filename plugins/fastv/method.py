"""FastV's stage: score visual tokens with the flash-safe scorer, keep the top ``keep_ratio``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tokenpress import DecoderContext, Keep, Method, MethodConfig, SelectingConfig, hookimpl, keep_count, scaled_layer
from tokenpress.core.flops import scorer_flops
from tokenpress.core.select import topk_mask

#: The paper's K: tokens are dropped before layer 2 of LLaVA-1.5-7B's 32.
PUBLISHED_LAYER = 2
PUBLISHED_DEPTH = 32


class FastVConfig(SelectingConfig):
    """Parameters of ``fastv`` (the stage's ``layers`` give K: tokens are dropped before layer K; a stage that
    lists none acts before the paper's K = 2 of 32 scaled to the model's depth)."""

    query: Literal["last", "text"] = Field(
        "last", description="Whose attention ranks the visual tokens: the last prompt token, or all prompt text."
    )
    score_layer: Literal["previous", "current"] = Field(
        "previous", description="Attention inside layer K-1 (as in the paper) or inside layer K."
    )


class FastV(Method):
    """Drop the least-attended visual tokens before the stage's layer(s)."""

    name = "fastv"
    Config = FastVConfig
    points = ("decoder_layer",)
    description = "Keep the top keep_ratio visual tokens by the last prompt token's attention (FastV)."
    approach = "attention"
    paper = "Chen et al., ECCV 2024"
    year = 2024
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5}
    config: FastVConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """Before layer K = round(2 x L / 32) (halves up), at least 1 (the paper scores with layer K-1's
        attention): 2 on 32 and 28 layers, 3 on 40, 1 on 12 and on the 4-layer test models."""
        if num_layers < 2:
            return ()
        return (min(max(1, scaled_layer(PUBLISHED_LAYER, PUBLISHED_DEPTH, num_layers)), num_layers - 1),)

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep:
        scores = context.scorer.attention_to_tokens(query=self.config.query, layer=self.config.score_layer)
        counts = keep_count(context.visual_counts(), self.config.keep_ratio).to(scores.device)
        return Keep(topk_mask(scores, context.is_visual, counts))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)

    def layers_problem(self) -> str | None:
        if self.config.score_layer == "previous" and 0 in self.layers:
            return ("fastv at layer 0 has no previous layer whose attention it could score with (score_layer: "
                    "previous, as in the paper); start at layer 1, or set score_layer: current")
        return None

    def scoring_flops(self, item: Any) -> float:
        """The scorer's q projection of the query row(s), k projection of the keys and the logits."""
        use_previous = self.config.score_layer == "previous" and item.layer > 0
        keys = item.previous_tokens if use_previous and item.previous_tokens is not None else item.tokens
        rows = item.text_tokens if self.config.query == "text" else 1
        return scorer_flops(item.decoder, rows, keys)
