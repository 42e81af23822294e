"""The ``sparsevlm`` stage: at each listed decoder layer, rank the visual tokens by the attention the
prompt's raters paid them inside the layer before, keep the top ones, recycle the best of the pruned
ones into cluster means and delete the rest (one :class:`~tokenpress.Merge`)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from tokenpress import DecoderContext, Keep, Merge, Method, MethodConfig, Ratio, hookimpl, scaled_layer
from tokenpress.core.errors import StackError
from tokenpress.core.flops import scorer_flops
from tokenpress.core.select import topk_mask
from tokenpress.core.tokens import pack_index
from tokenpress_plugins.sparsevlm.cluster import clustering_flops, density_peaks
from tokenpress_plugins.sparsevlm.select import (
    choose_raters,
    cluster_count,
    rank_keep_counts,
    recycled_count,
    recycled_count_on_host,
    relation_rank,
)

#: The published pruning locations of LLaVA-1.5 (after these of its 32 decoder layers).
PUBLISHED_AFTER = (2, 6, 15)
PUBLISHED_DEPTH = 32
#: The rank rule's published 192-token LLaVA-1.5 setting (the default).
DEFAULT_SCALE = 13.5
DEFAULT_BIAS = 0.0


class SparseVLMConfig(MethodConfig):
    """Parameters of ``sparsevlm``: the paper's rank rule (``scale``, ``bias``), or a fixed count
    (``keep_ratio``, or a ``schedule`` of counts)."""

    scale: float | None = Field(None, ge=0.0, description=(
        "Rank rule: keep int(rank * scale + bias) visual tokens at each listed layer; default 13.5 (with bias 0: "
        "the published 192-token LLaVA-1.5 setting; 128 tokens: 9 and 6; 64 tokens: 0.8 and 0)."))
    bias: float | None = Field(None, description="Rank rule: see scale; default 0.")
    keep_ratio: Ratio | None = Field(None, gt=0.0, le=1.0, description=(
        "Instead of the rank rule: every listed layer keeps keep_ratio^(1/layers) of the visual tokens entering it "
        "(rounded, at least one), so about keep_ratio is kept after the last, plus the recycled cluster means."))
    schedule: list[int] | None = Field(None, description=(
        "Instead of the rank rule: visual tokens kept at each listed layer, in order, at most all but one (the "
        "released code's counts for 576 tokens: [66, 30, 17], [303, 110, 36] or [300, 200, 110])."))
    recycle: bool = Field(True, description="Merge the best-related 30% of the pruned tokens into cluster means "
                                            "(false: delete every pruned token).")

    @model_validator(mode="after")
    def _one_rule(self) -> SparseVLMConfig:
        if self.keep_ratio is not None and self.schedule is not None:
            raise ValueError("give keep_ratio or schedule, not both")
        fixed = self.keep_ratio is not None or self.schedule is not None
        if fixed and (self.scale is not None or self.bias is not None):
            raise ValueError("scale and bias shape the rank rule; a keep_ratio or schedule replaces it")
        if self.schedule is not None and (not self.schedule or any(count < 0 for count in self.schedule)):
            raise ValueError(f"schedule lists the visual tokens kept at each listed layer, >= 0 (got {self.schedule})")
        return self


class SparseVLM(Method):
    """SparseVLM (Zhang et al., ICML 2025): text-guided, training-free pruning with token recycling."""

    name = "sparsevlm"
    Config = SparseVLMConfig
    points = ("decoder_layer",)
    description = ("Keep the visual tokens the prompt's raters attend to most (count from the rank), recycle "
                   "the best pruned ones into cluster means (SparseVLM).")
    approach = "query"
    paper = "Zhang et al., ICML 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"scale": 9.0, "bias": 6.0}  # the published 128-token setting
    config: SparseVLMConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """Before the layer after each published location, scaled to the depth: after layers
        round(l * L / 32) (halves up) for l in 2, 6, 15; [3, 7, 16] on 32 layers."""
        after = {scaled_layer(layer, PUBLISHED_DEPTH, num_layers) for layer in PUBLISHED_AFTER}
        return tuple(sorted(layer + 1 for layer in after if layer + 1 < num_layers))

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    def setup(self, adapter: Any) -> None:
        schedule = self.config.schedule
        if schedule is not None and len(schedule) != len(self.layers):
            raise StackError(f"params.schedule lists {len(schedule)} counts for {len(self.layers)} listed layers "
                             f"({list(self.layers)}); give one per layer")

    # --- counts ---------------------------------------------------------------------------------------

    def rank_rule(self) -> tuple[float, float]:
        """(scale, bias) of the rank rule, the published 192-token setting where not given."""
        scale, bias = self.config.scale, self.config.bias
        return (DEFAULT_SCALE if scale is None else scale, DEFAULT_BIAS if bias is None else bias)

    def fixed_keep(self, visual: int, layer: int) -> int | None:
        """Visual tokens a sample of ``visual`` keeps at ``layer`` under a fixed rule (``visual``: it prunes
        nothing); ``None`` under the rank rule (the count depends on the content)."""
        config = self.config
        if config.keep_ratio is not None:
            share = config.keep_ratio ** (1.0 / max(1, len(self.layers)))
            return min(visual, max(1, round(visual * share)))
        if config.schedule is not None:
            if visual <= 1:
                return visual
            return min(config.schedule[self.layers.index(layer)], visual - 1)
        return None

    def recycle_width(self, visual: int, keep: int | None) -> int:
        """Slots the clustering of one sample takes: its recycled count under a fixed rule, the most it can
        recycle (nothing kept) under the rank rule."""
        if not self.config.recycle:
            return 0
        return recycled_count_on_host(visual if keep is None else visual - keep)

    @property
    def adaptive(self) -> bool:
        """Whether the count follows the rank rule (no fixed count, no promise)."""
        return self.config.keep_ratio is None and self.config.schedule is None

    def count_after(self, visual: int, keep: int) -> int:
        """Visual tokens a sample of ``visual`` holds after keeping ``keep``: those and its cluster means."""
        if keep >= visual:
            return visual
        return keep + (cluster_count(recycled_count_on_host(visual - keep)) if self.config.recycle else 0)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor | None:
        """Under ``keep_ratio``: what each sample keeps plus its cluster means (the same at every layer)."""
        if self.config.keep_ratio is None:
            return None
        return self.promised_count_at(tokens_in, self.layers[0] if self.layers else 0)

    def promised_count_at(self, tokens_in: torch.Tensor, layer: int) -> torch.Tensor | None:
        """Under ``keep_ratio`` or ``schedule``: what each sample keeps at ``layer`` plus its cluster means."""
        if self.adaptive:
            return None
        counts = [int(count) for count in tokens_in.reshape(-1).tolist()]
        return torch.tensor([self.count_after(count, self.fixed_keep(count, layer)) for count in counts],
                            dtype=torch.long)

    # --- the stage ------------------------------------------------------------------------------------

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Merge | Keep | None:
        sequence = context.sequence
        counts = sequence.visual_lengths
        fixed = [self.fixed_keep(count, context.layer_index) for count in counts]
        if max(counts, default=0) <= 1 or all(keep is not None and keep >= count for keep, count in zip(
                fixed, counts, strict=True)):
            return None
        visual = context.is_visual
        probs, rater_rows = self._rater_attention(context)
        relation = (probs * rater_rows.unsqueeze(-1)).sum(1) / rater_rows.sum(-1, keepdim=True).clamp_min(1)
        visual_count = visual.sum(-1)
        if self.adaptive:  # the rank rule: the rank of the raters x visual tokens attention
            matrix = probs * rater_rows.unsqueeze(-1) * visual.unsqueeze(1)
            rank = relation_rank(matrix, rater_rows.sum(-1), visual_count)
            keep = rank_keep_counts(rank, visual_count, *self.rank_rule())
        else:
            keep = torch.tensor(fixed, dtype=torch.long, device=visual.device)
        kept = topk_mask(relation, visual, keep)
        if not self.config.recycle:
            return Keep(kept)
        width = max(self.recycle_width(count, keep_host) for count, keep_host in zip(counts, fixed, strict=True))
        return self._recycle(context, relation, kept, recycled_count(visual_count - keep), width)

    def _rater_attention(self, context: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention every text row paid each slot inside the previous layer, (B, T, N) averaged over
        heads (text rows in slot order), and which of those rows are the raters', (B, T) bool."""
        sequence = context.sequence
        text = sequence.valid & ~sequence.is_visual
        probs, _ = context.scorer.attention_from(text, layer="previous")
        width = max(length - count for length, count in zip(sequence.lengths, sequence.visual_lengths, strict=True))
        text_index, text_valid = pack_index(text, width=width)  # the same rows, in the same order
        return probs, torch.gather(self._raters(context) & text, 1, text_index) & text_valid

    def _recycle(self, context: DecoderContext, relation: torch.Tensor, kept: torch.Tensor,
                 recycled_counts: torch.Tensor, width: int) -> Merge:
        """The Merge: kept tokens stay, the best-related pruned ones (``recycled_counts`` per sample, packed
        into ``width`` slots) join their density-peaks cluster, the other pruned ones go."""
        visual = context.is_visual
        recycled = topk_mask(relation, visual & ~kept, recycled_counts)
        groups = int(cluster_count(width))
        group = torch.where(kept, -1, -2)
        if width:
            index, valid = pack_index(recycled, width=width)
            hidden = context.sequence.hidden
            members = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            assignment = density_peaks(members, valid, cluster_count(recycled_counts), groups)
            slots = torch.where(valid, index, group.shape[1])  # padding picks go to a dump column
            group = torch.cat([group, group.new_zeros(group.shape[0], 1)], dim=1)
            group = group.scatter(1, slots, assignment)[:, :-1]
        group = torch.where(visual, group, -1)
        return Merge(group, groups=max(groups, 1), weight=visual.to(torch.float32))  # equal weights (reference)

    def _raters(self, context: DecoderContext) -> torch.Tensor:
        """(B, N) bool over the current sequence: the raters, chosen once per prefill (at the stage's first
        layer, from the LLM input embeddings) and kept by slot identity for its later layers."""
        sequence = context.sequence
        key = f"raters@{context.stage.index}"
        by_slot = context.state.get(key)
        if by_slot is None:
            by_slot = context.state[key] = self._choose_raters(context)
        slot = torch.where(sequence.valid, sequence.slot_id, sequence.slot_count)
        return torch.gather(by_slot, 1, slot)

    def _choose_raters(self, context: DecoderContext) -> torch.Tensor:
        """(B, slot_count + 1) bool by layer-0 slot: the raters among the prompt's text after the image,
        judged by the layer-0 embeddings of the tokens now in the sequence."""
        sequence = context.sequence
        visual = context.is_visual
        text = sequence.valid & ~sequence.is_visual
        slots = torch.arange(sequence.length, device=visual.device).expand_as(visual)
        last_visual = torch.where(visual, slots, -1).amax(-1, keepdim=True)
        after_image = text & sequence.is_prompt & (slots > last_visual)

        initial = context.initial.hidden  # the layer-0 slot of a token is its slot_id there

        def packed(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            index, valid = pack_index(mask, width=width)
            slot_id = torch.gather(sequence.slot_id, 1, index)
            embeddings = torch.gather(initial, 1, slot_id.unsqueeze(-1).expand(-1, -1, initial.shape[-1]))
            return embeddings, valid, index

        counts = sequence.visual_lengths
        visual_embeddings, visual_valid, _ = packed(visual, max(counts))
        text_width = max(length - count for length, count in zip(sequence.lengths, counts, strict=True))
        text_embeddings, text_valid, text_index = packed(text, text_width)
        candidates = torch.gather(after_image, 1, text_index) & text_valid
        chosen = choose_raters(visual_embeddings, visual_valid, text_embeddings, candidates)
        dump = sequence.slot_count
        target = torch.where(chosen, torch.gather(sequence.slot_id, 1, text_index), dump)
        by_slot = torch.zeros(visual.shape[0], dump + 1, dtype=torch.bool, device=visual.device)
        by_slot.scatter_(1, target, True)
        by_slot[:, dump] = False
        return by_slot

    # --- costs ------------------------------------------------------------------------------------------

    def scoring_flops(self, item: Any) -> float:
        """The scorer's rows (every text token: q of those rows, k of the keys, the logits), the raters'
        visual x text product at the first layer, and the clustering's distance products."""
        visual = item.tokens - item.text_tokens
        keep = self.fixed_keep(visual, item.layer)
        if visual <= 1 or (keep is not None and keep >= visual):
            return 0.0
        use_previous = item.layer > 0 and item.previous_tokens is not None
        keys = item.previous_tokens if use_previous else item.tokens
        total = scorer_flops(item.decoder, item.text_tokens, keys)
        hidden = item.decoder.hidden
        if item.layer == min(self.layers):
            total += 2.0 * visual * item.text_tokens * hidden
        width = self.recycle_width(visual, keep)
        if width:
            total += clustering_flops(width, int(cluster_count(width)), hidden)
        return total

    def pairwise_scores(self, tokens_in: int) -> int:
        """The clustering's distances between the recycled tokens and each one's nearest (one row of at most
        int(0.3 * N) + 1 tokens): M x M + M x K floats."""
        width = self.recycle_width(tokens_in, None)
        if tokens_in <= 1 or not width:
            return 0
        return min(tokens_in * tokens_in, width * width + width * int(cluster_count(width)))
