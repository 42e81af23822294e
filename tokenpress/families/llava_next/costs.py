"""LLaVA-NeXT's FLOPs model: the encoder over every tile, the projector over every tile's tokens, one
image-newline token per row of the unpadded high-resolution grid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tokenpress.core.flops import FlopsError, ImageCosts, SimulatedRow
from tokenpress.families.llava.costs import LlavaCosts


class LlavaNextCosts(LlavaCosts):
    """LLaVA-NeXT's prefill costs: the encoder over every tile, the projector over every tile's tokens,
    and one image-newline token per row of the high-resolution grid."""

    model_type = "llava_next"
    label = "LLaVA-NeXT"

    def encoder_runs(self, projected_per_image: list[int]) -> int:
        return sum(projected // self.side ** 2 for projected in projected_per_image)  # every tile projects side^2

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """``image_size`` is the original size: it picks the tiling."""
        if image_size is None:
            raise FlopsError("LLaVA-NeXT's token count depends on the image: give its size (height x width in "
                             "pixels, e.g. --image-size 672x672)")
        config, side = self.config, self.side
        tile = config.vision_config.image_size
        tiles = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, tile)
        crops_high, crops_wide = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, tile)
        height, width = unpad_image(torch.zeros(1, crops_high * side, crops_wide * side), list(image_size)).shape[1:]
        rows = [SimulatedRow((1, side, side), side ** 2),
                SimulatedRow((1, height, width), height * width, high_res=True)]
        # the model projects every tile before unpadding
        return ImageCosts(rows, tiles * self.shape.encoder_flops(side ** 2), tiles * side ** 2)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        if inputs.get("image_sizes") is None:
            raise FlopsError("LLaVA-NeXT FLOPs need the batch's image_sizes")
        images = [self.image(tuple(int(v) for v in size)) for size in inputs["image_sizes"]]
        return sum(image.encoder for image in images), [image.projected for image in images]

    def rows_after_encoder(self, image: ImageCosts, count: int) -> list[SimulatedRow]:
        raise FlopsError("on LLaVA-NeXT, how many tokens merged inside the encoder survive the unpadding of the "
                         "stitched crops depends on the image; the config-only FLOPs cannot predict it (use the "
                         "measured mode instead)")

    def decoder_visual(self, rows: list[SimulatedRow], stage_label: str | None = None) -> int:
        total = 0
        for row in rows:
            total += row.count
            if row.high_res and not row.summary:
                if not row.dense:
                    raise FlopsError(f"stage {stage_label}: after a selection on LLaVA-NeXT's high-resolution grid "
                                     "the number of image-newline tokens depends on which tokens survive; the "
                                     "config-only FLOPs cannot predict it (use the measured mode instead)")
                total += row.grid[0] * row.grid[1]  # one newline per grid row
        return total
