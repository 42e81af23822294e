"""LLaVA-OneVision's tiny test model: a SigLIP tower (2 layers, 32-pixel tiles of 4x4 patches, no class token),
the MLP projector and a Qwen2 decoder (GQA), random weights. Pinpoints 32x32, 32x64, 64x32, 64x64 and
128x128, so one batch holds images of different token counts (a 64x64 image: 88 visual tokens, 48x64: 70)
and a 120x128 image's 16x16 high-resolution grid is resized to 12x12 by the anyres_max_9 rule (172 tokens).
An image of a multi-image prompt is one tile (16 tokens and a newline); a video of t frames has 4 tokens a
frame after the 2x2 pooling and one newline (4t + 1)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from tokenpress.families.llava_onevision.costs import image_tiles, pooled_frame, resized_grid, unpadded_grid
from tokenpress.families.testbed import (
    PAD_TOKEN_ID,
    Family,
    Prompt,
    cached_model,
    pad_rows,
    sample_prompts,
    session_model,
)

ONEVISION_IMAGE_TOKEN_ID = 150
ONEVISION_VIDEO_TOKEN_ID = 151
ONEVISION_VOCAB_SIZE = 160
#: The text token between two images of a multi-image prompt.
IMAGE_SEPARATOR = 9
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [128, 128]]


def tiny_llava_onevision(attn_implementation: str = "eager", seed: int = 0, tile: int = 32,
                         pinpoints: list[list[int]] | None = None) -> Any:
    """A LLaVA-OneVision-shaped model: SigLIP (2 layers, ``tile``-pixel tiles of 8-pixel patches) + MLP
    projector + Qwen2 decoder (4 layers, GQA), anyres_max_9, features from the last encoder layer."""
    torch.manual_seed(seed)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": tile, "patch_size": 8,
              "vision_use_head": False}
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": ONEVISION_VOCAB_SIZE,
            "max_position_embeddings": 4096, "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1, "eos_token_id": 2}
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ONEVISION_IMAGE_TOKEN_ID,
                                  video_token_index=ONEVISION_VIDEO_TOKEN_ID,
                                  image_grid_pinpoints=pinpoints or PINPOINTS, vision_aspect_ratio="anyres_max_9",
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    config._attn_implementation = attn_implementation
    model = LlavaOnevisionForConditionalGeneration(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    never_generate_placeholders(model)
    return model.eval()


def never_generate_placeholders(model: Any) -> None:
    """Zero the output rows of the image and video placeholder ids: their logits are 0 while random weights
    give some other token a positive one, so greedy decoding never picks a placeholder (a trained model does
    not either; a generated placeholder would end a compressed generation, which refuses them)."""
    with torch.no_grad():
        model.lm_head.weight[[ONEVISION_IMAGE_TOKEN_ID, ONEVISION_VIDEO_TOKEN_ID]] = 0.0


def onevision_token_count(model: Any, size: tuple[int, int], multi: bool = False) -> tuple[int, int]:
    """(tiles, visual tokens) the model makes of an image of ``size`` (height, width): alone in its prompt
    (anyres), or one of several (``multi``: one tile and a newline)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    if multi:
        return 1, side * side + 1
    tiles = image_tiles(config, [size], None)[0]
    _, _, height, width = unpadded_grid(size, config)
    height, width = resized_grid(height, width, side, int(config.vision_aspect_ratio.rsplit("_", 1)[1]))
    return tiles, side * side + height * (width + 1)


