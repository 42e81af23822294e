"""The ``prumerge`` stage: keep the patches whose CLS attention is an outlier (IQR rule), let each
absorb its nearest neighbours by key similarity, and sum the rest into one token (PruMerge);
``plus: true`` adds PruMerge+'s spatially uniform samples to the kept set."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenpress import Method, MethodConfig, StageContext, TokenState, hookimpl
from tokenpress.core.errors import CompressionError
from tokenpress.core.select import topk_mask
from tokenpress.core.signals import ClsAttention, EncoderKeys
from tokenpress.core.tokens import pack_index
from tokenpress_plugins.prumerge.merge import merge_neighbours, outlier_share, rest_token, spatial_samples


class PruMergeConfig(MethodConfig):
    """Parameters of ``prumerge``. The kept count is the method's own (the IQR outliers of each image)."""

    plus: bool = Field(False, description="PruMerge+: add every int(int(1/ratio)/3)-th patch to the outliers.")
    neighbours: int = Field(32, ge=0, le=4096, description="Patches each kept token absorbs (by key cosine "
                                                           "similarity, weighted by their CLS attention).")
    rest_token: bool = Field(True, description="Append the patches not kept, summed weighted by their CLS "
                                               "attention, as one more token (the reference code does).")
    layer: int = Field(-1, description="Encoder layer whose CLS attention and keys are read (the reference: "
                                       "the last, whose input is LLaVA's feature layer).")


class PruMerge(Method):
    """PruMerge / PruMerge+ (Shang et al., 2024): adaptive, training-free, right after the encoder."""

    name = "prumerge"
    Config = PruMergeConfig
    points = ("post_encoder",)
    description = "Keep the CLS-attention outliers (IQR), each absorbing its key-nearest neighbours (PruMerge)."
    approach = "attention"
    paper = "Shang et al., LLaVA-PruMerge, 2024"
    year = 2024
    example_params = {"plus": False}
    config: PruMergeConfig

    def _requests(self) -> tuple[ClsAttention, EncoderKeys]:
        # an encoder without a class token gives the attention each patch receives instead (as the toolkits
        # that host PruMerge do on SigLIP and Qwen's ViTs)
        return (ClsAttention(layer=self.config.layer, heads="full", class_free="received"),
                EncoderKeys(layer=self.config.layer))

    def required_signals(self) -> list[Any]:
        return list(self._requests())

    @hookimpl
    def post_encoder(self, tokens: TokenState, context: StageContext) -> TokenState:
        if not tokens.is_dense():
            raise CompressionError(f"{context.stage.label()}: prumerge reads the encoder's own patches; put it "
                                   "first, before any stage that drops or merges tokens")
        cls, keys = self._requests()
        scores, key = context.signals[cls], context.signals[keys]
        valid = tokens.valid
        counts, share = outlier_share(scores, valid)
        keep = topk_mask(scores, valid, counts)
        if self.config.plus:
            keep = keep | spatial_samples(share, valid)
        kept, picked = pack_index(keep)  # the kept count is the method's own: its width is read once
        merged = merge_neighbours(tokens.embeddings, key, scores, valid, kept, picked, self.config.neighbours)
        slots = kept.shape[1]
        rank = torch.cumsum(keep.long(), -1) - 1  # a kept patch's slot, in raster order
        rest = valid & ~keep
        assign = torch.where(keep, rank, torch.where(rest, slots, -1) if self.config.rest_token else -1)
        state = tokens.merge(assign, slots + int(self.config.rest_token))
        embeddings = merged
        if self.config.rest_token:
            embeddings = torch.cat([merged, rest_token(tokens.embeddings, scores, rest).unsqueeze(1)], dim=1)
        return state.replace(embeddings.to(tokens.embeddings.dtype))

    def stage_flops(self, shape: Any) -> float:
        """The neighbour search: every kept token's key against every patch's (a matmul over C)."""
        kept = shape.tokens_out - int(self.config.rest_token)
        return 2.0 * max(kept, 0) * shape.tokens_in * shape.encoder_width
