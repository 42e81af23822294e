"""LLaVA-NeXT's tiny test model: 32-pixel tiles of 4x4 patches, pinpoints 32x64, 64x32 and 64x64, so one
batch holds images of different token counts (a 64x64 image: 88 visual tokens, a 32x64 one: 52)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tokenpress.families.testbed import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    Family,
    Prompt,
    cached_model,
    pad_rows,
    sample_prompts,
    session_model,
)


def tiny_llava_next(attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A LLaVA-NeXT-shaped model: 32-pixel tiles of 4x4 patches, pinpoints 32x64, 64x32, 64x64."""

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=4096,
                       pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    config._attn_implementation = attn_implementation
    model = LlavaNextForConditionalGeneration(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model.eval()


def llava_next_token_count(model: Any, size: tuple[int, int]) -> tuple[int, int]:
    """(tiles, visual tokens) the model makes of an image of ``size`` (height, width)."""
    config = model.config
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    tiles = image_size_to_num_patches(list(size), config.image_grid_pinpoints, tile)
    crops_high, crops_wide = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, tile)
    height, width = unpad_image(torch.zeros(1, crops_high * side, crops_wide * side), list(size)).shape[1:]
    return tiles, side * side + height * (width + 1)


def llava_next_batch(model: Any, prompts: list[Prompt], sizes: list[tuple[int, int]] | None = None,
                     padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts``, one image each of the given (height, width) sizes (random tiles)."""
    sizes = sizes or [(64, 64)] * len(prompts)
    counts = [llava_next_token_count(model, size) for size in sizes]
    rows = [p.before + [model.config.image_token_id] * tokens + p.after
            for p, (_, tokens) in zip(prompts, counts, strict=True)]
    batch = pad_rows(rows, padding_side)
    generator = torch.Generator().manual_seed(seed)
    most = max(tiles for tiles, _ in counts)
    tile = model.config.vision_config.image_size
    batch["pixel_values"] = torch.randn(len(prompts), most, 3, tile, tile, generator=generator)
    batch["image_sizes"] = torch.tensor(sizes)
    return batch


def select_llava_next_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    keep = batch["attention_mask"][index].bool()
    return {
        "input_ids": batch["input_ids"][index][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][index][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][index:index + 1],
        "image_sizes": batch["image_sizes"][index:index + 1],
    }


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return llava_next_batch(model, prompts, padding_side=padding_side, seed=seed)


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    sizes = [(64, 64), (32, 64), (64, 32), (48, 64)]
    return llava_next_batch(model, prompts, sizes=[sizes[i % len(sizes)] for i in range(len(prompts))])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    tile = (32, 64, 128)[step]  # one pinpoint of one tile: base + crop, 2 x (tile / 8)^2 tokens

    def build() -> Any:
        base = session_model(LLAVA_NEXT)
        config = copy.deepcopy(base.config)
        config.vision_config.image_size = tile
        config.image_grid_pinpoints = [[tile, tile]]
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config).eval()
        with torch.no_grad():
            model.model.image_newline.normal_()
        model.generation_config.pad_token_id = base.generation_config.pad_token_id
        return model

    model = cached_model(("llava-next-scaled", tile), build)
    return model, llava_next_batch(model, sample_prompts(1), sizes=[(tile, tile)])


LLAVA_NEXT = Family("llava-next", tiny_llava_next, _batch, select_llava_next_rows, _mixed, flops_tolerance=0.05,
                    scaled=_scaled)
