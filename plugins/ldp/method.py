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
from tokenpress.errors import CompressionError
from tokenpress.weights import projector_copy
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
    identity_params = None
    example_params = {"stride": 2}
    config: LDPConfig

    def build_weights(self, adapter: Any) -> nn.Module:
        llm_width = adapter.text_config.hidden_size
        projector = adapter.projector_mlp()
        if projector is not None and projector.second.out_features == llm_width:
            mlp = projector_copy(projector)  # start as the model's own projector
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            mlp = nn.Sequential(nn.Linear(adapter.encoder_width(), llm_width), nn.GELU(),
                                nn.Linear(llm_width, llm_width))
            with torch.no_grad():
                for layer in (mlp[0], mlp[2]):
                    bound = layer.in_features ** -0.5
                    layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                    layer.bias.zero_()
        with torch.random.fork_rng():  # the convolutions' default initialisation, reproducible, global RNG untouched
            torch.manual_seed(self.config.seed)
            return LDPModule(mlp, llm_width, self.config.stride)

    def weights_shaping(self) -> dict[str, Any]:
        return {"stride": self.config.stride}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        if tokens.space != "encoder":
            raise CompressionError(f"{context.stage.label()}: ldp replaces the projector and needs tokens in "
                                   "encoder space; put it before any stage that projects them")
        assert self.weights is not None
        return tokens.regrid(self.weights, self.config.stride, space="llm")

    @classmethod
    def params_for_keep(cls, keep_ratio: float) -> dict | None:
        return {"stride": min(4, max(2, round(keep_ratio ** -0.5)))}

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.config.stride), -(-width // self.config.stride)
