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


def uses_zoo_files(stack) -> bool:
    """A stage that takes files shipped with the zoo proxies (``weights: zoo`` or ``zoo:NAME``)."""
    return any(isinstance(value, str) and value.startswith("zoo") for stage in stack.stages
               for value in stage.config.model_dump().values())


@pytest.mark.parametrize("path", STACKS, ids=[p.stem for p in STACKS])
@torch.no_grad()
def test_example_stack_runs(path, llava_sdpa):
    stack = tokenpress.load_stack(path)
    if uses_zoo_files(stack):
        pytest.skip("made for the zoo proxies: test_example_stack_runs_on_the_zoo_proxies")
    batch = llava_batch(llava_sdpa, sample_prompts(2))
    with tokenpress.compress(llava_sdpa, stack) as handle:
        out = llava_sdpa.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    resolved = stack.resolved(llava_sdpa.config.text_config.num_hidden_layers)  # default layers filled in
    assert len(handle.report().records) == sum(max(1, len(s.layers)) for s in resolved.stages)


ZOO_STACKS = [p for p in STACKS if uses_zoo_files(tokenpress.load_stack(p))]


@pytest.mark.parametrize("name", ["llava-shapes", "qwen2.5-vl-shapes"])
@pytest.mark.parametrize("path", ZOO_STACKS, ids=[p.stem for p in ZOO_STACKS])
@torch.no_grad()
def test_example_stack_runs_on_the_zoo_proxies(path, name):
    """Stacks that take files shipped with the proxies answer the shapes questions on each proxy."""
    from tokenpress.data import shapes
    from tokenpress.runtime.loading import load_model_and_processor, process

    model, processor = load_model_and_processor(f"zoo:{name}")
    samples = [shapes.make_sample("val", i) for i in range(16)]
    inputs = process(processor, [s.image for s in samples],
                     [shapes.build_prompt(s.question, processor.image_token) for s in samples], padding=True)
    with tokenpress.compress(model, path):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    right = sum(shapes.normalize_answer(a) == s.answer for a, s in zip(answers, samples, strict=True))
    assert right >= 4, f"{path.name} on {name}: {right}/16 right"
