"""The ``dart`` stage: before its decoder layer K, choose pivot tokens by the key norms of layer K-1, and
keep, for each pivot, the visual tokens that duplicate it least (cosine of the hidden states through the
LLM's final norm); drop the other visual tokens from layer K on."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tokenpress import (
    DecoderContext,
    Keep,
    Method,
    MethodConfig,
    Ratio,
    SelectingConfig,
    hookimpl,
    layer_query_key,
    scaled_layer,
)
from tokenpress_plugins.dart.duplication import duplication_flops, kept_total, key_norms, select_keep

#: The released code prunes before decoder layer 2 of LLaVA-1.5's 32 (``pruned_layer = 2``).
PUBLISHED_LAYER = 2
PUBLISHED_DEPTH = 32
#: 128 of LLaVA-1.5's 576 visual tokens: the released code's middle setting (``max_num_trunction`` 128).
PUBLISHED_RATIO = 0.222


class DARTConfig(SelectingConfig):
    """Parameters of ``dart`` (the stage's ``layers`` give K: tokens are dropped before layer K, pivots read
    layer K-1's keys; default: layer 2 of 32, scaled to the model's depth)."""

    keep_ratio: Ratio = Field(PUBLISHED_RATIO, gt=0.0, le=1.0, description=(
        "Fraction of each sample's visual tokens kept, in (0, 1]. budget 'exact': round(keep_ratio x N), image "
        "pivots included; 'released': the released code's count for M = round(keep_ratio x N). Default 0.222 "
        "(M = 128 of LLaVA-1.5's 576)."))
    image_pivots: int = Field(4, ge=1, description="Visual tokens with the largest key norms taken as pivots "
                                                   "(kept themselves); released: 4.")
    text_pivots: int = Field(4, ge=0, description="Prompt text tokens after the image with the largest key norms "
                                                  "taken as pivots; released: 4.")
    budget: Literal["exact", "released"] = Field("exact", description=(
        "'exact': a sample keeps round(keep_ratio x N) visual tokens (the framework's promise, comparable at equal "
        "tokens); 'released': as the released code, the image pivots plus M // (image_pivots + text_pivots) per "
        "pivot, M = round(keep_ratio x N) - e.g. 132 for M = 128 with 4 + 4 pivots."))


class DART(Method):
    """DART (Wen et al., EMNLP 2025): duplication-aware visual token pruning inside the LLM, training-free."""

    name = "dart"
    Config = DARTConfig
    points = ("decoder_layer",)
    description = ("Keep pivot tokens (largest key norms) and, for each, the visual tokens least similar to it "
                   "(DART).")
    approach = "similarity"
    paper = "Wen et al., EMNLP 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: DARTConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """Before layer round(2 x L / 32) (halves up), at least 1 (layer 0 has no layer before it whose keys
        could choose pivots): 2 on 32 and 28 layers, 3 on 40, 1 on the 4-layer test models."""
        if num_layers < 2:
            return ()
        layer = scaled_layer(PUBLISHED_LAYER, PUBLISHED_DEPTH, num_layers)
        return (min(max(1, layer), num_layers - 1),)

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    def layers_problem(self) -> str | None:
        if 0 in self.layers:
            return ("dart at layer 0 has no layer before it whose keys could choose the pivots; list layer 1 or "
                    "later (published: 2 of 32)")
        return None

    def kept(self, visual: int) -> int:
        """Visual tokens a sample of ``visual`` keeps (see :func:`~tokenpress_plugins.dart.duplication.kept_total`)."""
        config = self.config
        return kept_total(visual, config.keep_ratio, config.image_pivots, config.text_pivots, config.budget)

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep | None:
        sequence = context.sequence
        counts = sequence.visual_lengths
        totals = [self.kept(count) for count in counts]
        if all(total >= count for total, count in zip(totals, counts, strict=True)):
            return None  # every sample keeps all its visual tokens
        visual = context.is_visual
        device = visual.device
        norms = self._pivot_scores(context)
        slots = torch.arange(sequence.length, device=device).expand_as(visual)
        last_visual = torch.where(visual, slots, -1).amax(-1, keepdim=True)
        text_after = sequence.valid & sequence.is_prompt & ~sequence.is_visual & (slots > last_visual)
        features = context.adapter.final_norm(sequence.hidden)
        keep = select_keep(norms, features, visual, text_after, torch.tensor(totals, device=device),
                           self.config.image_pivots, self.config.text_pivots, max(counts))
        return Keep(keep)

    def _pivot_scores(self, context: DecoderContext) -> torch.Tensor:
        """(B, N) over the current sequence: each slot's key L1 norm in the layer before (post-rotary, every
        head), recomputed from that layer's input as the layer computes it (``layer_query_key``; its query is
        asked for one row only, the last prompt token's)."""
        previous = context.scorer.previous
        if previous is None:  # refused when attached (layers_problem); kept for direct calls
            raise ValueError("dart needs the sequence that entered the layer before its own")
        query_row = previous.last_prompt_index().unsqueeze(1)
        _, keys = layer_query_key(context.adapter, context.layer_index - 1, previous, query_row)
        norms = key_norms(keys)  # (B, N') over the previous layer's slots
        sequence = context.sequence
        dump = max(previous.slot_count, sequence.slot_count)
        by_slot = norms.new_zeros(norms.shape[0], dump + 1)  # carried to the current slots by identity
        by_slot.scatter_(1, torch.where(previous.valid, previous.slot_id, dump), norms)
        return torch.gather(by_slot, 1, torch.where(sequence.valid, sequence.slot_id, dump))

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        counts = torch.as_tensor(tokens_in).reshape(-1).tolist()
        return torch.tensor([self.kept(int(count)) for count in counts], dtype=torch.long)

    def scoring_flops(self, item: Any) -> float:
        """The pivots' keys: layer K-1's k projection over the tokens that entered it and its q projection
        of one row (``layer_query_key`` computes both); the duplication cosines, every pivot slot against
        every visual token. Nothing when a sample keeps all its visual tokens."""
        visual = item.tokens - item.text_tokens
        if item.layer == 0 or item.previous_tokens is None or self.kept(visual) >= visual:
            return 0.0
        decoder = item.decoder
        keys = 2.0 * item.previous_tokens * decoder.hidden * decoder.kv_heads * decoder.head_dim
        query = 2.0 * decoder.hidden * decoder.heads * decoder.head_dim
        pivots = self.config.image_pivots + self.config.text_pivots
        return keys + query + duplication_flops(visual, pivots, decoder.hidden)
