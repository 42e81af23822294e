"""The ``pyramiddrop`` stage: before each of a few decoder layers, rank the visual tokens by the attention
the last instruction token pays them inside that layer (recomputed from the layer's own norm, q/k and
rotary embedding) and keep ``lambda`` of those the stage before left (PyramidDrop)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, ConfigDict, Field

from tokenpress import DecoderContext, Keep, Method, MethodConfig, hookimpl
from tokenpress.core.flops import scorer_flops
from tokenpress.core.select import topk_mask
from tokenpress_plugins.pyramiddrop.schedule import (
    PUBLISHED_LAMBDA,
    kept,
    lambda_for_final_share,
    stage_layers,
)


def _shares(value: Any) -> Any:
    """``lambda`` as a stack writes it: a number in (0, 1] (never a boolean or a string), or a non-empty list
    of them; refused here in one sentence (a union of types would name its branches instead)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("lambda lists no share; give one value, or one per listed layer")
    for share in values:
        which = f" (its {share!r})" if isinstance(value, list) else ""
        if isinstance(share, bool) or not isinstance(share, (int, float)):
            raise ValueError(f"lambda is a number in (0, 1] or a list of them{which}")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"lambda is a share in (0, 1]{which}")
    return value


class PyramidDropConfig(MethodConfig):
    """Parameters of ``pyramiddrop`` (the stage's ``layers`` are the stage boundaries: tokens are dropped
    before each listed layer, ranked with that layer's own attention)."""

    # ``lambda`` is a Python keyword: the field is ``lambda_``, written ``lambda`` in stacks (either name is read)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    lambda_: Annotated[float | list[float], BeforeValidator(_shares)] = Field(
        PUBLISHED_LAMBDA, alias="lambda", description=(
            "Share of the visual tokens each stage keeps of those the stage before left, in (0, 1]: one value for "
            "every stage (published: 0.5, i.e. 576 -> 288 -> 144 -> 72 on LLaVA-1.5), or one per listed layer."))


class PyramidDrop(Method):
    """PyramidDrop (Xing et al., CVPR 2025): staged, training-free dropping inside the decoder."""

    name = "pyramiddrop"
    Config = PyramidDropConfig
    points = ("decoder_layer",)
    description = ("At a few decoder layers, keep lambda of the visual tokens by the last instruction token's "
                   "attention (PyramidDrop).")
    approach = "attention"
    paper = "Xing et al., CVPR 2025"
    year = 2025
    identity_params = {"lambda": 1.0}
    example_params = {"lambda": PUBLISHED_LAMBDA}
    config: PyramidDropConfig

    @classmethod
    def default_layers(cls, config: MethodConfig, num_layers: int) -> tuple[int, ...]:
        """The published boundaries (before layers 8, 16, 24 of 32) scaled to the depth:
        ``floor(l * L / 32 + 0.5)``; 28 layers: 7, 14, 21; the 4-layer test models: 1, 2, 3."""
        return stage_layers(num_layers)

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict[str, Any]:
        """The single lambda whose three published stages leave about ``keep_ratio`` of the visual tokens
        after the last one (``keep_ratio ** (1/3)``; 0.125 gives the published 0.5)."""
        return {"lambda": lambda_for_final_share(keep_ratio)}

    def layers_problem(self) -> str | None:
        shares = self.config.lambda_
        if isinstance(shares, list) and self.layers and len(shares) != len(self.layers):
            return (f"params.lambda lists {len(shares)} shares for {len(self.layers)} stage layers "
                    f"({list(self.layers)}); give one per layer, or a single lambda")
        return None

    def share_at(self, layer: int) -> float:
        """The share the stage keeps before ``layer`` (one of its layers)."""
        shares = self.config.lambda_
        if not isinstance(shares, list):
            return float(shares)
        if layer not in self.layers:
            raise ValueError(f"pyramiddrop has no stage at layer {layer} (its layers: {list(self.layers)})")
        return float(shares[self.layers.index(layer)])

    # --- counts ---------------------------------------------------------------------------------------

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        """The promise at the stage's first layer (each layer's: :meth:`promised_count_at`)."""
        first = self.layers[0] if self.layers else None
        if first is None:
            shares = self.config.lambda_
            share = float(shares[0] if isinstance(shares, list) else shares)
            return torch.tensor([kept(int(n), share) for n in torch.as_tensor(tokens_in).reshape(-1).tolist()],
                                dtype=torch.long)
        return self.promised_count_at(tokens_in, first)

    def promised_count_at(self, tokens_in: torch.Tensor, layer: int) -> torch.Tensor:
        """Per sample: ``int(n * lambda)`` of the ``n`` visual tokens entering ``layer`` (at least one)."""
        share = self.share_at(layer)
        return torch.tensor([kept(int(n), share) for n in torch.as_tensor(tokens_in).reshape(-1).tolist()],
                            dtype=torch.long)

    # --- the stage ------------------------------------------------------------------------------------

    @hookimpl
    def decoder_layer(self, context: DecoderContext) -> Keep | None:
        share = self.share_at(context.layer_index)
        counts = list(context.sequence.visual_lengths)  # host numbers: nothing is read from the device
        keep = [kept(count, share) for count in counts]
        if keep == counts:
            return None  # every sample keeps all it has: no score needed
        # the last instruction token's attention inside THIS layer (the released code scores with the
        # input norm and q/k of the layer the reduced set is about to enter), heads averaged, fp32 softmax
        scores = context.scorer.attention_to_tokens(query="last", layer="current")
        return Keep(topk_mask(scores, context.is_visual, torch.tensor(keep, device=scores.device)))

    def scoring_flops(self, item: Any) -> float:
        """The scorer at this layer: q of the last prompt token, k of every token entering the layer, the
        one row of logits over every head (nothing where no token is dropped)."""
        visual = item.tokens - item.text_tokens
        if kept(visual, self.share_at(item.layer)) >= visual:
            return 0.0
        return scorer_flops(item.decoder, 1, item.tokens)
