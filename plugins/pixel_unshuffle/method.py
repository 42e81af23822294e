"""The ``pixel_unshuffle`` stage (at ``projector``): r x r windows of the encoder's patch grid become
one token each (their features concatenated, r*r times wider), and the method's own two-layer MLP
maps that to the LLM's width, replacing the model's projector. The MLP is fitted with
``tokenpress fit``; unfitted it is a seeded random initialisation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from tokenpress import Method, StageContext, TokenState, WeightedConfig, hookimpl
from tokenpress.core.errors import InputError
from tokenpress.core.flops import StageShape
from tokenpress.core.weights import projector_copy, seeded_mlp
from tokenpress_plugins.pixel_unshuffle.grid import unshuffle, unshuffled_size

#: The largest window side: r x r patches become one token.
MAX_RATIO = 8


class PixelUnshuffleConfig(WeightedConfig):
    """Parameters of ``pixel_unshuffle``."""

    ratio: int = Field(2, ge=2, le=MAX_RATIO,
                       description="Window side r: r x r patches become one token (1/r^2 of them).")
    hidden: int | None = Field(None, ge=1, description="Width of the MLP's hidden layer (default: the LLM's width).")
    seed: int = Field(0, description="Seed of the MLP's initial weights (init: random).")
    init: Literal["auto", "projector", "random"] = Field(
        "auto", description="projector: start as the model's own projector applied to the mean of each window "
                            "(= 2-D average pooling before the projector), where the projector is a two-layer MLP; "
                            "random: seeded uniform; auto: projector where possible, else random.")


class PixelUnshuffle(Method):
    """Pixel-unshuffle the patch grid and project it with the method's own MLP (InternVL2)."""

    name = "pixel_unshuffle"
    Config = PixelUnshuffleConfig
    points = ("projector",)
    description = "Fold r x r patch windows into one wider token; the method's own MLP projects it (InternVL2)."
    approach = "transform"
    paper = "Chen et al., InternVL 1.5, 2024"
    year = 2024
    identity_params = None  # its own projector: no setting reproduces the model
    replaces_projector = True
    example_params = {"ratio": 2}
    config: PixelUnshuffleConfig

    def build_weights(self, adapter: Any) -> nn.Module:
        encoder_width = adapter.encoder_width()
        llm_width = adapter.text_config.hidden_size
        projector = adapter.projector_mlp() if self.config.init != "random" else None
        if self.config.init == "projector" and projector is None:
            raise InputError("params.init: projector needs a model whose projector is a two-layer MLP on each "
                             "token (LLaVA, LLaVA-NeXT, Qwen2.5-VL's merger); use init: random")
        if projector is not None and self.config.hidden not in (None, projector.first.out_features):
            projector = None  # another hidden width: nothing to copy
        if projector is not None:
            return projector_copy(projector, self.config.ratio ** 2)
        hidden = self.config.hidden or llm_width
        return seeded_mlp(self.config.ratio ** 2 * encoder_width, hidden, llm_width, self.config.seed)

    def weights_shaping(self) -> dict[str, Any]:
        return {"ratio": self.config.ratio, "hidden": self.config.hidden}

    @hookimpl
    def projector(self, tokens: TokenState, context: StageContext) -> TokenState:
        context.require_encoder_space(tokens)
        assert self.weights is not None
        mlp, ratio = self.weights, self.config.ratio
        return tokens.regrid(lambda grid: mlp(unshuffle(grid, ratio)), ratio, space="llm")

    @classmethod
    def params_for_keep(cls, keep_ratio: float, num_layers: int | None = None) -> dict | None:
        return {"ratio": min(MAX_RATIO, max(2, round(keep_ratio ** -0.5)))}

    def expected_grid(self, height: int, width: int) -> tuple[int, int]:
        return unshuffled_size(height, width, self.config.ratio)

    def stage_flops(self, shape: StageShape) -> float:
        """The MLP on each folded token (r*r encoder tokens wide)."""
        hidden = self.config.hidden or shape.llm_width
        copied = self.config.init != "random" and shape.projector_hidden is not None
        if copied and self.config.hidden in (None, shape.projector_hidden):
            hidden = shape.projector_hidden
        unit = self.config.ratio ** 2 * shape.encoder_width
        return 2.0 * shape.tokens_out * (unit * hidden + hidden * shape.llm_width)