def onevision_video_count(model: Any, frames: int) -> int:
    """Visual tokens of a video of ``frames`` frames: each frame's grid pooled 2x2, one newline at the end."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    height, width = pooled_frame(side, side)
    return frames * height * width + 1


def onevision_batch(model: Any, prompts: list[Prompt], sizes: list[tuple[int, int]] | None = None,
                    padding_side: str = "left", seed: int = 0, images: list[int] | None = None,
                    videos: list[bool] | None = None, frames: int = 2) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts``: ``images[i]`` images in prompt i (default one; several: a multi-image prompt,
    one tile each, separated by a text token), of the given (height, width) ``sizes`` (all images in order,
    default 64x64), random tiles; a video of ``frames`` frames after them where ``videos[i]``."""
    images = images if images is not None else [1] * len(prompts)
    videos = videos if videos is not None else [False] * len(prompts)
    total = sum(images)
    sizes = sizes or [(64, 64)] * total
    tile = model.config.vision_config.image_size
    rows, counts, image = [], [], 0
    for prompt, count, video in zip(prompts, images, videos, strict=True):
        row = list(prompt.before)
        for k in range(count):
            tiles, tokens = onevision_token_count(model, sizes[image], multi=count > 1)
            counts.append(tiles)
            row += ([IMAGE_SEPARATOR] if k else []) + [ONEVISION_IMAGE_TOKEN_ID] * tokens
            image += 1
        if video:
            row += [ONEVISION_VIDEO_TOKEN_ID] * onevision_video_count(model, frames)
        rows.append(row + prompt.after)
    batch = pad_rows(rows, padding_side)
    generator = torch.Generator().manual_seed(seed)
    if total:
        pixel_values = torch.zeros(total, max(counts), 3, tile, tile)
        for index, count in enumerate(counts):  # the processor pads with zero tiles
            pixel_values[index, :count] = torch.randn(count, 3, tile, tile, generator=generator)
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = torch.tensor(sizes)
        batch["batch_num_images"] = torch.tensor(images)
    if any(videos):
        batch["pixel_values_videos"] = torch.randn(sum(videos), frames, 3, tile, tile, generator=generator)
    return batch


def select_onevision_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Sample ``index`` of a batch (its images, its video), unpadded, as a batch of one."""
    keep = batch["attention_mask"][index].bool()
    out = {"input_ids": batch["input_ids"][index][keep].unsqueeze(0),
           "attention_mask": batch["attention_mask"][index][keep].unsqueeze(0)}
    if "pixel_values" in batch:
        counts = batch["batch_num_images"].tolist()
        start, count = sum(counts[:index]), counts[index]
        if count:
            out["pixel_values"] = batch["pixel_values"][start:start + count]
            out["image_sizes"] = batch["image_sizes"][start:start + count]
            out["batch_num_images"] = torch.tensor([count])
    if "pixel_values_videos" in batch:
        has_video = (batch["input_ids"] == ONEVISION_VIDEO_TOKEN_ID).any(-1).tolist()
        if has_video[index]:
            video = sum(has_video[:index])
            out["pixel_values_videos"] = batch["pixel_values_videos"][video:video + 1]
    return out


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return onevision_batch(model, prompts, padding_side=padding_side, seed=seed)


MIXED_SIZES = [(64, 64), (48, 64), (120, 128), (32, 64)]


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    return onevision_batch(model, prompts, sizes=[MIXED_SIZES[i % len(MIXED_SIZES)] for i in range(len(prompts))])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    tile = (32, 64, 128)[step]  # one pinpoint of one tile: the base tile and one crop, s^2 + s (s + 1) tokens

    def build() -> Any:
        base = session_model(LLAVA_ONEVISION)
        config = copy.deepcopy(base.config)
        config.vision_config.image_size = tile
        config.image_grid_pinpoints = [[tile, tile]]
        torch.manual_seed(0)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = base.generation_config.pad_token_id
        never_generate_placeholders(model)
        return model

    model = cached_model(("llava-onevision-scaled", tile), build)
    return model, onevision_batch(model, sample_prompts(1), sizes=[(tile, tile)])


LLAVA_ONEVISION = Family("llava-onevision", tiny_llava_onevision, _batch, select_onevision_rows, _mixed,
                         flops_tolerance=0.05, scaled=_scaled)
