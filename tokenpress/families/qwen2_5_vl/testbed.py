"""Qwen2.5-VL's tiny test model: a window-attention ViT (2 blocks, patch 14) with its 2x2 merger and an
M-RoPE decoder (GQA); an 8x8-patch image gives 16 visual tokens, and images may differ in size."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tokenpress.families.testbed import PAD_TOKEN_ID, Family, Prompt, pad_rows, sample_prompts, session_model

QWEN_IMAGE_TOKEN_ID = 150
QWEN_VIDEO_TOKEN_ID = 151
QWEN_VISION_START, QWEN_VISION_END = 148, 149


def tiny_qwen2_5_vl(attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A Qwen2.5-VL-shaped model: window-attention ViT (2 blocks) + 2x2 merger + M-RoPE decoder (GQA)."""

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 160, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_TOKEN_ID},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=QWEN_IMAGE_TOKEN_ID, video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID)
    config._attn_implementation = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    return model.eval()

def qwen_batch(model: Any, prompts: list[Prompt], grids: list[tuple[int, int]] | None = None,
               padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts``, one image each; ``grids`` gives each image's patch grid (h, w), even sizes."""
    vision = model.config.vision_config
    grids = grids or [(8, 8)] * len(prompts)
    merge = vision.spatial_merge_size
    rows, pixel_chunks = [], []
    generator = torch.Generator().manual_seed(seed)
    for prompt, (height, width) in zip(prompts, grids, strict=True):
        units = (height // merge) * (width // merge)
        rows.append(prompt.before + [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN_ID] * units + [QWEN_VISION_END]
                    + prompt.after)
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        pixel_chunks.append(torch.randn(height * width, patch_dim, generator=generator))
    batch = pad_rows(rows, padding_side)
    batch["pixel_values"] = torch.cat(pixel_chunks)
    batch["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    batch["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IMAGE_TOKEN_ID).int()
    return batch


def select_qwen_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One sample of a Qwen batch (one image per sample), padding removed."""
    keep = batch["attention_mask"][index].bool()
    grids = batch["image_grid_thw"]
    sizes = grids.prod(-1).tolist()
    start = sum(sizes[:index])
    return {
        "input_ids": batch["input_ids"][index][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][index][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][start:start + sizes[index]],
        "image_grid_thw": grids[index:index + 1],
        "mm_token_type_ids": batch["mm_token_type_ids"][index][keep].unsqueeze(0),
    }


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return qwen_batch(model, prompts, padding_side=padding_side, seed=seed)


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    sizes = [(8, 8), (8, 12), (12, 8), (4, 8)]
    return qwen_batch(model, prompts, grids=[sizes[i % len(sizes)] for i in range(len(prompts))])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    grid = ((8, 8), (16, 16), (32, 32))[step]  # 2x2 merge: 16, 64, 256 visual tokens
    model = session_model(QWEN2_5_VL)
    return model, qwen_batch(model, sample_prompts(1), grids=[grid])


QWEN2_5_VL = Family("qwen2.5-vl", tiny_qwen2_5_vl, _batch, select_qwen_rows, _mixed, scaled=_scaled)
