"""Gemma 3's FLOPs model: the SigLIP tower over every image (and every pan-and-scan crop) at its fixed size, the
parameter-free average pool (free), the projector (an RMSNorm, free, and one matrix product per pooled token),
and a decoder whose sliding layers cost what full ones do (eager and SDPA compute every query x key product
and mask the window out)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenpress.core.flops import FamilyCosts, FlopsError, ImageCosts, SimulatedRow, vit_block_flops
from tokenpress.core.signals import AttentionReceived, EncoderKeys, Signal


def siglip_flops(vision: Any) -> float:
    """One image through a SigLIP tower: the patch embedding, every block over all its patches (no class token),
    and the attention-pooling head where the tower has one (Gemma 3's checkpoints do not)."""
    hidden, patches = vision.hidden_size, (vision.image_size // vision.patch_size) ** 2
    channels = getattr(vision, "num_channels", 3) or 3
    total = 2.0 * patches * channels * vision.patch_size ** 2 * hidden
    total += vision.num_hidden_layers * vit_block_flops(patches, hidden, vision.intermediate_size, False,
                                                        patches * patches)
    if getattr(vision, "vision_use_head", False):  # one probe query: its q, the patches' k and v, out, MLP
        total += 2.0 * hidden * hidden * (2 + 2 * patches) + 4.0 * patches * hidden
        total += 4.0 * hidden * vision.intermediate_size
    return total


class Gemma3Costs(FamilyCosts):
    """Gemma 3's prefill costs: SigLIP over each image at its fixed size, the pooled projector's matrix product."""

    model_type = "gemma3"
    label = "Gemma 3"
    qk_norm = True
    class_token = False  # SigLIP: a class-token request is served as the attention each patch receives

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vision = config.vision_config
        self.patches = (self.vision.image_size // self.vision.patch_size) ** 2
        self.tokens = int(config.mm_tokens_per_image)
        self.side = int(round(self.tokens ** 0.5))
        self.encoder = siglip_flops(self.vision)

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """Every image (and every pan-and-scan crop, each an image of its own) is resized to the encoder's size:
        ``image_size`` only adds a note."""
        side = self.vision.image_size
        notes = () if image_size is None else (
            f"image size ignored: Gemma 3 resizes every image (and every pan-and-scan crop) to {side}x{side}",)
        return ImageCosts([SimulatedRow((1, self.side, self.side), self.tokens)], self.encoder, self.tokens, notes)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            raise FlopsError("Gemma 3 FLOPs need the batch's pixel_values")
        images = int(pixel_values.shape[0])
        return images * self.encoder, [self.tokens] * images

    def projector_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.vision.hidden_size * self.decoder.hidden

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.vision.hidden_size, self.decoder.hidden, None, self.vision.num_attention_heads

    def signal_flops(self, request: Signal) -> float:
        """Signals are computed over the encoder's patches (then averaged over each pooled cell: free)."""
        patches, width = self.patches, self.vision.hidden_size
        if isinstance(request, EncoderKeys):  # every patch's k projection
            return 2.0 * width * width * patches
        if isinstance(request, AttentionReceived):  # every patch's q and k projections, every query's logits
            return 2.0 * width * width * 2 * patches + 2.0 * patches * patches * width
        return 0.0
