"""Testing helpers for tokenpress and its plugin authors: tiny models built from configs."""

from tokenpress.testing.models import (
    Prompt,
    llava_batch,
    qwen_batch,
    sample_prompts,
    select_qwen_rows,
    select_rows,
    tiny_llava,
    tiny_qwen2_5_vl,
)

__all__ = ["Prompt", "llava_batch", "qwen_batch", "sample_prompts", "select_qwen_rows", "select_rows", "tiny_llava",
           "tiny_qwen2_5_vl"]
