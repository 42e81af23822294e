"""The ``divprune`` stage: keep the most diverse ``keep_ratio`` of each image row's visual tokens - greedy
max-min diversity (farthest point) on their cosine distance - after the projector (the released code's
place, the default) or right after the encoder."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenpress import (
    Method,
    Ratio,
    SelectingConfig,
    StageContext,
    TokenState,
    hookimpl,
    keep_count,
    keep_counts_on_host,
)
from tokenpress.core.tokens import pack_index
from tokenpress_plugins.divprune.diversity import DEFAULT_CHUNK, select_mask, selection_flops

#: The released code's ratio (``run_Divprune.sh``; the paper's 56 of LLaVA-1.5's 576 tokens).
PUBLISHED_RATIO = 0.098


class DivPruneConfig(SelectingConfig):
    """Parameters of ``divprune``."""

    keep_ratio: Ratio = Field(PUBLISHED_RATIO, gt=0.0, le=1.0, description=(
        "Fraction of each image row's visual tokens kept, in (0, 1]: round(keep_ratio x N), at least one. Default "
        "0.098, the released setting (56 of LLaVA-1.5's 576)."))
    chunk: int = Field(DEFAULT_CHUNK, ge=1, description=(
        "Tokens whose nearest neighbour is found at once in the first pick's all-pairs pass (chunk x N distances "
        "alive, never N x N); the result does not depend on it."))


class DivPrune(Method):
    """DivPrune (Alvar et al., CVPR 2025): max-min diversity selection of the visual tokens, training-free."""

    name = "divprune"
    Config = DivPruneConfig
    points = ("projector", "post_encoder")
    description = "Keep the keep_ratio of visual tokens that are most diverse (greedy max-min cosine distance)."
    approach = "similarity"
    paper = "Alvar et al., CVPR 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: DivPruneConfig

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        """On the projected tokens (the LLM's input space), as the released code. Each row keeps
        round(keep_ratio x N) of the N tokens the stage receives - the promise - or all the projector gives
        when that is fewer (a projector that resizes a grid: LLaVA-OneVision's anyres_max)."""
        counts = tokens.counts_on_host()
        kept = keep_counts_on_host(counts, self.config.keep_ratio)
        if kept == counts:
            return tokens  # nothing to drop: the model's projector runs after the stage as usual
        projected = context.project(tokens)
        return self._select(projected, [min(keep, count) for keep, count in zip(
            kept, projected.counts_on_host(), strict=True)])

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        """On the encoder's features, before the projector."""
        return self._select(tokens, keep_counts_on_host(tokens.counts_on_host(), self.config.keep_ratio))

    def _select(self, tokens: TokenState, kept: list[int]) -> TokenState:
        """Row r keeps ``kept[r]`` tokens (at most all it holds). Rows are selected in groups of equal real
        counts, each packed without padding, so no row does work for another's padding."""
        counts = tokens.counts_on_host()
        if kept == counts:
            return tokens
        device = tokens.valid.device
        mask = tokens.valid.clone()
        groups: dict[tuple[int, int], list[int]] = {}
        for row, (count, keep) in enumerate(zip(counts, kept, strict=True)):
            if keep < count:
                groups.setdefault((count, keep), []).append(row)
        for (count, keep), rows in groups.items():
            index_rows = torch.tensor(rows, device=device)
            index, _ = pack_index(tokens.valid[index_rows], width=count)  # every picked slot is real
            packed = torch.gather(tokens.embeddings[index_rows], 1,
                                  index.unsqueeze(-1).expand(-1, -1, tokens.embeddings.shape[-1]))
            chosen = select_mask(packed, torch.ones_like(index, dtype=torch.bool),
                                 torch.full((len(rows),), keep, device=device), keep, self.config.chunk)
            mask[index_rows] = torch.zeros_like(mask[index_rows]).scatter_(1, index, chosen)
        return tokens.keep(mask, counts=kept)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)

    def stage_flops(self, shape: Any) -> float:
        """The nearest-neighbour pass (``2·N²·D``) and one column of distances per pick but the last
        (``2·N·D`` each), ``D`` the width the stage selects in: the LLM's at ``projector`` (after the
        model's projector, which the model is charged for anyway), the incoming tokens' at ``post_encoder``.
        Nothing when a row keeps all its tokens."""
        width = shape.llm_width if shape.point == "projector" else shape.width_in
        return selection_flops(shape.tokens_in, shape.tokens_out, width)
