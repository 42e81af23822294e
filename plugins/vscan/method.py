"""The ``vscan`` stages. At ``projector``: the global and local scans choose the tokens kept by the class
token's attention inside two encoder layers, every other token is merged into its most similar kept token
after the projector. At ``decoder_layer`` (the LLM's middle layer by default): keep the visual tokens the
last instruction token attends to most inside that layer (VScan)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenpress import (
    DecoderContext,
    Keep,
    Method,
    MethodConfig,
    Ratio,
    StageContext,
    TokenState,
    hookimpl,
    keep_count,
    keep_counts_on_host,
    pack_index,
    scaled_layer,
)
from tokenpress.core.errors import CompressionError
from tokenpress.core.flops import scorer_flops
from tokenpress.core.select import topk_mask
from tokenpress.core.signals import ClsAttention
from tokenpress_plugins.vscan.scan import (
    global_scan,
    local_scan,
    merge_assign,
    merge_flops,
    nearest_kept,
    split,
    window_count,
    window_ids,
)

#: The published budgets on LLaVA-1.5 as shares: 96 of 576 tokens into the LLM, 32 of those 96 from the
#: middle layer on (the Qwen2.5-VL scripts' 0.167 and 0.333 too).
PUBLISHED_PROJECTOR_SHARE = 0.167
PUBLISHED_DECODER_SHARE = 0.333
#: The released local scan's layer, of CLIP-L's 24 (the Qwen2.5-VL scripts' 7 of 32 is the same depth).
PUBLISHED_LOCAL_LAYER, PUBLISHED_ENCODER_DEPTH = 5, 24


class VScanConfig(MethodConfig):
    """Parameters of ``vscan``. ``keep_ratio`` is each stage's own; ``local_layer``, ``global_layer`` and
    ``window`` shape the scans of the ``projector`` stage (a ``decoder_layer`` stage ignores them)."""

    keep_ratio: Ratio = Field(gt=0.0, le=1.0, description=(
        "Share of the visual tokens this stage keeps, in (0, 1]. Published: 0.167 at projector (96 of LLaVA-1.5's "
        "576 tokens), 0.333 at decoder_layer (32 of those 96, from the middle layer on)."))
    local_layer: int | None = Field(None, description=(
        "Encoder layer whose class-token attention ranks the patches of each window (the local scan), counted "
        "like ClsAttention layers (negative from the end). Default: the released code's shallow layer, 5 of "
        "CLIP-L's 24 (LLaVA-1.5, LLaVA-NeXT), at the same relative depth of the encoder at hand (7 of "
        "Qwen2.5-VL's 32, as its released scripts; 1 of a 4-layer encoder)."))
    global_layer: int = Field(-2, description=(
        "Encoder layer whose class-token attention ranks the patches of the whole image (the global scan); "
        "default -2, the layer LLaVA takes its features from."))
    window: int = Field(6, ge=1, description=(
        "Side of the local scan's windows in patches (the released code: 6, i.e. 4 x 4 windows on a 24 x 24 "
        "grid); the cells left at the bottom and right edges join the last window."))


class VScan(Method):
    """VScan (Zhang et al., TMLR 2026): global and local scans with merging before the LLM, then pruning at
    its middle layer - a two-stage method; a stack holds one stage of it at each point."""

    name = "vscan"
    Config = VScanConfig
    points = ("projector", "decoder_layer")
    description = ("Keep global and per-window local picks by CLS attention and merge the rest into them "
                   "(projector); keep the tokens the last instruction token attends to (middle layer) (VScan).")
    approach = "attention"
    paper = "Zhang et al., TMLR 2026"
    year = 2026
    identity_params = {"keep_ratio": 1.0}
    # the 2-layer test encoders have no layer 5: the shared suites run the local scan in layer 0
    example_params = {"keep_ratio": PUBLISHED_PROJECTOR_SHARE, "local_layer": 0}
    config: VScanConfig

    @classmethod
    def config_for_model(cls, config: MethodConfig, encoder_layers: int | None) -> MethodConfig:
        """An unset ``local_layer`` at the released layer's relative depth of this encoder (the released
        layer itself where the depth is unknown)."""
        if not isinstance(config, VScanConfig) or config.local_layer is not None:
            return config
        local = PUBLISHED_LOCAL_LAYER
        if encoder_layers:
            scaled = scaled_layer(PUBLISHED_LOCAL_LAYER, PUBLISHED_ENCODER_DEPTH, encoder_layers)
            local = min(scaled, encoder_layers - 1)
        return config.model_copy(update={"local_layer": local})

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """A ``decoder_layer`` stage acts before the middle layer, ``L // 2``: 16 of 32 (LLaVA), 14 of 28
        (Qwen2.5-VL-7B), as released."""
        return (num_layers // 2,)

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        """The ``projector`` stage keeping ``keep_ratio`` (the scans at their published layers)."""
        return {"keep_ratio": keep_ratio}

    @property
    def in_decoder(self) -> bool:
        """Whether this is the ``decoder_layer`` stage: such a stage always has its layers (listed, or the
        default ones, resolved before a stage is built for a model); a ``projector`` stage never has any."""
        return bool(self.layers)

    def _requests(self) -> tuple[ClsAttention, ClsAttention]:
        def request(layer: int) -> ClsAttention:
            # an encoder without a class token serves the attention each patch receives (the paper's rule)
            return ClsAttention(layer=layer, heads="mean", class_free="received")

        local = self.config.local_layer if self.config.local_layer is not None else PUBLISHED_LOCAL_LAYER
        return request(local), request(self.config.global_layer)

    def required_signals(self) -> list[Any]:
        if self.in_decoder or self.config.keep_ratio == 1.0:
            return []  # the decoder stage scores in the LLM; keeping everything needs no score
        return list(dict.fromkeys(self._requests()))

    def kept(self, counts: list[int]) -> list[int]:
        """What each row (image row, or sample in the decoder) keeps of ``counts``: round(n x keep_ratio), at
        least one, none of none."""
        return [min(count, kept) for count, kept in zip(counts, keep_counts_on_host(counts, self.config.keep_ratio),
                                                        strict=True)]

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        tokens_in = torch.as_tensor(tokens_in)
        return torch.minimum(keep_count(tokens_in, self.config.keep_ratio), tokens_in)

    # --- stage 1: scans and merging, at the projector -------------------------------------------------

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        counts = tokens.counts_on_host()
        keep = self.kept(counts)
        if keep == counts:
            return context.project(tokens)
        if not tokens.is_dense():
            raise CompressionError(f"{context.stage.label()}: vscan scans the encoder's own patch grid; put it "
                                   "first, before any stage that drops or merges tokens")
        local_request, global_request = self._requests()
        local_scores = self._scores(tokens, context.signals[local_request])
        global_scores = self._scores(tokens, context.signals[global_request])
        grids = tokens.grid_sizes()
        window = self.config.window
        local_counts, global_counts = zip(*(split(count) for count in keep), strict=True)
        local = local_scan(local_scores, tokens.valid, window_ids(tokens.grid_index, tokens.grid, window),
                           [window_count(grid, window) for grid in grids], local_counts)
        kept = local | global_scan(global_scores, tokens.valid & ~local, global_counts)
        rest = [count - k for count, k in zip(counts, keep, strict=True)]
        projected = context.project(tokens)  # every token: the merge works in the LLM's space
        if projected.grid_sizes() != tokens.grid_sizes():  # the family re-gridded a row it received whole
            projected = self._project_apart(tokens, kept, keep, rest, context)
        choice = nearest_kept(projected.embeddings, kept, tokens.valid & ~kept, max(keep), max(rest))
        return projected.merge(merge_assign(kept, choice), max(keep), counts=keep)

    @staticmethod
    def _project_apart(tokens: TokenState, kept: torch.Tensor, keep: list[int], rest: list[int],
                       context: StageContext) -> TokenState:
        """Every token through the model's projector, in its slot, for a family that re-grids a row it projects
        whole (LLaVA-OneVision's anyres_max resize of a high-resolution grid): the kept tokens and the others go
        through it as two selections, so the row is treated as the selection it has become, as after any other
        selecting stage. The projector maps each token on its own, so this is the projection of every token."""
        images, slots, _ = tokens.embeddings.shape
        parts = []
        for mask, counts in ((kept, keep), (tokens.valid & ~kept, rest)):
            part = context.project(tokens.keep(mask, counts=counts))
            index, valid = pack_index(mask, width=max(counts))
            parts.append((part.embeddings[:, :index.shape[1]], torch.where(valid, index, slots)))
        width = parts[0][0].shape[-1]
        embeddings = parts[0][0].new_zeros(images, slots + 1, width)  # + a dump slot for the padding picks
        for values, index in parts:
            embeddings.scatter_(1, index.unsqueeze(-1).expand(-1, -1, width), values)
        return tokens.replace(embeddings[:, :slots], space="llm")

    @staticmethod
    def _scores(tokens: TokenState, attention: torch.Tensor) -> torch.Tensor:
        """(I, N): a signal (I, patches) on the token slots (each token the attention of its patch)."""
        owner = tokens.patch_owner()
        scores = attention.new_zeros(tokens.valid.shape)
        return scores.scatter_add_(1, owner.clamp_min(0), attention * (owner >= 0))

    def stage_flops(self, shape: Any) -> float:
        """The merge's similarity products: each of the N - K tokens not kept against the K kept ones, over
        the LLM's width (the model's projector, applied to all N, is charged as the model's)."""
        return merge_flops(shape.tokens_in, shape.tokens_out, shape.llm_width)

    # --- stage 2: pruning inside the LLM ---------------------------------------------------------------

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep | None:
        counts = list(context.sequence.visual_lengths)  # host numbers: nothing is read from the device
        keep = self.kept(counts)
        if keep == counts:
            return None
        # the last instruction token's attention inside this layer (its own norm, q/k and rotary embedding)
        scores = context.scorer.attention_to_tokens(query="last", layer="current")
        return Keep(topk_mask(scores, context.is_visual, torch.tensor(keep, device=scores.device)))

    def scoring_flops(self, item: Any) -> float:
        """The scorer at this layer: q of the last prompt token, k of every token entering it, one row of
        logits per head (nothing where no token is dropped)."""
        visual = item.tokens - item.text_tokens
        if self.kept([visual])[0] >= visual:
            return 0.0
        return scorer_flops(item.decoder, 1, item.tokens)
