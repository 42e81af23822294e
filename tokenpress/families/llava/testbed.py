"""LLaVA-1.5's tiny test model: a CLIP encoder (2 layers), the MLP projector and a Llama decoder (GQA),
random weights, 48-pixel images of 8-pixel patches (36 visual tokens); a checkpoint of it with a processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tokenpress.families.testbed import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    Family,
    Prompt,
    cached_model,
    sample_prompts,
)


def tiny_llava(attn_implementation: str = "eager", seed: int = 0, image_size: int = 48, patch_size: int = 8,
               num_layers: int = 4, encoder_layers: int = 2) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: CLIP encoder (2 layers; its features from the second-to-last hidden state,
    as LLaVA-1.5's) + MLP projector + Llama decoder (GQA)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=encoder_layers,
                              num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=4096,
                       pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.config.text_config._attn_implementation = attn_implementation
    model.config.vision_config._attn_implementation = attn_implementation
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model.eval()


def llava_batch(model: LlavaForConditionalGeneration, prompts: list[Prompt], padding_side: str = "left",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``prompts`` (one image each, random pixels), padded on ``padding_side``."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    rows = [p.before + [model.config.image_token_id] * patches + p.after for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if padding_side == "left":
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        else:
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(rows), 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def select_rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One sample of a batch, with its padding removed."""
    keep = batch["attention_mask"][index].bool()
    return {
        "input_ids": batch["input_ids"][index][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][index][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][index:index + 1],
    }


def word_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A word-level fast tokenizer over ``w4 .. w119`` plus special tokens, built offline."""
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, IMAGE_TOKEN_ID)})
    vocab["<image>"] = IMAGE_TOKEN_ID
    vocab.update({f"x{i}": i for i in range(IMAGE_TOKEN_ID + 1, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def save_tiny_llava_checkpoint(folder: str | Path, attn_implementation: str = "eager") -> Path:
    """Save a tiny LLaVA with a processor (word-level tokenizer, PIL image processor) to ``folder``."""
    folder = Path(folder)
    model = tiny_llava(attn_implementation)
    side = model.config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=word_tokenizer(),
                               patch_size=model.config.vision_config.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return llava_batch(model, prompts, padding_side=padding_side, seed=seed)


def _scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    size = (64, 128, 256)[step]  # patch 8: 64, 256, 1024 visual tokens
    model = cached_model(("llava-scaled", size), lambda: tiny_llava("sdpa", image_size=size))
    return model, llava_batch(model, sample_prompts(1))


LLAVA = Family("llava", tiny_llava, _batch, select_rows, scaled=_scaled)
