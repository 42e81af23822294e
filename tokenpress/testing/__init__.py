"""Testing helpers for tokenpress and its plugin authors: tiny models built from configs."""

from tokenpress.testing.models import Prompt, llava_batch, sample_prompts, select_rows, tiny_llava

__all__ = ["Prompt", "llava_batch", "sample_prompts", "select_rows", "tiny_llava"]
