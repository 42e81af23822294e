"""The flash-safe scorer: equal to the model's own attention weights, and never N x N."""

from __future__ import annotations

import pytest
import torch

import tokenpress
from tokenpress.families.clip import cls_attention
from tokenpress.runtime.scorer import Scorer, attention_rows
from tokenpress.runtime.sequence import Sequence
from tokenpress.testing import Prompt, llava_batch, tiny_llava
from tokenpress.testing.families import FAMILIES
from tokenpress.testing.memory import AllocationTracker, growth_exponent


def full_sequence(model, batch) -> Sequence:
    """The uncompressed prompt as the runner lays it out (no stage changes anything)."""
    adapter = tokenpress.find_adapter(model)
    tokens, _ = adapter.encode_images({"pixel_values": batch["pixel_values"]}, {})
    tokens = adapter.project(tokens)
    return adapter.build_sequence(batch["input_ids"], batch["attention_mask"], tokens, batch["input_ids"].shape[1],
                                  compact=False)


@torch.no_grad()
def test_scorer_rows_equal_eager_attention_weights(llava_eager):
    model = llava_eager
    batch = llava_batch(model, [Prompt([1, 5, 6], [7, 8, 9])])
    reference = model(**batch, output_attentions=True).attentions
    adapter = tokenpress.find_adapter(model)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    sequence = full_sequence(model, batch)
    last = sequence.last_prompt_index().unsqueeze(1)
    for layer in range(adapter.num_layers):
        entering = Sequence(**{**sequence.__dict__, "hidden": hidden[layer]})
        rows = attention_rows(adapter, layer, entering, last)
        torch.testing.assert_close(rows[:, 0], reference[layer][:, :, -1].mean(1), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_cls_attention_signal_equals_the_encoder_attention_weights(llava_eager):
    model = llava_eager
    pixels = torch.randn(2, 3, 48, 48)
    out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    layers = model.model.vision_tower.encoder.layers
    for index, layer in enumerate(layers):
        expected = out.attentions[index][:, :, 0, 1:].mean(1)
        torch.testing.assert_close(cls_attention(layer, out.hidden_states[index]), expected, rtol=1e-5, atol=1e-6)


def _synthetic_sequence(model, visual: int, rank: int = 1) -> Sequence:
    """A sequence of ``visual`` visual tokens between short text, straight into the decoder."""
    text_before, text_after = 4, 6
    length = text_before + visual + text_after
    generator = torch.Generator().manual_seed(0)
    is_visual = torch.zeros(1, length, dtype=torch.bool)
    is_visual[0, text_before:text_before + visual] = True
    return Sequence(
        hidden=torch.randn(1, length, model.config.text_config.hidden_size, generator=generator),
        positions=torch.arange(length).view(1, 1, -1).expand(rank, 1, -1),
        valid=torch.ones(1, length, dtype=torch.bool),
        is_visual=is_visual,
        is_prompt=torch.ones(1, length, dtype=torch.bool),
        column=torch.arange(length).unsqueeze(0),
        slot_id=torch.arange(length).unsqueeze(0),
        visual_id=torch.where(is_visual, torch.arange(length), -1),
        slot_count=length,
        lengths=(length,),
        visual_lengths=(visual,),
    )


@torch.no_grad()
def test_scorer_memory_grows_linearly_with_visual_tokens(llava_eager):
    """Measured: bytes the scorer allocates grow ~linearly with N; the eager attention it replaces
    grows quadratically (the same probe, so the probe can tell the two apart)."""
    model = llava_eager
    adapter = tokenpress.find_adapter(model)
    sizes = [256, 512, 1024, 2048]
    scorer_bytes, scorer_largest, eager_largest = [], [], []
    for visual in sizes:
        sequence = _synthetic_sequence(model, visual)
        scorer = Scorer(adapter, 2, sequence, sequence)
        with AllocationTracker() as tracker:
            scorer.attention_to_tokens(query="last", layer="current")
        scorer_bytes.append(tracker.stats.total_bytes)
        scorer_largest.append(tracker.stats.largest_bytes)
        language_model = model.model.language_model
        with AllocationTracker() as tracker:
            language_model(inputs_embeds=sequence.hidden, output_attentions=True)
        eager_largest.append(tracker.stats.largest_bytes)
    assert growth_exponent(sizes, scorer_bytes) < 1.15, scorer_bytes
    assert growth_exponent(sizes, scorer_largest) < 1.15, scorer_largest
    assert growth_exponent(sizes, eager_largest) > 1.8, eager_largest


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_scorer_memory_is_linear_on_every_family(family):
    model = FAMILIES[family].build("sdpa")
    adapter = tokenpress.find_adapter(model)
    sizes = [256, 512, 1024]
    allocated = []
    for visual in sizes:
        sequence = _synthetic_sequence(model, visual, adapter.position_rank)
        with AllocationTracker() as tracker:
            Scorer(adapter, 1, sequence, sequence).attention_to_tokens(query="text")
        allocated.append(tracker.stats.total_bytes)
    assert growth_exponent(sizes, allocated) < 1.15, allocated


@pytest.mark.parametrize("query", ["last", "text"])
@torch.no_grad()
def test_fastv_runs_on_sdpa_without_attention_weights(query):
    model = tiny_llava("sdpa")
    batch = llava_batch(model, [Prompt([1, 5, 6], [7, 8, 9])])

    def refuse(*args, **kwargs):
        raise AssertionError("output_attentions was requested")

    for layer in model.model.language_model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: refuse() if kwargs.get("output_attentions") else None, with_kwargs=True)
    stage = {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.25, "query": query}}
    with tokenpress.compress(model, {"name": "sdpa", "stages": [stage]}) as handle:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert handle.report().records[0].tokens_out == [9]
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
