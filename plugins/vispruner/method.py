"""The ``vispruner`` stage: keep the patches the vision encoder's class token attends to most (important
tokens) and, among the rest, the ones left after removing near-duplicates by feature similarity (diverse
tokens) - VisPruner, right after the encoder."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from tokenpress import Method, MethodConfig, Ratio, StageContext, TokenState, hookimpl, keep_count
from tokenpress.core.errors import CompressionError
from tokenpress.core.signals import ClsAttention
from tokenpress.core.tokens import keep_counts_on_host
from tokenpress_plugins.vispruner.prune import pairwise_block, select_rows, selection_flops, split_budget


class VisPrunerConfig(MethodConfig):
    """Parameters of ``vispruner``: a count (``tokens``) or ``keep_ratio``, exactly one of the two."""

    tokens: int | None = Field(None, ge=1, description="Visual tokens kept per image row (the released "
                                                       "--visual_token_num T: 64, 128, 192 on LLaVA-1.5).")
    keep_ratio: Ratio | None = Field(None, gt=0.0, le=1.0, description="Instead of tokens: the share of each "
                                                                       "row's patches kept.")
    important_ratio: Ratio = Field(0.5, ge=0.0, le=1.0, description="Share of the kept tokens chosen as "
                                                                    "important (int(T * r), by class-token "
                                                                    "attention); the rest are diverse. "
                                                                    "Published default 0.5.")
    layer: int = Field(-2, description="Encoder layer whose class-token attention is read (released: the one "
                                       "whose output LLaVA uses as features).")

    @model_validator(mode="after")
    def _one_budget(self) -> VisPrunerConfig:
        if (self.tokens is None) == (self.keep_ratio is None):
            raise ValueError("give either tokens (kept per image row, e.g. 64) or keep_ratio, exactly one")
        return self


class VisPruner(Method):
    """VisPruner (Zhang et al., ICCV 2025): important and diverse tokens, training-free, after the encoder."""

    name = "vispruner"
    Config = VisPrunerConfig
    points = ("post_encoder",)
    description = ("Keep the patches the CLS token attends to most, then diverse ones among the rest after "
                   "iterative de-duplication by feature similarity (VisPruner).")
    approach = "attention"
    paper = "Zhang et al., ICCV 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: VisPrunerConfig

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    def kept(self, patches: int) -> int:
        """Tokens a row of ``patches`` patches keeps: ``tokens`` or ``keep_ratio``'s count, at most the row."""
        if self.config.keep_ratio is not None:
            return min(patches, keep_counts_on_host([patches], self.config.keep_ratio)[0])
        return min(patches, self.config.tokens)

    def split(self, patches: int) -> tuple[int, int]:
        """(important, diverse) tokens of a row of ``patches`` patches."""
        return split_budget(self.kept(patches), self.config.important_ratio)

    def _request(self) -> ClsAttention:
        # an encoder without a class token serves the attention each patch receives (the author's rule for them)
        return ClsAttention(layer=self.config.layer, heads="mean", class_free="received")

    def required_signals(self) -> list[Any]:
        return [self._request()]

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        if not tokens.is_dense():
            raise CompressionError(f"{context.stage.label()}: vispruner reads the encoder's own patches; put it "
                                   "first, before any stage that drops or merges tokens")
        patches = tokens.counts_on_host()
        kept = [self.kept(count) for count in patches]
        if kept == patches:
            return tokens
        mask = select_rows(context.signals[self._request()], tokens.embeddings, patches, kept,
                           self.config.important_ratio)
        return tokens.keep(mask, counts=kept)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        tokens_in = torch.as_tensor(tokens_in)
        if self.config.keep_ratio is not None:
            return torch.minimum(keep_count(tokens_in, self.config.keep_ratio), tokens_in)
        return tokens_in.clamp_max(self.config.tokens)

    def pairwise_scores(self, tokens_in: int) -> int:
        """The de-duplication's bipartite block: every A patch against every B patch of a round, held at once
        (the first round's is the largest, at most N² / 4)."""
        return pairwise_block(tokens_in, self.kept(tokens_in), self.config.important_ratio)

    def stage_flops(self, shape: Any) -> float:
        """The de-duplication's similarities: per round, every A patch against every B patch (a matmul
        over the encoder width); nothing when the row keeps all its patches."""
        return selection_flops(shape.tokens_in, self.kept(shape.tokens_in), self.config.important_ratio,
                               shape.width_in)
