"""The ``ldp`` stage (at ``projector``): MobileVLM's lightweight downsample projector. Pointwise
layers map each encoder token to the LLM's width, a depthwise convolution mixes neighbours, and a
strided depthwise convolution downsamples the grid (stride 2: a quarter of the tokens). It replaces
the model's projector; ``tokenpress fit`` trains it."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tokenpress import Method, StageContext, TokenState, WeightedConfig, hookimpl
from tokenpress.core.flops import StageShape
from tokenpress.core.weights import starting_projector
from tokenpress_plugins.ldp.projector import LDPModule


class LDPConfig(WeightedConfig):
    """Parameters of ``ldp``."""

    stride: int = Field(2, ge=2, le=4, description="Downsampling stride per side (2: a quarter of the tokens).")
    seed: int = Field(0, description="Seed of the initial pointwise MLP where the model's projector is not one.")


class LDP(Method):
    """MobileVLM's LDP: pointwise MLP, depthwise mixing, strided depthwise downsampling."""

    name = "ldp"
    Config = LDPConfig
    points = ("projector",)
    description = "MobileVLM's lightweight downsample projector: pointwise + depthwise convs, stride 2."
    approach = "transform"
    paper = "Chu et al., MobileVLM, 2023"
    year = 2023
    identity_params = None
    example_params = {"stride": 2}
    replaces_projector = True
    config: LDPConfig

    def build_weights(self, adapter: Any) -> nn.Module:
        mlp = starting_projector(adapter, self.config.seed)
        with torch.random.fork_rng():  # the convolutions' default initialisation, reproducible, global RNG untouched
            torch.manual_seed(self.config.seed)
            return LDPModule(mlp, adapter.text_config.hidden_size, self.config.stride)

    def weights_shaping(self) -> dict[str, Any]:
        return {"stride": self.config.stride}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        context.require_encoder_space(tokens)
        assert self.weights is not None
        return tokens.regrid(self.weights, self.config.stride, space="llm")

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict | None:
        return {"stride": min(4, max(2, round(keep_ratio ** -0.5)))}

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.config.stride), -(-width // self.config.stride)

    def stage_flops(self, shape: StageShape) -> float:
        """The pointwise MLP and the 3x3 depthwise block on every token, the strided block on the output."""
        hidden = shape.projector_hidden or shape.llm_width
        width, kernel = shape.llm_width, 2 * self.config.stride - 1
        pointwise = 2.0 * shape.tokens_in * (shape.encoder_width * hidden + hidden * width)
        mix = 2.0 * shape.tokens_in * (width * 9 + width * width)
        down = 2.0 * shape.tokens_out * (width * kernel ** 2 + width * width)
        return pointwise + mix + down
