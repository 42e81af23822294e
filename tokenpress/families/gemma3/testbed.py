"""Gemma 3's tiny test model: a SigLIP tower (2 layers, 32-pixel images of 4-pixel patches: 8x8 patches), the
average-pooling projector (2x2 cells: 16 tokens per image) and a Gemma 3 decoder of sliding and full layers
(window 8, GQA, q/k norms, scaled text embeddings). Every image - and every pan-and-scan crop - is its own span
of 16 placeholders between ``<start_of_image>`` and ``<end_of_image>``, so a batch whose samples hold different
numbers of pictures (an image and its crops) holds different visual token counts."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from tokenpress.families.testbed import PAD_TOKEN_ID, Family, Prompt, cached_model, pad_rows, sample_prompts

GEMMA_VOCAB_SIZE = 160
GEMMA_BOI, GEMMA_EOI, GEMMA_IMAGE_TOKEN_ID = 148, 149, 150  # <start_of_image>, <end_of_image>, <image_soft_token>
GEMMA_NEWLINES = 108  # stands for the processor's "\n\n" around each image
GEMMA_CROP_TEXT = 109  # stands for the text the processor puts between an image and its crops
GEMMA_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")


def tiny_gemma3(attn_implementation: str = "eager", seed: int = 0, image_size: int = 32, tokens: int = 16,
                query_pre_attn_scalar: int = 16, sliding_window: int = 8, vision_use_head: bool = False) -> Any:
    """A Gemma-3-shaped model: SigLIP (2 layers, patch 4) + average pool to ``tokens`` per image + RMSNorm and
    projection + Gemma 3 decoder (4 layers: sliding, full, sliding, full; window ``sliding_window``).

    The RMSNorm weights (zero-initialised, a scale of 1 + w) and the projection (zero-initialised) are drawn
    anew so that they matter."""
    torch.manual_seed(seed)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": 4,
              "vision_use_head": vision_use_head}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": query_pre_attn_scalar,
            "vocab_size": GEMMA_VOCAB_SIZE, "max_position_embeddings": 4096, "sliding_window": sliding_window,
            "layer_types": list(GEMMA_LAYER_TYPES), "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1,
            "eos_token_id": 2}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens,
                          image_token_index=GEMMA_IMAGE_TOKEN_ID, boi_token_index=GEMMA_BOI,
                          eoi_token_index=GEMMA_EOI)
    config._attn_implementation = attn_implementation
    model = Gemma3ForConditionalGeneration(config)
    for sub in (model.config, model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("mm_input_projection_weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    return model.eval()


def gemma_image_tokens(model: Any) -> list[int]:
    """One image (or crop) as the processor lays it out: "\\n\\n", <start_of_image>, the placeholders,
    <end_of_image>, "\\n\\n"."""
    return [GEMMA_NEWLINES, GEMMA_BOI] + [GEMMA_IMAGE_TOKEN_ID] * model.config.mm_tokens_per_image + [
        GEMMA_EOI, GEMMA_NEWLINES]


def gemma_batch(model: Any, prompts: list[Prompt], images: list[int] | None = None, padding_side: str = "left",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts``; sample i holds ``images[i]`` pictures (default 1 each): the image, then its
    pan-and-scan crops, each its own span with text between them. ``token_type_ids`` marks the placeholders (1),
    as the processor's do."""
    images = images or [1] * len(prompts)
    rows = []
    for prompt, count in zip(prompts, images, strict=True):
        row = list(prompt.before) + gemma_image_tokens(model)
        for _ in range(count - 1):
            row += [GEMMA_CROP_TEXT] + gemma_image_tokens(model)
        rows.append(row + list(prompt.after))
    batch = pad_rows(rows, padding_side)
    batch["token_type_ids"] = (batch["input_ids"] == GEMMA_IMAGE_TOKEN_ID).long()
    side = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    batch["pixel_values"] = torch.randn(sum(images), 3, side, side, generator=generator)
    return batch


def select_gemma_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One sample of a Gemma 3 batch (its pictures: the images whose placeholders its row holds), padding removed."""
    keep = batch["attention_mask"][index].bool()
    placeholders = (batch["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum(-1).tolist()
    per_image = sum(placeholders) // batch["pixel_values"].shape[0]
    first = sum(placeholders[:index]) // per_image
    count = placeholders[index] // per_image
    selected = {key: batch[key][index][keep].unsqueeze(0) for key in ("input_ids", "attention_mask", "token_type_ids")
                if key in batch}
    selected["pixel_values"] = batch["pixel_values"][first:first + count]
    return selected


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return gemma_batch(model, prompts, padding_side=padding_side, seed=seed)


def _mixed(model: Any, prompts: list[Prompt]) -> dict:
    """One picture, an image with a crop, an image with two crops, ... (16, 32, 48 visual tokens)."""
    return gemma_batch(model, prompts, images=[1 + i % 3 for i in range(len(prompts))])


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    size, tokens = ((32, 16), (64, 64), (128, 256))[step]  # patch 4, 2x2 cells: 16, 64, 256 visual tokens
    model = cached_model(("gemma3-scaled", size), lambda: tiny_gemma3("sdpa", image_size=size, tokens=tokens))
    return model, gemma_batch(model, sample_prompts(1))


GEMMA3 = Family("gemma3", tiny_gemma3, _batch, select_gemma_rows, _mixed, scaled=_scaled)
