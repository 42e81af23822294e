"""InternVL's FLOPs model: InternViT (class token, plain MLP) over every tile, the pixel-shuffle projector
(LayerNorm over each 4C unit, then a two-layer MLP) over every unit, and the tiling of InternVL's processor
for the config-only simulation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenpress.core.errors import UnsupportedModelError
from tokenpress.core.flops import EncoderShape, FamilyCosts, FlopsError, ImageCosts, SimulatedRow
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, Signal

#: The tiling of InternVL's processor (``GotOcr2ImageProcessor``) by default: 1 to 12 crops, and a thumbnail
#: of the whole image when there is more than one. The model's config does not hold these.
MIN_TILES, MAX_TILES = 1, 12


def unit_side(config: Any) -> int:
    """Patches per side of one pixel-shuffle unit: ``1 / downsample_ratio`` (2 for InternVL's 0.5)."""
    ratio = float(config.downsample_ratio)
    side = round(1 / ratio) if ratio > 0 else 0
    if side < 1 or abs(side * ratio - 1) > 1e-6:
        raise UnsupportedModelError(f"tokenpress supports InternVL configs whose downsample_ratio is 1/n for a whole "
                                    f"n (0.5: 2x2 patch units), this one has {config.downsample_ratio!r}")
    return side


def tile_grid(height: int, width: int, tile: int, min_tiles: int = MIN_TILES,
              max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """(columns, rows) of crops for an image of ``height`` x ``width`` pixels, as InternVL's processor picks
    them: the arrangement whose columns/rows ratio is nearest the image's width/height, arrangements taken by
    growing crop count; on a tie, the later one while the image covers more than half of its area."""
    candidates = sorted(((columns, rows) for columns in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
                         if min_tiles <= columns * rows <= max_tiles), key=lambda grid: grid[0] * grid[1])
    aspect, area = width / height, width * height
    best, best_difference = (1, 1), float("inf")
    for columns, rows in candidates:
        difference = abs(aspect - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and area > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


class InternVLCosts(FamilyCosts):
    """InternVL's prefill costs: InternViT over every tile (its class token included), the projector over
    every 2x2 unit of every tile."""

    model_type = "internvl"
    label = "InternVL"

    def __init__(self, config: Any) -> None:
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("tokenpress supports InternVL configs with vision_feature_select_strategy="
                                        f"'default', this one has {config.vision_feature_select_strategy!r}")
        super().__init__(config)
        vision = config.vision_config
        self.unit = unit_side(config)
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        tile = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        self.patch, self.tile = patch, tile
        self.side = tile // patch  # patches per side of a tile
        channels = getattr(vision, "num_channels", 3) or 3
        width = vision.hidden_size * self.unit ** 2
        self.shape = EncoderShape(vision.hidden_size, vision.num_attention_heads, vision.intermediate_size,
                                  vision.num_hidden_layers, channels * patch * patch, width,
                                  config.text_config.hidden_size)
        self.per_tile = (self.side // self.unit) ** 2

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """``image_size`` is the original size: it picks the crops (1 to 12 of them, and a thumbnail)."""
        if image_size is None:
            raise FlopsError("InternVL's token count depends on the image: give its size (height x width in pixels, "
                             f"e.g. --image-size {2 * self.tile}x{2 * self.tile}); it picks the tiles")
        columns, rows = tile_grid(*image_size, self.tile)
        crops = columns * rows
        tiles = crops + (1 if crops > 1 else 0)
        cells = self.side // self.unit
        note = (f"tiled as InternVL's processor does by default ({MIN_TILES} to {MAX_TILES} crops of {self.tile}x"
                f"{self.tile} pixels, a thumbnail when more than one): {columns}x{rows} crops"
                + (" + thumbnail" if crops > 1 else "") + f", {tiles} tiles of {self.per_tile} tokens")
        return ImageCosts([SimulatedRow((1, cells, cells), self.per_tile) for _ in range(tiles)],
                          tiles * self.shape.encoder_flops(self.side ** 2), tiles * self.per_tile, (note,))

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        """Every tile of ``pixel_values`` through the encoder; one entry per tile (an encoder run)."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            raise FlopsError("InternVL FLOPs need the batch's pixel_values")
        tiles = int(pixel_values.shape[0])
        height, width = (int(size) for size in pixel_values.shape[-2:])
        patches = (height // self.patch) * (width // self.patch)
        return tiles * self.shape.encoder_flops(patches), [patches // self.unit ** 2] * tiles

    def encoder_runs(self, projected_per_image: list[int]) -> int:
        return sum(-(-projected // self.per_tile) for projected in projected_per_image)

    def projector_flops(self, tokens: int) -> float:
        return self.shape.projector_flops(tokens)

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.shape.projector_in, self.decoder.hidden, self.shape.projector_hidden, self.shape.heads

    def signal_flops(self, request: Signal) -> float:
        """Per tile, on the block's class token and patches (the q/k norms are free)."""
        tokens, width = self.side ** 2 + 1, self.shape.hidden
        if isinstance(request, EncoderKeys):  # every token's k projection
            return 2.0 * width * width * tokens
        if isinstance(request, ClsAttention):  # the class row's q, every token's k, the class x tokens logits
            return 2.0 * width * width * (1 + tokens) + 2.0 * tokens * width
        if isinstance(request, AttentionReceived):  # every token's q and k, every query's logits
            return 2.0 * width * width * 2 * tokens + 2.0 * tokens * tokens * width
        return 0.0
