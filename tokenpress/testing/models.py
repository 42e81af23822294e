"""Tiny random-weight models built from transformers configs (no download), and their inputs.

Used by the project's tests and by plugin authors' tests through the ``tokenpress.testing`` kit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 120
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128


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


@dataclass
class Prompt:
    """A prompt: text before the image, the image, text after it."""

    before: list[int]
    after: list[int]


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


def sample_prompts(count: int = 3, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of different lengths (text ids avoid the special and image ids)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        before = [1] + torch.randint(4, 100, (2 + i,), generator=generator).tolist()
        after = torch.randint(4, 100, (3 + 2 * i,), generator=generator).tolist()
        prompts.append(Prompt(before, after))
    return prompts


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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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


QWEN_IMAGE_TOKEN_ID = 150
QWEN_VIDEO_TOKEN_ID = 151
QWEN_VISION_START, QWEN_VISION_END = 148, 149


def tiny_qwen2_5_vl(attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A Qwen2.5-VL-shaped model: window-attention ViT (2 blocks) + 2x2 merger + M-RoPE decoder (GQA)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

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
    batch = _pad_rows(rows, padding_side)
    batch["pixel_values"] = torch.cat(pixel_chunks)
    batch["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    batch["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IMAGE_TOKEN_ID).int()
    return batch


def _pad_rows(rows: list[list[int]], padding_side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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


def tiny_llava_next(attn_implementation: str = "eager", seed: int = 0) -> Any:
    """A LLaVA-NeXT-shaped model: 32-pixel tiles of 4x4 patches, pinpoints 32x64, 64x32, 64x64."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

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
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

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
    batch = _pad_rows(rows, padding_side)
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


@contextmanager
def image_features_fed(model: Any, features: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, the model's own forward takes ``features`` (one tensor per image, already
    projected) as its image encoder's output: the reference "the model fed these features directly",
    on every supported transformers release (``mm_encoder_outputs`` exists only from 5.19).

    The forward still needs ``pixel_values`` (any tensor) to take its image path. Only this instance
    is touched, and only inside the block.
    """
    from tokenpress import compat

    inner = model.model
    inner.get_image_features = lambda *args, **kwargs: compat.encoder_output(features)
    try:
        yield
    finally:
        del inner.__dict__["get_image_features"]
