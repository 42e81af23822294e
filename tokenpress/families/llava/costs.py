"""LLaVA-1.5's FLOPs model: a CLIP-style encoder over one tile, the 2-layer MLP projector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenpress.core.errors import UnsupportedModelError
from tokenpress.core.flops import DecoderShape, EncoderShape, FamilyCosts, ImageCosts, SimulatedRow
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, Signal
from tokenpress.families.clip import feature_block_count


def llava_shapes(config: Any) -> tuple[EncoderShape, DecoderShape]:
    """The encoder and decoder shapes of a LLaVA-style config."""
    vision = config.vision_config
    text = config.text_config
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    channels = getattr(vision, "num_channels", 3) or 3
    encoder = EncoderShape(vision.hidden_size, vision.num_attention_heads, vision.intermediate_size,
                           vision.num_hidden_layers, channels * vision.patch_size ** 2,
                           vision.hidden_size * feature_layers, text.hidden_size)
    return encoder, DecoderShape.from_config(text)


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

    def feature_blocks(self) -> int | None:
        return feature_block_count(self.config.vision_feature_layer, self.shape.layers)

    def encoder_run_flops(self, attention: list[int], mlp: list[int]) -> float:
        return self.shape.encoder_run_flops(attention, mlp)

    def rows_after_encoder(self, image: ImageCosts, count: int) -> list[SimulatedRow]:
        grid = image.rows[0].grid
        return [SimulatedRow(grid, count, count == grid[1] * grid[2])]

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.shape.projector_in, self.decoder.hidden, self.shape.projector_hidden, self.shape.heads

    def signal_flops(self, request: Signal) -> float:
        tokens, width = self.side ** 2 + 1, self.shape.hidden
        if isinstance(request, EncoderKeys):  # every token's k projection
            return 2.0 * width * width * tokens
        if isinstance(request, ClsAttention):
            # the CLS row's q projection, every token's k projection, and the CLS x tokens logits
            return 2.0 * width * width * (1 + tokens) + 2.0 * tokens * width
        if isinstance(request, AttentionReceived):  # every token's q and k projections, every query's logits
            return 2.0 * width * width * 2 * tokens + 2.0 * tokens * tokens * width
        return 0.0
