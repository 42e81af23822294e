"""Tiny models of every supported family, with inputs, for suites that run over all families.

A third-party adapter adds its family with :func:`register_family` (from its own test setup).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenpress.testing.models import (
    Prompt,
    llava_batch,
    llava_next_batch,
    qwen_batch,
    sample_prompts,
    select_llava_next_rows,
    select_qwen_rows,
    select_rows,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one family and batches for it."""

    name: str
    build: Callable[[str], Any]  # attn_implementation -> model
    batch: Callable[[Any, list[Prompt], str, int], dict[str, torch.Tensor]]  # model, prompts, padding, seed
    select: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]  # one row, unpadded
    mixed_batch: Callable[[Any, list[Prompt]], dict[str, torch.Tensor]] | None = None  # different image sizes
    #: The compressed prefill of one prompt does no work on padding slots, so torch's FLOP counter equals
    #: the FLOPs model exactly (LLaVA-NeXT pads its base-tile row to its high-resolution row: it does).
    flops_exact: bool = True


def _llava_batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return llava_batch(model, prompts, padding_side=padding_side, seed=seed)


def _qwen_batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return qwen_batch(model, prompts, padding_side=padding_side, seed=seed)


def _qwen_mixed(model: Any, prompts: list[Prompt]) -> dict:
    sizes = [(8, 8), (8, 12), (12, 8), (4, 8)]
    return qwen_batch(model, prompts, grids=[sizes[i % len(sizes)] for i in range(len(prompts))])


def _next_batch(model: Any, prompts: list[Prompt], padding_side: str = "left", seed: int = 0) -> dict:
    return llava_next_batch(model, prompts, padding_side=padding_side, seed=seed)


def _next_mixed(model: Any, prompts: list[Prompt]) -> dict:
    sizes = [(64, 64), (32, 64), (64, 32), (48, 64)]
    return llava_next_batch(model, prompts, sizes=[sizes[i % len(sizes)] for i in range(len(prompts))])


FAMILIES: dict[str, Family] = {
    "llava": Family("llava", tiny_llava, _llava_batch, select_rows),
    "llava-next": Family("llava-next", tiny_llava_next, _next_batch, select_llava_next_rows, _next_mixed,
                         flops_exact=False),
    "qwen2.5-vl": Family("qwen2.5-vl", tiny_qwen2_5_vl, _qwen_batch, select_qwen_rows, _qwen_mixed),
}


def register_family(family: Family) -> None:
    """Make a tiny model of a (third-party) family available to the shared suites."""
    FAMILIES[family.name] = family


def prompts(count: int = 3, seed: int = 0) -> list[Prompt]:
    return sample_prompts(count, seed)
