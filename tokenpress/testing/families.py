"""Tiny models of every supported family, with inputs, for suites that run over all families.

An adapter names its family's record (``ModelAdapter.test_family``, ``"module:attribute"``, imported
here only): :data:`FAMILIES` holds the records the registered adapters name. A third-party family
does the same, or adds its record with :func:`register_family` (from its own test setup).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch

from tokenpress.registry import get_registry
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

#: Inputs at three growing visual token counts: step (0, 1, 2) -> (model, batch of one).
ScaledInputs = Callable[[int], tuple[Any, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one family and batches for it."""

    name: str
    build: Callable[[str], Any]  # attn_implementation -> model
    batch: Callable[[Any, list[Prompt], str, int], dict[str, torch.Tensor]]  # model, prompts, padding, seed
    select: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]  # one row, unpadded
    mixed_batch: Callable[[Any, list[Prompt]], dict[str, torch.Tensor]] | None = None  # different image sizes
    #: How far torch's FLOP counter may count above the FLOPs model on a compressed prefill of one prompt
    #: (relative): 0 where the prefill does no work on padding slots; LLaVA-NeXT pads its base-tile row to
    #: its high-resolution row and runs its projector over that padding (up to 5% more).
    flops_tolerance: float = 0.0
    #: Inputs of a growing number of visual tokens, for the contract's N x N check (None: the check skips).
    scaled: ScaledInputs | None = None

    @property
    def flops_exact(self) -> bool:
        """Whether torch's FLOP counter equals the FLOPs model exactly on this family."""
        return self.flops_tolerance == 0.0


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


def _llava_scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    # the scaled inputs share the contract's session cache of models (imported here: the contract imports us)
    from tokenpress.testing.contract import _cached

    size = (64, 128, 256)[step]  # patch 8: 64, 256, 1024 visual tokens
    model = _cached(("llava-scaled", size), lambda: tiny_llava("sdpa", image_size=size))
    return model, llava_batch(model, sample_prompts(1))


def _next_scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    from tokenpress.testing.contract import _cached, tiny_model

    tile = (32, 64, 128)[step]  # one pinpoint of one tile: base + crop, 2 x (tile / 8)^2 tokens

    def build() -> Any:
        from transformers import LlavaNextForConditionalGeneration

        base = tiny_model("llava-next")
        config = copy.deepcopy(base.config)
        config.vision_config.image_size = tile
        config.image_grid_pinpoints = [[tile, tile]]
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config).eval()
        with torch.no_grad():
            model.model.image_newline.normal_()
        model.generation_config.pad_token_id = base.generation_config.pad_token_id
        return model

    model = _cached(("llava-next-scaled", tile), build)
    return model, llava_next_batch(model, sample_prompts(1), sizes=[(tile, tile)])


def _qwen_scaled(step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    from tokenpress.testing.contract import tiny_model

    grid = ((8, 8), (16, 16), (32, 32))[step]  # 2x2 merge: 16, 64, 256 visual tokens
    model = tiny_model("qwen2.5-vl")
    return model, qwen_batch(model, sample_prompts(1), grids=[grid])


LLAVA = Family("llava", tiny_llava, _llava_batch, select_rows, scaled=_llava_scaled)
LLAVA_NEXT = Family("llava-next", tiny_llava_next, _next_batch, select_llava_next_rows, _next_mixed,
                    flops_tolerance=0.05, scaled=_next_scaled)
QWEN2_5_VL = Family("qwen2.5-vl", tiny_qwen2_5_vl, _qwen_batch, select_qwen_rows, _qwen_mixed, scaled=_qwen_scaled)


def _named_by_adapters() -> dict[str, Family]:
    """The records the registered adapters name, in their order (the first one for a name wins)."""
    families: dict[str, Family] = {}
    for adapter in get_registry().adapters:
        if adapter.test_family is not None:
            module, _, attribute = adapter.test_family.partition(":")
            # this module's own records are defined above, so naming them while it loads works
            family = getattr(import_module(module), attribute)
            families.setdefault(family.name, family)
    return families


#: Family name -> its record: those the registered adapters name, then those added by register_family.
FAMILIES: dict[str, Family] = _named_by_adapters()


def register_family(family: Family) -> None:
    """Make a tiny model of a (third-party) family available to the shared suites."""
    FAMILIES[family.name] = family


def prompts(count: int = 3, seed: int = 0) -> list[Prompt]:
    return sample_prompts(count, seed)
