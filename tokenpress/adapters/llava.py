"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): CLIP-style encoder, MLP projector,
Llama-style decoder, one run of ``image_token_id`` placeholders per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenpress.adapters.base import ModelAdapter, ProjectorMLP
from tokenpress.errors import UnsupportedModelError
from tokenpress.flops import FamilyCosts, ImageCosts, SimulatedRow, llava_shapes
from tokenpress.signals import ClsAttention, EncoderKeys, Signal
from tokenpress.tokens import TokenState


def cls_attention(encoder_layer: nn.Module, layer_input: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """Attention the CLS token (slot 0) pays to every patch inside a CLIP-style encoder layer.

    Recomputed from the layer's own norm and q/k projections for the one CLS row: (I, N) over the
    patches (CLS column removed); ``heads="mean"`` averages the layer's per-head softmax,
    ``heads="full"`` is one head over the full width (scale 1/sqrt(C)). No N x N matrix is formed.
    """
    attention = encoder_layer.self_attn
    normed = encoder_layer.layer_norm1(layer_input)
    images, length, width = normed.shape
    count, head_dim, scale = ((attention.num_heads, attention.head_dim, attention.scale) if heads == "mean"
                              else (1, width, width ** -0.5))
    query = attention.q_proj(normed[:, :1]).view(images, 1, count, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(images, length, count, head_dim).transpose(1, 2)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, 1:]


def clip_signals(layers: nn.ModuleList, hidden_states: tuple[torch.Tensor, ...],
                 requests: list[Signal]) -> dict[Signal, torch.Tensor]:
    """Each requested signal of a CLIP-style encoder run (``hidden_states[l]`` enters layer l, the
    CLS token at slot 0): per tile, over its patches (CLS removed)."""
    found: dict[Signal, torch.Tensor] = {}
    for request in dict.fromkeys(requests):  # each distinct request once
        layer = request.layer % len(layers)
        if isinstance(request, ClsAttention):
            found[request] = cls_attention(layers[layer], hidden_states[layer], request.heads)
        elif isinstance(request, EncoderKeys):
            block = layers[layer]
            keys = block.self_attn.k_proj(block.layer_norm1(hidden_states[layer]))[:, 1:]
            if request.heads == "mean":
                keys = keys.unflatten(-1, (block.self_attn.num_heads, -1)).mean(-2)
            found[request] = keys
    return found


class LlavaCosts(FamilyCosts):
    """LLaVA-1.5's prefill costs: a CLIP-style encoder over one tile, the 2-layer MLP projector."""

    model_type = "llava"
    label = "LLaVA-1.5"

    def __init__(self, config: Any) -> None:
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("tokenpress supports LLaVA configs with vision_feature_select_strategy="
                                        f"'default', this one has {config.vision_feature_select_strategy!r}")
        super().__init__(config)
        self.shape = llava_shapes(config)[0]
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """Every image is resized to the encoder's size: ``image_size`` only adds a note."""
        side = self.config.vision_config.image_size
        notes = () if image_size is None else (f"image size ignored: LLaVA-1.5 resizes every image to {side}x{side}",)
        tokens = self.side ** 2
        return ImageCosts([SimulatedRow((1, self.side, self.side), tokens)], self.shape.encoder_flops(tokens), tokens,
                          notes)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        image, images = self.image(None), int(inputs["pixel_values"].shape[0])
        return images * image.encoder, [image.projected] * images

    def projector_flops(self, tokens: int) -> float:
        return self.shape.projector_flops(tokens)

    def widths(self) -> tuple[int, int, int | None]:
        return self.shape.projector_in, self.decoder.hidden, self.shape.projector_hidden

    def signal_flops(self, request: Signal) -> float:
        tokens, width = self.side ** 2 + 1, self.shape.hidden
        if isinstance(request, EncoderKeys):  # every token's k projection
            return 2.0 * width * width * tokens
        if isinstance(request, ClsAttention):
            # the CLS row's q projection, every token's k projection, and the CLS x tokens logits
            return 2.0 * width * width * (1 + tokens) + 2.0 * tokens * width
        return 0.0


class LlavaAdapter(ModelAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    family = "llava"
    signals = ("cls_attention", "keys")
    cost_model = LlavaCosts
    test_family = "tokenpress.testing.families:LLAVA"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava" and hasattr(model, "model")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"the llava adapter needs vision_feature_select_strategy='default' (patch grid without CLS), "
                f"this model has {config.vision_feature_select_strategy!r}"
            )
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (1, side, side)

    def inner_module(self) -> nn.Module:
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def _encoder_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def num_encoder_layers(self) -> int:
        return len(self._encoder_layers())

    def encode_images(self, inputs: dict[str, Any],
                      requests: list[Signal]) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        pixel_values = inputs["pixel_values"]
        config = self.model.config
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden_states = outputs.hidden_states
        feature_layer = config.vision_feature_layer
        if isinstance(feature_layer, int):
            features = hidden_states[feature_layer][:, 1:]
        else:
            features = torch.cat([hidden_states[i][:, 1:] for i in feature_layer], dim=-1)
        tokens = TokenState.from_dense(features, self.grid)
        return tokens, clip_signals(self._encoder_layers(), hidden_states, requests)

    def encoder_width(self) -> int:
        return int(self.model.model.multi_modal_projector.linear_1.in_features)

    def projector_mlp(self) -> ProjectorMLP | None:
        projector = self.model.model.multi_modal_projector
        first, act, second = (getattr(projector, name, None) for name in ("linear_1", "act", "linear_2"))
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and act is not None):
            return None
        return ProjectorMLP(first, act, second)

    def project(self, tokens: TokenState) -> TokenState:
        projector = self.model.model.multi_modal_projector
        return tokens.to_space(projector(tokens.embeddings), "llm")
