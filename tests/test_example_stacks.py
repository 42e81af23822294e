"""The example stacks in stacks/ are valid and run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokenpress
from tokenpress.testing import llava_batch, sample_prompts

STACKS = sorted((Path(__file__).resolve().parents[1] / "stacks").glob("*.yaml"))


def test_there_are_example_stacks():
    assert len(STACKS) >= 4


@pytest.mark.parametrize("path", STACKS, ids=[p.stem for p in STACKS])
@torch.no_grad()
def test_example_stack_runs(path, llava_sdpa):
    stack = tokenpress.load_stack(path)
    batch = llava_batch(llava_sdpa, sample_prompts(2))
    with tokenpress.compress(llava_sdpa, stack) as handle:
        out = llava_sdpa.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    resolved = stack.resolved(llava_sdpa.config.text_config.num_hidden_layers)  # default layers filled in
    assert len(handle.report().records) == sum(max(1, len(s.layers)) for s in resolved.stages)
