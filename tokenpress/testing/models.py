"""Tiny random-weight models built from transformers configs (no download), and their inputs: each family's
live in its folder (``tokenpress.families.<family>.testbed``); this module gathers them for tests and
for plugin authors (``from tokenpress.testing import tiny_llava``), with a reference helper."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tokenpress.families.llava.testbed import (
    llava_batch,
    save_tiny_llava_checkpoint,
    select_rows,
    tiny_llava,
    word_tokenizer,
)
from tokenpress.families.llava_next.testbed import (
    llava_next_batch,
    llava_next_token_count,
    select_llava_next_rows,
    tiny_llava_next,
)
from tokenpress.families.qwen2_5_vl.testbed import (
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END,
    QWEN_VISION_START,
    qwen_batch,
    select_qwen_rows,
    tiny_qwen2_5_vl,
)
from tokenpress.families.testbed import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, Prompt, pad_rows, sample_prompts
from tokenpress.runtime import compat

__all__ = [
    "IMAGE_TOKEN_ID", "PAD_TOKEN_ID", "QWEN_IMAGE_TOKEN_ID", "QWEN_VIDEO_TOKEN_ID", "QWEN_VISION_END",
    "QWEN_VISION_START", "VOCAB_SIZE", "Prompt", "image_features_fed", "llava_batch", "llava_next_batch",
    "llava_next_token_count", "pad_rows", "qwen_batch", "sample_prompts", "save_tiny_llava_checkpoint",
    "select_llava_next_rows", "select_qwen_rows", "select_rows", "tiny_llava", "tiny_llava_next",
    "tiny_qwen2_5_vl", "word_tokenizer",
]


@contextmanager
def image_features_fed(model: Any, features: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, the model's own forward takes ``features`` (one tensor per image, already
    projected) as its image encoder's output: the reference "the model fed these features directly",
    on every supported transformers release (``mm_encoder_outputs`` exists only from 5.19).

    The forward still needs ``pixel_values`` (any tensor) to take its image path. Only this instance
    is touched, and only inside the block.
    """
    inner = model.model
    inner.get_image_features = lambda *args, **kwargs: compat.encoder_output(features)
    try:
        yield
    finally:
        del inner.__dict__["get_image_features"]
