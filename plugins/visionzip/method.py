"""The ``visionzip`` stage: keep the patches the class token attends to most (dominant tokens) and
merge the rest into a few contextual tokens by key similarity (VisionZip)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from tokenpress import Method, MethodConfig, Ratio, StageContext, TokenState, hookimpl, keep_count
from tokenpress.core.errors import CompressionError
from tokenpress.core.signals import ClsAttention, EncoderKeys
from tokenpress.core.tokens import keep_counts_on_host
from tokenpress_plugins.visionzip.merge import Zipped, zip_rows

#: The contextual share of the published budgets (54 + 10 = 64, 108 + 20 = 128, 162 + 30 = 192 on
#: LLaVA-1.5): what ``keep_ratio`` splits its count by.
CONTEXTUAL_SHARE = 10 / 64


class VisionZipConfig(MethodConfig):
    """Parameters of ``visionzip``: fixed counts (``dominant`` and ``contextual``) or ``keep_ratio``,
    exactly one of the two."""

    dominant: int | None = Field(None, ge=0, description="Dominant tokens per image row: the patches the class "
                                                         "token attends to most (published: 54, 108, 162).")
    contextual: int | None = Field(None, ge=0, description="Contextual tokens per image row, each merging the "
                                                           "remaining patches most similar to it (published: "
                                                           "10, 20, 30).")
    keep_ratio: Ratio | None = Field(None, gt=0.0, le=1.0, description="Instead of the counts: the share of each "
                                                                       "row's patches kept, split 54:10 between "
                                                                       "dominant and contextual tokens.")
    layer: int = Field(-2, description="Encoder layer whose CLS attention and keys are read (the reference: the "
                                       "one whose output LLaVA uses as features).")

    @model_validator(mode="after")
    def _one_budget(self) -> VisionZipConfig:
        counts = (self.dominant, self.contextual)
        if self.keep_ratio is not None and counts != (None, None):
            raise ValueError("give either dominant and contextual, or keep_ratio, not both")
        if self.keep_ratio is None and None in counts:
            raise ValueError("give dominant and contextual (tokens per image row, e.g. 54 and 10), or keep_ratio")
        if self.keep_ratio is None and self.dominant + self.contextual == 0:
            raise ValueError("dominant + contextual must keep at least one token")
        return self


class VisionZip(Method):
    """VisionZip (Yang et al., CVPR 2025): dominant and contextual tokens, training-free, after the encoder."""

    name = "visionzip"
    Config = VisionZipConfig
    points = ("post_encoder",)
    description = "Keep the patches the CLS token attends to most, merge the rest into a few by key similarity."
    approach = "attention"
    paper = "Yang et al., CVPR 2025"
    year = 2025
    identity_params = {"keep_ratio": 1.0}
    example_params = {"keep_ratio": 0.25}
    config: VisionZipConfig

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        return {"keep_ratio": keep_ratio}

    def split(self, patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens of a row of ``patches`` patches: the counts, or ``keep_ratio``'s
        count split 54:10, never more than the row holds (the dominant tokens first)."""
        if self.config.keep_ratio is not None:
            kept = min(patches, keep_counts_on_host([patches], self.config.keep_ratio)[0])
            contextual = round(kept * CONTEXTUAL_SHARE)
            return kept - contextual, contextual
        dominant = min(self.config.dominant, patches)
        return dominant, min(self.config.contextual, patches - dominant)

    def _requests(self) -> tuple[ClsAttention, EncoderKeys]:
        # an encoder without a class token gives the attention each patch receives instead (AngelSlim's VisionZip
        # on Qwen2.5-VL scores with the ViT's recomputed attention)
        return (ClsAttention(layer=self.config.layer, heads="mean", class_free="received"),
                EncoderKeys(layer=self.config.layer, heads="mean"))

    def required_signals(self) -> list[Any]:
        return list(self._requests())

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        if not tokens.is_dense():
            raise CompressionError(f"{context.stage.label()}: visionzip reads the encoder's own patches; put it "
                                   "first, before any stage that drops or merges tokens")
        cls, keys = self._requests()
        scores, key = context.signals[cls], context.signals[keys]
        rows = tokens.counts_on_host()
        budgets = [self.split(patches) for patches in rows]
        dominant, contextual = [kept for kept, _ in budgets], [merged for _, merged in budgets]
        zipped = zip_rows(scores, key, tokens.embeddings, tokens.valid, rows, dominant, contextual)
        return self._assemble(tokens, zipped, [kept + merged for kept, merged in budgets])

    def _assemble(self, tokens: TokenState, zipped: Zipped, counts: list[int]) -> TokenState:
        """The output state: one token per dominant patch (its feature) and per target (its contextual
        token, standing for the patches merged into it), ``counts`` per row, in raster order."""
        images, patches, dim = tokens.embeddings.shape
        width = max(counts, default=0)
        anchors = zipped.dominant | zipped.target  # one output token each
        assign = self._output_slots(anchors, zipped.targets, zipped.choice)
        # each anchor's embedding (its feature, or its contextual token), then written at its output slot
        target_slot = torch.where(zipped.target_valid, zipped.targets, patches)  # patches: a dump slot
        anchored = torch.cat([tokens.embeddings, tokens.embeddings.new_zeros(images, 1, dim)], 1)
        anchored.scatter_(1, target_slot.unsqueeze(-1).expand(-1, -1, dim), zipped.contextual)
        embeddings = tokens.embeddings.new_zeros(images, width + 1, dim)
        embeddings.scatter_(1, torch.where(anchors, assign, width).unsqueeze(-1).expand(-1, -1, dim),
                            anchored[:, :patches])
        return tokens.merge(assign, width, counts=counts).replace(embeddings[:, :width])

    @staticmethod
    def _output_slots(anchors: torch.Tensor, targets: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """(I, P) long: each patch's output slot (-1: dropped). ``anchors`` (I, P) are the dominant
        patches and the targets, one output token each; a patch to merge joins its chosen target's.
        A token sits at its patches' first cell (the rule of ``TokenState.merge``): slots follow the
        raster order of those cells."""
        images, patches = anchors.shape
        patch = torch.arange(patches, device=anchors.device).expand(images, -1)
        chosen = torch.gather(targets, 1, choice.clamp_min(0)) if targets.shape[1] else patch
        anchor = torch.where(anchors, patch, torch.where(choice >= 0, chosen, patches))  # patches: dropped
        first = torch.full((images, patches + 1), patches, dtype=torch.long, device=anchors.device)
        first.scatter_reduce_(1, anchor, patch, reduce="amin")
        group_first = torch.gather(first, 1, anchor)  # the first cell of each patch's group
        kept = anchor < patches
        slot = torch.cumsum((kept & (group_first == patch)).long(), -1) - 1  # counted at each group's first cell
        return torch.where(kept, torch.gather(slot, 1, group_first.clamp_max(patches - 1)), -1)

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        if self.config.keep_ratio is not None:
            return torch.minimum(keep_count(tokens_in, self.config.keep_ratio), torch.as_tensor(tokens_in))
        return torch.as_tensor(tokens_in).clamp_max(self.config.dominant + self.config.contextual)

    def stage_flops(self, shape: Any) -> float:
        """The similarity of every patch merged to every contextual target: a matmul over the keys
        averaged over heads (the encoder width / its heads)."""
        dominant, contextual = self.split(shape.tokens_in)
        merging = shape.tokens_in - dominant - contextual if contextual else 0
        return 2.0 * merging * contextual * (shape.encoder_width // shape.encoder_heads)
