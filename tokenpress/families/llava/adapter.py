"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): CLIP-style encoder, MLP projector,
Llama-style decoder, one run of ``image_token_id`` placeholders per image."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import UnsupportedModelError
from tokenpress.core.signals import Signal
from tokenpress.core.tokens import TokenState
from tokenpress.families.clip import ClipTower, clip_encode_inside, clip_signals
from tokenpress.families.llava.costs import LlavaCosts
from tokenpress.runtime.adapter import ModelAdapter, ProjectorMLP
from tokenpress.runtime.encoder import InsideEncoder


class LlavaAdapter(ClipTower, ModelAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    family = "llava"
    signals = ("cls_attention", "keys", "attention_received")
    cost_model = LlavaCosts
    test_family = "tokenpress.families.llava.testbed:LLAVA"

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

    def encode_images(self, inputs: dict[str, Any], requests: list[Signal],
                      inside: InsideEncoder | None = None) -> tuple[TokenState, dict[Signal, torch.Tensor]]:
        pixel_values = inputs["pixel_values"]
        if inside is not None:
            tokens, found, run = clip_encode_inside(self.vision_tower, pixel_values, self.feature_blocks(), self.grid,
                                                    list(range(pixel_values.shape[0])), requests, inside)
            self.media["encoder_run"] = run
            return tokens, found
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

    def encoder_heads(self) -> int:
        return int(self.model.config.vision_config.num_attention_heads)

    def projector_mlp(self) -> ProjectorMLP | None:
        projector = self.model.model.multi_modal_projector
        first, act, second = (getattr(projector, name, None) for name in ("linear_1", "act", "linear_2"))
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and act is not None):
            return None
        return ProjectorMLP(first, act, second)

    def project(self, tokens: TokenState) -> TokenState:
        projector = self.model.model.multi_modal_projector
        return tokens.to_space(projector(tokens.embeddings), "llm")
