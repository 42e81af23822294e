"""The ``cdpruner`` stage: keep the visual tokens that maximise the conditional diversity of the kept
set - a DPP whose kernel weighs the tokens' cosine similarity by their relevance to the instruction -
chosen by greedy MAP inference, once per prompt, knowing the prompt (``query_conditioned``)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenpress import Method, SelectingConfig, StageContext, TokenState, hookimpl, keep_count, keep_counts_on_host
from tokenpress_plugins.cdpruner.dpp import compute_dtype, select_mask, selection_flops, text_direction


class CDPrunerConfig(SelectingConfig):
    """Parameters of ``cdpruner``."""

    theta: float | None = Field(None, gt=0.0, lt=1.0, description=(
        "Relevance trade-off: the kernel's quality becomes exp(theta / (2 (1 - theta)) * relevance); higher "
        "favours relevance over diversity. Default (none): the relevance itself, as the published code runs."))


class CDPruner(Method):
    """CDPruner (Zhang et al., 2025): conditional-DPP token selection, training-free, knowing the prompt."""

    name = "cdpruner"
    Config = CDPrunerConfig
    points = ("query_conditioned",)
    description = "Keep the keep_ratio of visual tokens maximising a DPP of similarity weighted by prompt relevance."
    approach = "query"
    paper = "Zhang et al., NeurIPS 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: CDPrunerConfig

    @hookimpl
    def query_conditioned(self, tokens: TokenState, context: StageContext) -> TokenState:
        counts = tokens.counts_on_host()
        kept = keep_counts_on_host(counts, self.config.keep_ratio)
        if kept == counts:  # every image keeps all its tokens: nothing to choose
            return tokens
        directions = self._instruction_directions(tokens, context)
        device = tokens.valid.device
        mask = select_mask(tokens.embeddings, tokens.valid, directions, torch.tensor(kept, device=device),
                           max(kept), self.config.theta, lengths=counts)
        return tokens.keep(mask, counts=kept)

    @staticmethod
    def _instruction_directions(tokens: TokenState, context: StageContext) -> torch.Tensor:
        """(I, D) per image row: the mean unit direction of its prompt's embedded text."""
        dtype = compute_dtype(tokens.embeddings.dtype)
        by_sample: dict[int, torch.Tensor] = {}
        rows = []
        for image in range(tokens.num_images):
            sample = context.image_samples[image]
            if sample not in by_sample:
                by_sample[sample] = text_direction(context.text_embeddings(image).to(dtype))
            rows.append(by_sample[sample])
        return torch.stack(rows)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return keep_count(tokens_in, self.config.keep_ratio)

    def stage_flops(self, shape: Any) -> float:
        """The relevance (every token against the instruction) and, per pick, one Cholesky row of the
        kernel (every token against the chosen one) plus the chosen item's Gram-Schmidt: see
        :func:`~tokenpress_plugins.cdpruner.dpp.selection_flops`. Nothing when an image keeps all its tokens."""
        return selection_flops(shape.tokens_in, shape.tokens_out, shape.llm_width)
