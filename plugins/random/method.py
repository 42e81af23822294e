"""Keep ``keep_ratio`` of the visual tokens at random, reproducibly.

The draw for an image depends on ``seed``, on the prompt (its token ids) and on the image's place in
that prompt - never on the batch it runs in - so a sample gives the same result alone or batched.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tokenpress import (
    DecoderContext,
    Keep,
    Method,
    SelectingConfig,
    StageContext,
    TokenState,
    hookimpl,
    keep_count,
)
from tokenpress.core.select import seeded_uniform, topk_mask
from tokenpress.core.tokens import keep_counts_on_host


class RandomConfig(SelectingConfig):
    """Parameters of ``random``."""

    seed: int = Field(0, ge=0, description="Seed of the draw.")


class RandomKeep(Method):
    """Keep a random subset of each image's visual tokens."""

    name = "random"
    Config = RandomConfig
    points = ("post_encoder", "projector", "query_conditioned", "decoder_layer")
    description = "Keep a seeded random keep_ratio of the visual tokens (baseline)."
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.5, "seed": 1}
    config: RandomConfig

    def _select(self, tokens: TokenState, context: StageContext) -> TokenState:
        slots = tokens.num_slots
        device = tokens.embeddings.device
        scores = torch.stack([
            seeded_uniform(context.random_key(i, self.config.seed), slots, device)
            for i in range(tokens.num_images)
        ]) if tokens.num_images else tokens.embeddings.new_zeros(0, slots)
        counts = keep_counts_on_host(tokens.counts_on_host(), self.config.keep_ratio)
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(counts, device=device)), counts=counts)

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._select(tokens, context)

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._select(context.project(tokens), context)

    @hookimpl
    def query_conditioned(self, tokens: TokenState, context: StageContext) -> TokenState:
        return self._select(tokens, context)

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep:
        sequence = context.sequence
        width = sequence.slot_count
        scores = torch.stack([
            seeded_uniform(context.random_key(b, self.config.seed), width, sequence.hidden.device)
            for b in range(sequence.batch_size)
        ])
        # draw by the slot's identity (its layer-0 slot), which is the same alone or batched
        scores = torch.gather(scores, 1, sequence.slot_id)
        counts = keep_count(context.visual_counts(), self.config.keep_ratio).to(scores.device)
        return Keep(topk_mask(scores, context.is_visual, counts))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)
