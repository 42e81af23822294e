"""What every family's tiny test model shares: the record a family gives the shared suites
(:class:`Family`), prompts, padding, and the session's cache of tiny models.

Each family folder has a ``testbed`` module with its tiny model, built from a transformers config with
random weights (a few layers, widths <= 64: seconds on a CPU, no download), its batches and its record;
its adapter names the record (``ModelAdapter.test_family``) and :mod:`tokenpress.testing.families`
collects the records of the registered adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch

from tokenpress.runtime.attach import attached_handle

PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID = 120
VOCAB_SIZE = 128


@dataclass
class Prompt:
    """A prompt: text before the image, the image, text after it."""

    before: list[int]
    after: list[int]


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


def sample_prompts(count: int = 3, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of different lengths (text ids avoid the special and image ids)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        before = [1] + torch.randint(4, 100, (2 + i,), generator=generator).tolist()
        after = torch.randint(4, 100, (3 + 2 * i,), generator=generator).tolist()
        prompts.append(Prompt(before, after))
    return prompts


def pad_rows(rows: list[list[int]], padding_side: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows padded to one width on ``padding_side``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def record_of(adapter: type) -> Family | None:
    """The tiny-model record an adapter class names (``test_family``: ``"module:attribute"``), or None."""
    if adapter.test_family is None:
        return None
    module, _, attribute = adapter.test_family.partition(":")
    return getattr(import_module(module), attribute)


_MODELS: dict[tuple[Any, ...], Any] = {}


def cached_model(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """The session's model for ``key``, built once (shared: attach stacks with ``with``, never modify it).
    A stack left attached by a test that died inside ``compress()`` without its with-block is detached."""
    if key not in _MODELS:
        _MODELS[key] = build()
    model = _MODELS[key]
    handle = attached_handle(model)
    if handle is not None:
        handle.detach()
    return model


def session_model(family: Family, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> Any:
    """The session's tiny model of ``family`` with this attention implementation, dtype and device."""

    def build() -> Any:
        model = family.build(attn_implementation)
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

    return cached_model((family.name, attn_implementation, str(dtype), str(device)), build)
