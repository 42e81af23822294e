"""Qwen2.5-VL's FLOPs model: the window-attention ViT over the image's patches, the 2x2 patch merger, and the
encoder signals (the attention each patch receives: its q x k logits)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenpress.core.flops import FamilyCosts, FlopsError, ImageCosts, SimulatedRow, vit_block_flops
from tokenpress.core.signals import AttentionReceived, Signal


def qwen_vision_flops(vision: Any, frames: int, grid_h: int, grid_w: int) -> float:
    """Qwen2.5-VL's window-attention ViT over one image/video of (frames, grid_h, grid_w) patches (no merger)."""
    hidden, merge = vision.hidden_size, vision.spatial_merge_size
    patches = frames * grid_h * grid_w
    channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", None) or 3
    embed = 2.0 * patches * channels * vision.temporal_patch_size * vision.patch_size ** 2 * hidden
    window = vision.window_size // merge // vision.patch_size
    unit_h, unit_w = grid_h // merge, grid_w // merge
    spans_h = [min(window, unit_h - start) for start in range(0, unit_h, window)]
    spans_w = [min(window, unit_w - start) for start in range(0, unit_w, window)]
    windowed = frames * sum((a * b * merge ** 2) ** 2 for a in spans_h for b in spans_w)
    full = frames * (grid_h * grid_w) ** 2
    total = embed
    for block in range(vision.depth):
        keys = full if block in vision.fullatt_block_indexes else windowed
        total += vit_block_flops(patches, hidden, vision.intermediate_size, True, keys)
    return total


class Qwen2_5_VLCosts(FamilyCosts):
    """Qwen2.5-VL's prefill costs: the window-attention ViT over the image's patches, the 2x2 patch merger.

    Encoder signals: the keys are read as the encoder computes them (free); the attention each patch
    receives costs its logits, 2 n^2 C for a frame of n patches whatever the block (a windowed block's
    frame is computed whole, the other windows masked: see ``received_by_patch``). That is the only
    signal work and it is quadratic in each frame's patches, so :meth:`signal_flops` is the cost of one
    (query, key) pair of patches and :meth:`encoder_runs` counts the pairs: sum over frames of n^2."""

    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    class_token = False  # a class-token request made with class_free="received" is the attention received

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.vision = config.vision_config
        self.merge = self.vision.spatial_merge_size
        self.unit = self.vision.hidden_size * self.merge ** 2  # a merged cell: merge x merge patches, concatenated

    def vision_flops(self, frames: int, grid_h: int, grid_w: int) -> float:
        """The ViT over one image/video of (frames, grid_h, grid_w) patches, without the model's merger."""
        return qwen_vision_flops(self.vision, frames, grid_h, grid_w)

    def image(self, image_size: tuple[int, int] | None) -> ImageCosts:
        """``image_size`` is the size after the processor's resize."""
        patch = self.vision.patch_size
        factor = patch * self.merge
        if image_size is None:
            raise FlopsError(f"{self.label}'s token count depends on the image: give its size after the processor's "
                             f"resize (height x width in pixels, multiples of {factor}, e.g. --image-size 448x448)")
        height, width = image_size
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise FlopsError(f"{self.label} image sizes are multiples of {factor} pixels (patch {patch} x "
                             f"merge {self.merge}); got {height}x{width}")
        grid_h, grid_w = height // patch, width // patch
        rows, cols = grid_h // self.merge, grid_w // self.merge
        return ImageCosts([SimulatedRow((1, rows, cols), rows * cols)], self.vision_flops(1, grid_h, grid_w),
                          rows * cols)

    def batch_encoder(self, inputs: Mapping[str, Any]) -> tuple[float, list[int]]:
        """The encoder over every image and video, and the units of each image and of each video frame."""
        grids = [inputs[key] for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None]
        if not grids:
            raise FlopsError(f"{self.label} FLOPs need the batch's image_grid_thw (or video_grid_thw)")
        rows = [[int(v) for v in row] for grid in grids for row in grid]
        return (sum(self.vision_flops(t, h, w) for t, h, w in rows),
                [(h // self.merge) * (w // self.merge) for t, h, w in rows for _ in range(t)])

    def projector_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.unit * (self.unit + self.vision.out_hidden_size)

    def widths(self) -> tuple[int, int, int | None, int]:
        return self.unit, self.decoder.hidden, self.unit, self.vision.num_heads

    def signal_flops(self, request: Signal) -> float:
        """Per (query, key) pair of patches of a frame (see the class): the attention received's logits."""
        return 2.0 * self.vision.hidden_size if isinstance(request, AttentionReceived) else 0.0

    def encoder_runs(self, projected_per_image: list[int]) -> int:
        """(Query, key) pairs of patches within each frame (each entry: the units of an image or a frame)."""
        return sum((units * self.merge ** 2) ** 2 for units in projected_per_image)
