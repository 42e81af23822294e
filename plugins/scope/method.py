"""The ``scope`` stage: keep the patches chosen greedily by saliency (class-token attention) times the
coverage they add (facility location on the cosine similarity of the encoder's features) - SCOPE, right
after the encoder."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tokenpress import Method, MethodConfig, Ratio, StageContext, TokenState, hookimpl, keep_count
from tokenpress.core.errors import CompressionError
from tokenpress.core.signals import ClsAttention
from tokenpress.core.tokens import keep_counts_on_host
from tokenpress_plugins.scope.greedy import pairwise_scores, select_rows, selection_flops


class ScopeConfig(MethodConfig):
    """Parameters of ``scope``: a count (``tokens``) or ``keep_ratio``, exactly one of the two."""

    tokens: int | None = Field(None, ge=1, description="Visual tokens kept per image row (released: 64, 128, 192 "
                                                       "on LLaVA-1.5).")
    keep_ratio: Ratio | None = Field(None, gt=0.0, le=1.0, description="Instead of tokens: the share of each "
                                                                       "row's patches kept.")
    alpha: float = Field(1.0, ge=0.0, description="Saliency exponent: a patch's weight is its class-token "
                                                  "attention (summed over heads) to this power (released "
                                                  "ALPHA, default 1.0; 0: coverage alone).")
    combine: Literal["multiply", "add"] = Field("multiply", description="How saliency and coverage gain combine: "
                                                                        "gain x weight (released default) or "
                                                                        "gain + weight (released COMBINED=add).")
    layer: int = Field(-2, description="Encoder layer whose class-token attention is read (released: the one "
                                       "whose output LLaVA uses as features).")

    @model_validator(mode="after")
    def _one_budget(self) -> ScopeConfig:
        if (self.tokens is None) == (self.keep_ratio is None):
            raise ValueError("give either tokens (kept per image row, e.g. 64) or keep_ratio, exactly one")
        return self


class Scope(Method):
    """SCOPE (Deng et al., NeurIPS 2025): saliency-coverage greedy selection, training-free, after the encoder."""

    name = "scope"
    Config = ScopeConfig
    points = ("post_encoder",)
    description = ("Keep patches chosen greedily by CLS attention times the feature-similarity coverage they "
                   "add (SCOPE).")
    approach = "attention"
    paper = "Deng et al., NeurIPS 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: ScopeConfig

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    def kept(self, patches: int) -> int:
        """Tokens a row of ``patches`` patches keeps: ``tokens`` or ``keep_ratio``'s count, at most the row."""
        if self.config.keep_ratio is not None:
            return min(patches, keep_counts_on_host([patches], self.config.keep_ratio)[0])
        return min(patches, self.config.tokens)

    def _request(self) -> ClsAttention:
        # an encoder without a class token serves the attention each patch receives instead
        return ClsAttention(layer=self.config.layer, heads="mean", class_free="received")

    def required_signals(self) -> list[Any]:
        return [self._request()]

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        if not tokens.is_dense():
            raise CompressionError(f"{context.stage.label()}: scope reads the encoder's own patches; put it first, "
                                   "before any stage that drops or merges tokens")
        patches = tokens.counts_on_host()
        kept = [self.kept(count) for count in patches]
        if kept == patches:
            return tokens
        # the released weight is the attention summed over heads: the signal's head mean times the heads
        attention = context.signals[self._request()] * context.adapter.encoder_heads()
        mask = select_rows(attention, tokens.embeddings, patches, kept, self.config.alpha, self.config.combine)
        return tokens.keep(mask, counts=kept)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        tokens_in = torch.as_tensor(tokens_in)
        if self.config.keep_ratio is not None:
            return torch.minimum(keep_count(tokens_in, self.config.keep_ratio), tokens_in)
        return tokens_in.clamp_max(self.config.tokens)

    def pairwise_scores(self, tokens_in: int) -> int:
        """The similarity every greedy step reads whole: N x N per row, held for the K steps."""
        return pairwise_scores(tokens_in, self.kept(tokens_in))

    def stage_flops(self, shape: Any) -> float:
        """The similarity of every patch to every patch (a matmul over the encoder width); the greedy steps
        are element-wise. Nothing when the row keeps all its patches."""
        return selection_flops(shape.tokens_in, self.kept(shape.tokens_in), shape.width_in)
