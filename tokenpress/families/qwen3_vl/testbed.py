"""Qwen3-VL's tiny test models: a ViT (3 blocks, patch 8, full attention per image) with its 2x2 merger and two
DeepStack mergers (fed by blocks 0 and 1, added after decoder layers 0 and 1), and an interleaved M-RoPE decoder
(4 layers, GQA, q/k norms); the MoE variant routes every decoder layer's tokens to 2 of 4 experts. An 8x8-patch
image gives 16 visual tokens, and images may differ in size."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from tokenpress.families.qwen2_5_vl.testbed import (
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END,
    QWEN_VISION_START,
    qwen_batch,
    select_qwen_rows,
)
from tokenpress.families.testbed import PAD_TOKEN_ID, Family, Prompt, sample_prompts, session_model


def tiny_qwen3_vl(attn_implementation: str = "eager", seed: int = 0, moe: bool = False) -> Any:
    """A Qwen3-VL-shaped model (``moe``: Qwen3-VL-MoE's, every decoder layer sparse)."""

    torch.manual_seed(seed)
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 160, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_TOKEN_ID}
    if moe:
        text.update({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "decoder_sparse_step": 1, "mlp_only_layers": []})
    vision = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 8,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                                 else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_TOKEN_ID,
                          video_token_id=QWEN_VIDEO_TOKEN_ID, vision_start_token_id=QWEN_VISION_START,
                          vision_end_token_id=QWEN_VISION_END)
    config._attn_implementation = attn_implementation
    model = model_class(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
        if moe:
            # the experts one by one (transformers' default grouped_mm kernel is invisible to torch's FLOP
            # counter, which the FLOPs checks compare with; the arithmetic is the same)
            sub._experts_implementation = "eager"
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    # random weights could generate a vision token, which a real model never does (and a cache of a compressed
    # prompt refuses)
    model.generation_config.suppress_tokens = [QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_TOKEN_ID,
                                               QWEN_VIDEO_TOKEN_ID]
    return model.eval()


def tiny_qwen3_vl_moe(attn_implementation: str = "eager", seed: int = 0) -> Any:
    return tiny_qwen3_vl(attn_implementation, seed, moe=True)


def video_batch(model: Any, prompt: Prompt, frames: int = 2, grid: tuple[int, int] = (8, 8),
                seed: int = 0) -> dict[str, torch.Tensor]:
    """One video of ``frames`` temporal slices (each ``grid`` patches) in one prompt, as Qwen3-VL's processor
    writes it: each slice its own run ``<timestamp> <vision_start> <video_pad> x (h w / 4) <vision_end>``
    (the timestamps are text: ids 30, 31, ...)."""
    vision = model.config.vision_config
    height, width = grid
    units = (height // vision.spatial_merge_size) * (width // vision.spatial_merge_size)
    row = list(prompt.before)
    for frame in range(frames):
        row += [30 + frame, QWEN_VISION_START] + [QWEN_VIDEO_TOKEN_ID] * units + [QWEN_VISION_END]
    row += prompt.after
    ids = torch.tensor([row])
    generator = torch.Generator().manual_seed(seed)
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(frames * height * width, patch_dim, generator=generator),
            "video_grid_thw": torch.tensor([[frames, height, width]]),
            "mm_token_type_ids": (ids == QWEN_VIDEO_TOKEN_ID).int() * 2}


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return qwen_batch(model, prompts, padding_side=padding_side, seed=seed)


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    sizes = [(8, 8), (8, 12), (12, 8), (4, 8)]
    return qwen_batch(model, prompts, grids=[sizes[i % len(sizes)] for i in range(len(prompts))])


def _scaled_of(family: Family, step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    grid = ((8, 8), (16, 16), (32, 32))[step]  # 2x2 merge: 16, 64, 256 visual tokens
    model = session_model(family)
    return model, qwen_batch(model, sample_prompts(1), grids=[grid])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    return _scaled_of(QWEN3_VL, step)


def _scaled_moe(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    return _scaled_of(QWEN3_VL_MOE, step)


QWEN3_VL = Family("qwen3-vl", tiny_qwen3_vl, _batch, select_qwen_rows, _mixed, scaled=_scaled)
QWEN3_VL_MOE = Family("qwen3-vl-moe", tiny_qwen3_vl_moe, _batch, select_qwen_rows, _mixed, scaled=_scaled_moe)
