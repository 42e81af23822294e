"""LLaVA-OneVision's FLOPs model: a SigLIP tower (no class token) over every tile and every video frame, the
2-layer MLP projector over every token the prefill projects, one image-newline token per row of the
high-resolution grid (after the anyres_max resize, which the model makes in LLM space), one after a
multi-image prompt's tile and one after a video. The resize and the video pooling are interpolations:
free, like every elementwise operation."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tokenpress.core.errors import UnsupportedModelError
from tokenpress.core.flops import FamilyCosts, FlopsError, ImageCosts, SimulatedRow, vit_block_flops
from tokenpress.core.signals import AttentionReceived, EncoderKeys, Signal
from tokenpress.families.clip import feature_block_count


def anyres_max(aspect_ratio: str) -> int:
    """The tile budget of ``vision_aspect_ratio`` ``"anyres_max_N"`` (N: how many tiles' worth of tokens the
    high-resolution grid may keep before the model resizes it)."""
    found = re.fullmatch(r"anyres_max_(\d+)", str(aspect_ratio))
    if found is None:
        raise UnsupportedModelError(f"tokenpress supports LLaVA-OneVision configs with vision_aspect_ratio "
                                    f"'anyres_max_N', this one has {aspect_ratio!r}")
    return int(found.group(1))


def resized_grid(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The high-resolution grid the model keeps of an unpadded ``height`` x ``width`` grid (tiles of ``side``
    x ``side`` patches): its bilinear resize when the grid holds more than 1.1^2 x ``max_tiles`` tiles' worth
    of tokens (the model's rule, applied in LLM space), else the grid itself."""
    ratio = math.sqrt(height * width / (max_tiles * side ** 2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def pooled_frame(height: int, width: int) -> tuple[int, int]:
    """A video frame's grid after the model's 2x2 bilinear pooling (after the projector)."""
    return -(-height // 2), -(-width // 2)


def unpadded_grid(image_size: tuple[int, int], config: Any) -> tuple[tuple[int, int], torch.Tensor, int, int]:
    """An anyres image's crops ``(rows, columns)``, the cells of the stitched crop grid (raster indices into
    its ``rows * side`` x ``columns * side`` patches) that survive the unpadding to the image's aspect ratio,
    in raster order, and the unpadded grid's height and width."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    crops = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, tile)
    stitched = torch.arange(crops[0] * side * crops[1] * side).view(1, crops[0] * side, crops[1] * side)
    kept = unpad_image(stitched, list(image_size))
    return crops, kept.flatten(), int(kept.shape[1]), int(kept.shape[2])


def image_tiles(config: Any, image_sizes: list[tuple[int, int]], per_sample: list[int] | None) -> list[int]:
    """Tiles the model encodes of each image: the base tile and the crops of its best pinpoint when its
    sample holds one image (or ``batch_num_images`` is not given), else one tile."""
    anyres = [True] * len(image_sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
    if len(anyres) != len(image_sizes):
        raise ValueError(f"batch_num_images counts {len(anyres)} images, image_sizes {len(image_sizes)}")
    tile = config.vision_config.image_size
    return [image_size_to_num_patches(list(size), config.image_grid_pinpoints, tile) if whole else 1
            for size, whole in zip(image_sizes, anyres, strict=True)]


class LlavaOnevisionCosts(FamilyCosts):
    """LLaVA-OneVision's prefill costs: SigLIP over every tile and frame (no class token), the MLP projector,
    newline tokens on the resized high-resolution grid, after a multi-image tile and after a video."""

    model_type = "llava_onevision"
    label = "LLaVA-OneVision"
    class_token = False

    def __init__(self, config: Any) -> None:
        if getattr(config, "vision_feature_select_strategy", "full") != "full":
            raise UnsupportedModelError("tokenpress supports LLaVA-OneVision configs with "
                                        "vision_feature_select_strategy='full', this one has "
                                        f"{config.vision_feature_select_strategy!r}")
        super().__init__(config)
        vision, text = config.vision_config, config.get_text_config()
        self.side = vision.image_size // vision.patch_size
        self.max_tiles = anyres_max(config.vision_aspect_ratio)
        self.hidden, self.heads = vision.hidden_size, vision.num_attention_heads
        self.intermediate, self.layers = vision.intermediate_size, vision.num_hidden_layers
        self.patch_dim = (getattr(vision, "num_channels", 3) or 3) * vision.patch_size ** 2
        feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.projector_in, self.projector_hidden = vision.hidden_size * feature_layers, text.hidden_size
        self._original_high: tuple[int, int] | None = None  # the simulated image's unpadded grid

    # --- the encoder and the projector -----------------------------------------------------------

    def encoder_flops(self, patches: int) -> float:
        """One tile (or frame) of ``patches`` patches through the patch embedding and every block."""
        embed = 2.0 * patches * self.patch_dim * self.hidden
        return embed + self.layers * vit_block_flops(patches, self.hidden, self.intermediate, False, patches * patches)

    def encoder_run_flops(self, attention: list[int], mlp: list[int]) -> float:
        """One tile run block by block with stages inside (no class token): block b's attention over
        ``attention[b]`` tokens, its MLP over ``mlp[b]``; only the blocks that ran."""
        embed = 2.0 * attention[0] * self.patch_dim * self.hidden if attention else 0.0
        blocks = sum(8.0 * n * self.hidden ** 2 + 4.0 * n * n * self.hidden for n in attention)
        return embed + blocks + sum(4.0 * m * self.hidden * self.intermediate for m in mlp)

    def projector_flops(self, tokens: int) -> float:
        return 2.0 * tokens * (self.projector_in * self.projector_hidden + self.projector_hidden ** 2)

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.projector_in, self.decoder.hidden, self.projector_hidden, self.heads

    def feature_blocks(self) -> int | None:
        return feature_block_count(self.config.vision_feature_layer, self.layers)

    def signal_flops(self, request: Signal) -> float:
        tokens, width = self.side ** 2, self.hidden
        if isinstance(request, EncoderKeys):  # every token's k projection
            return 2.0 * width * width * tokens
        if isinstance(request, AttentionReceived):  # every token's q and k projections, every query's logits
            return 2.0 * width * width * 2 * tokens + 2.0 * tokens * tokens * width
        return 0.0

    def encoder_runs(self, projected_per_image: list[int]) -> int:
        return sum(projected // self.side ** 2 for projected in projected_per_image)  # side^2 per tile or frame

    # --- images -----------------------------------------------------------------------------------

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """One image alone in its prompt (anyres): ``image_size`` is its original size, which picks the tiling."""
        if image_size is None:
            raise FlopsError("LLaVA-OneVision's token count depends on the image: give its size (height x width in "
                             "pixels, e.g. --image-size 768x1024)")
        side = self.side
        tiles = image_tiles(self.config, [tuple(image_size)], None)[0]
        _, _, height, width = unpadded_grid(tuple(image_size), self.config)
        self._original_high = (height, width)
        rows = [SimulatedRow((1, side, side), side ** 2),
                SimulatedRow((1, height, width), height * width, high_res=True)]
        # the model encodes and projects every tile, the crops' padding included
        return ImageCosts(rows, tiles * self.encoder_flops(side ** 2), tiles * side ** 2)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        """Every image's tiles and every video's frames through the encoder; what the unmodified model projects
        of each (images, then videos)."""
        runs: list[int] = []
        if inputs.get("pixel_values") is not None:
            if inputs.get("image_sizes") is None:
                raise FlopsError("LLaVA-OneVision FLOPs need the batch's image_sizes")
            sizes = [tuple(int(v) for v in size) for size in inputs["image_sizes"].tolist()]
            per_sample = inputs.get("batch_num_images")
            runs += image_tiles(self.config, sizes, None if per_sample is None else
                                [int(n) for n in per_sample.tolist()])
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            runs += [int(videos.shape[1])] * int(videos.shape[0])
        per_run = self.encoder_flops(self.side ** 2)
        return sum(runs) * per_run, [count * self.side ** 2 for count in runs]

    def rows_after_encoder(self, image: ImageCosts, count: int) -> list[SimulatedRow]:
        raise FlopsError("on LLaVA-OneVision, how many tokens merged inside the encoder survive the unpadding of the "
                         "stitched crops depends on the image; the config-only FLOPs cannot predict it (use the "
                         "measured mode instead)")

    def decoder_visual(self, rows: list[SimulatedRow], stage_label: str | None = None) -> int:
        """The base tile's tokens, and the high-resolution grid's after the model's resize rule, one newline per
        row of it."""
        total = 0
        for row in rows:
            if not row.high_res or row.summary:
                total += row.count
                continue
            if not row.dense:
                raise FlopsError(f"stage {stage_label}: after a selection on LLaVA-OneVision's high-resolution grid "
                                 "the number of image-newline tokens depends on which tokens survive; the "
                                 "config-only FLOPs cannot predict it (use the measured mode instead)")
            height, width = row.grid[1:]
            original = self._original_high
            if original is not None and (height, width) != original and resized_grid(
                    *original, self.side, self.max_tiles) != original:
                raise FlopsError(f"stage {stage_label}: LLaVA-OneVision resizes this image's {original[0]}x"
                                 f"{original[1]} high-resolution grid after its projector, so the grid a re-gridding "
                                 "stage leaves depends on whether it ran before the projector or after it; the "
                                 "config-only FLOPs cannot tell (use the measured mode instead)")
            height, width = resized_grid(height, width, self.side, self.max_tiles)
            total += height * (width + 1)  # one newline per grid row
        return total
