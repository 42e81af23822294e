"""InternVL's tiny test model: InternViT (2 layers, width 32, a class token), 0.5 pixel shuffle, the
LayerNorm + MLP projector and a Qwen2 decoder (GQA). A tile is 64 pixels of 8-pixel patches: 8x8 patches,
4x4 = 16 visual tokens. Images are tiles as the processor cuts them (crops, then a thumbnail when there is
more than one crop), given as token counts only: one batch holds images of different tile counts."""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from tokenpress.families.testbed import (
    PAD_TOKEN_ID,
    Family,
    Prompt,
    cached_model,
    pad_rows,
    sample_prompts,
)

INTERNVL_IMAGE_START, INTERNVL_IMAGE_END, INTERNVL_IMAGE_TOKEN_ID = 148, 149, 150
INTERNVL_VOCAB_SIZE = 160
TILE, PATCH = 64, 8


def internvl_config(attn_implementation: str = "eager", tile: int = TILE, qk_norm: bool = False,
                    text_model: str = "qwen2", feature_layer: int = -1, downsample_ratio: float = 0.5,
                    patch: int = PATCH) -> InternVLConfig:
    """The tiny InternVL's config (``text_model``: ``"qwen2"``, or ``"qwen3"`` for a text model with q/k norms)."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": tile, "patch_size": patch, "use_qk_norm": qk_norm}
    text = {"model_type": text_model, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": INTERNVL_VOCAB_SIZE,
            "max_position_embeddings": 4096, "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1, "eos_token_id": 2}
    if text_model == "qwen3":
        text["head_dim"] = 16
    units = (tile // patch) ** 2 * downsample_ratio ** 2
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=INTERNVL_IMAGE_TOKEN_ID,
                            image_seq_length=int(units), downsample_ratio=downsample_ratio,
                            vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    return config


def tiny_internvl(attn_implementation: str = "eager", seed: int = 0, **options: Any) -> Any:
    """A tiny InternVL (``options``: see :func:`internvl_config`). The class token, the position embeddings
    and the layer scales, initialised to zero / 0.1, are drawn at random so that they matter."""
    torch.manual_seed(seed)
    config = internvl_config(attn_implementation, **options)
    model = InternVLForConditionalGeneration(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.uniform_(0.5, 1.5)
            layer.lambda_2.uniform_(0.5, 1.5)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    return model.eval()


def _first(size: Any) -> int:
    return int(size) if isinstance(size, int) else int(size[0])


def tile_size(model: Any) -> int:
    """The side of a tile in pixels (the vision config's square ``image_size``)."""
    return _first(model.config.vision_config.image_size)


def tokens_per_tile(model: Any) -> int:
    """Visual tokens of one tile: its patches per side, halved by the pixel shuffle, squared."""
    side = tile_size(model) // _first(model.config.vision_config.patch_size)
    return int(side * side * model.config.downsample_ratio ** 2)


def image_placeholders(model: Any, tiles: int) -> list[int]:
    """``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``, as InternVL's processor writes it."""
    return [INTERNVL_IMAGE_START] + [INTERNVL_IMAGE_TOKEN_ID] * tokens_per_tile(model) * tiles + [INTERNVL_IMAGE_END]


def internvl_batch(model: Any, prompts: list[Prompt], tiles: list[list[int]] | list[int] | None = None,
                   padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts``: ``tiles[i]`` is sample i's images, each its number of tiles (an int: one image;
    default: one image of 3 tiles, two crops and a thumbnail), between the prompt's text; random pixels."""
    tiles = tiles if tiles is not None else [3] * len(prompts)
    rows, total = [], 0
    for prompt, images in zip(prompts, tiles, strict=True):
        images = [images] if isinstance(images, int) else list(images)
        row = list(prompt.before)
        for index, count in enumerate(images):
            row += image_placeholders(model, count) + ([10 + index] if index + 1 < len(images) else [])
            total += count
        rows.append(row + list(prompt.after))
    batch = pad_rows(rows, padding_side)
    tile = tile_size(model)
    generator = torch.Generator().manual_seed(seed)
    batch["pixel_values"] = torch.randn(total, 3, tile, tile, generator=generator)
    return batch


def select_internvl_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One sample of an InternVL batch, padding removed: its tiles found from the placeholders (every tile
    holds as many as the batch's placeholders divided by its tiles)."""
    keep = batch["attention_mask"][index].bool()
    placeholders = (batch["input_ids"] == INTERNVL_IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    per_tile = int(placeholders.sum()) // batch["pixel_values"].shape[0]
    start = int(placeholders[:index].sum()) // per_tile
    count = int(placeholders[index].sum()) // per_tile
    return {
        "input_ids": batch["input_ids"][index][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][index][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][start:start + count],
    }


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return internvl_batch(model, prompts, padding_side=padding_side, seed=seed)


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    counts = [5, 1, 3, 4]  # 2x2 crops + thumbnail, one tile, 2x1 + thumbnail, 3x1 + thumbnail
    return internvl_batch(model, prompts, tiles=[counts[i % len(counts)] for i in range(len(prompts))])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    tile = (64, 128, 256)[step]  # one tile of (tile / 16)^2 units: 16, 64, 256 visual tokens

    model = cached_model(("internvl-scaled", tile), lambda: tiny_internvl("sdpa", tile=tile))
    return model, internvl_batch(model, sample_prompts(1), tiles=[1])


INTERNVL = Family("internvl", tiny_internvl, _batch, select_internvl_rows, _mixed, scaled=_scaled)
