"""The semantics DESIGN.md promises, on a tiny random-weight LLaVA-1.5: identity, exactness,
agreement with an independent reference, batches, generation with and without cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenpress
from reference import llava_patch_features, manual_decoder, merged_embeddings
from tokenpress.runtime import compat
from tokenpress.testing import Prompt, llava_batch, sample_prompts, select_rows


def stack(*stages: dict, positions: str = "original") -> dict:
    return {"name": "test", "positions": positions, "stages": list(stages)}


FASTV = {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}
RANDOM = {"method": "random", "params": {"keep_ratio": 0.5, "seed": 3}}
POOL = {"method": "pool", "params": {"kernel": 2}}


def assert_same(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- identity -----------------------------------------------------------------------------------


@torch.no_grad()
def test_empty_stack_is_bit_identical(llava):
    batch = llava_batch(llava, sample_prompts(3))
    expected = llava(**batch).logits
    with tokenpress.compress(llava, stack()):
        actual = llava(**batch).logits
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("stage", [
    {"method": "fastv", "layers": [2], "params": {"keep_ratio": 1.0}},
    {"method": "fastv", "layers": [0, 3], "params": {"keep_ratio": 1.0, "query": "text", "score_layer": "current"}},
    {"method": "random", "params": {"keep_ratio": 1.0}},
    {"method": "random", "at": "decoder_layer", "layers": [1], "params": {"keep_ratio": 1.0}},
    {"method": "pool", "params": {"kernel": 1}},
])
@torch.no_grad()
def test_ratio_one_gives_the_unmodified_logits(llava, stage):
    batch = llava_batch(llava, [Prompt([1, 5, 6], [7, 8, 9, 10])] * 2)  # no padding: HF's own positions agree
    batch["pixel_values"][1] = -batch["pixel_values"][1]
    expected = llava(**batch).logits
    with tokenpress.compress(llava, stack(stage)) as handle:
        actual = llava(**batch).logits
    assert handle.report().records[0].tokens_out == handle.report().records[0].tokens_in
    # eager: the same arithmetic, so bit-identical; sdpa gets an explicit mask instead of is_causal.
    assert_same(actual, expected, exact=llava.config.text_config._attn_implementation == "eager")


# --- exactness of pre-LLM compression -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["avg", "max", "bilinear"])
@pytest.mark.parametrize("point", ["post_encoder", "projector"])
@torch.no_grad()
def test_pool_equals_the_model_fed_pooled_features(llava_eager, mode, point):
    model = llava_eager
    prompt = Prompt([1, 5, 6, 7], [8, 9, 10, 11, 12])
    batch = llava_batch(model, [prompt])
    with tokenpress.compress(model, stack({"method": "pool", "at": point, "params": {"kernel": 2, "mode": mode}})):
        actual = model(**batch).logits

    features = llava_patch_features(model, batch["pixel_values"])  # (1, 36, C)
    if point == "projector":
        features = model.model.multi_modal_projector(features)
    grid = features.reshape(1, 6, 6, -1).permute(0, 3, 1, 2)
    if mode == "avg":
        pooled = F.avg_pool2d(grid, 2)
    elif mode == "max":
        pooled = F.max_pool2d(grid, 2)
    else:
        pooled = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False)
    pooled = pooled.permute(0, 2, 3, 1).reshape(1, 9, -1)
    if point == "post_encoder":
        pooled = model.model.multi_modal_projector(pooled)
    input_ids = torch.tensor([prompt.before + [model.config.image_token_id] * 9 + prompt.after])
    expected = model(inputs_embeds=merged_embeddings(model, input_ids, pooled[0])).logits

    before, after = len(prompt.before), len(prompt.after)
    assert torch.equal(actual[:, :before], expected[:, :before])
    assert torch.equal(actual[:, -after:], expected[:, -after:])


# --- agreement with an independent reference ----------------------------------------------------


@torch.no_grad()
def test_fastv_matches_a_reference_built_from_eager_attention_weights(llava_eager):
    model = llava_eager
    prompt = Prompt([1, 5, 6], [7, 8, 9, 10, 11])
    batch = llava_batch(model, [prompt])
    layer, ratio = 2, 0.5
    with tokenpress.compress(model, stack({"method": "fastv", "layers": [layer], "params": {"keep_ratio": ratio}})):
        actual = model(**batch).logits

    # Reference: the unmodified model's own attention weights (output_attentions, eager) of the
    # last token at layer K-1 rank the visual tokens; drop the rest before layer K.
    full = model(**batch, output_attentions=True)
    visual = torch.arange(len(prompt.before), len(prompt.before) + 36)
    scores = full.attentions[layer - 1][0, :, -1, visual].mean(0)
    kept_visual = visual[torch.topk(scores, 18).indices.sort().values]
    text_before = torch.arange(len(prompt.before))
    text_after = torch.arange(len(prompt.before) + 36, batch["input_ids"].shape[1])
    keep = torch.cat([text_before, kept_visual, text_after])
    embeds = merged_embeddings(model, batch["input_ids"], model.model.multi_modal_projector(
        llava_patch_features(model, batch["pixel_values"]))[0])
    positions = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    hidden, _ = manual_decoder(model.model.language_model, embeds, positions, keep={layer: keep})
    expected = model.lm_head(hidden)
    torch.testing.assert_close(actual[0, text_after], expected[0, -len(text_after):], rtol=1e-5, atol=1e-5)


# --- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("stages", [
    [FASTV], [RANDOM], [POOL], [POOL, FASTV],
    [{"method": "random", "at": "decoder_layer", "layers": [1], "params": {"keep_ratio": 0.4}}],
], ids=["fastv", "random", "pool", "pool+fastv", "random@decoder"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_each_sample_of_a_padded_batch_equals_the_sample_alone(llava, padding_side, stages, positions):
    batch = llava_batch(llava, sample_prompts(3), padding_side=padding_side)
    with tokenpress.compress(llava, stack(*stages, positions=positions)) as handle:
        batched = llava(**batch).logits
        batched_report = handle.report().records
        for index in range(3):
            alone = select_rows(batch, index)
            logits = llava(**alone).logits[0]
            real = batch["attention_mask"][index].bool()
            after = len(sample_prompts(3)[index].after)
            torch.testing.assert_close(batched[index][real][-after:], logits[-after:], rtol=1e-5, atol=1e-5)
            for record, alone_record in zip(batched_report, handle.report().records, strict=True):
                assert record.tokens_out[index] == alone_record.tokens_out[0]


# --- generation ---------------------------------------------------------------------------------


class RouteHalf(tokenpress.Method):
    """A route-style test method: only the visual tokens of even layer-0 slot go through the layer."""

    name = "test-route-half"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)

    @tokenpress.hookimpl
    def decoder_layer(self, context: tokenpress.DecoderContext) -> tokenpress.Route:
        return tokenpress.Route(context.sequence.slot_id % 2 == 0)


@pytest.fixture
def route_plugin():
    registry = tokenpress.get_registry()

    class Plugin:
        @tokenpress.hookimpl
        def tokenpress_register_methods(self):
            return [RouteHalf]

    registry.register_plugin(Plugin(), name="test-route-plugin")
    yield
    tokenpress.get_registry(reload=True)


ROUTE = {"method": "test-route-half", "layers": [1, 2]}


@pytest.mark.parametrize("stages", [[FASTV], [RANDOM], [POOL, FASTV], [ROUTE], [POOL, ROUTE, FASTV]],
                         ids=["fastv", "random", "pool+fastv", "route", "pool+route+fastv"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_generate_with_and_without_cache_agree(llava, route_plugin, stages, positions):
    batch = llava_batch(llava, sample_prompts(3, seed=1))
    with tokenpress.compress(llava, stack(*stages, positions=positions)) as handle:
        cached = llava.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        assert handle.report().records, "the prefill was not compressed"
        uncached = llava.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
        alone = [llava.generate(**select_rows(batch, i), max_new_tokens=8, do_sample=False)[0, -8:] for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -8:], torch.stack(alone))


@torch.no_grad()
def test_route_matches_the_reference_and_caches_only_processed_tokens(llava_eager, route_plugin):
    model = llava_eager
    prompt = Prompt([1, 5, 6], [7, 8, 9, 10])
    batch = llava_batch(model, [prompt])
    with tokenpress.compress(model, stack(ROUTE)) as handle:
        out = model(**batch, use_cache=True)
    length = batch["input_ids"].shape[1]
    visual = torch.arange(3, 3 + 36)
    routed = torch.cat([torch.arange(3), visual[visual % 2 == 0], torch.arange(3 + 36, length)])
    embeds = merged_embeddings(model, batch["input_ids"], model.model.multi_modal_projector(
        llava_patch_features(model, batch["pixel_values"]))[0])
    hidden, _ = manual_decoder(model.model.language_model, embeds, torch.arange(length).unsqueeze(0),
                               route={1: routed, 2: routed})
    torch.testing.assert_close(out.logits[0, -4:], model.lm_head(hidden)[0, -4:], rtol=1e-5, atol=1e-5)
    cache = compat.output_cache(out)
    assert isinstance(cache, tokenpress.CompressedCache)
    assert cache.real_lengths()[:, 0].tolist() == [length, len(routed), len(routed), length]
    assert cache.get_seq_length() == length  # what generate() counts: the uncompressed input
    assert [r.tokens_out for r in handle.report().records] == [[18], [18]]


@torch.no_grad()
def test_decoding_positions_continue_from_the_full_sequence(llava_eager):
    """With `original` positions the first generated token sits where it would without compression."""
    model = llava_eager
    batch = llava_batch(model, sample_prompts(2))
    with tokenpress.compress(model, stack(FASTV)):
        out = model(**batch, use_cache=True)
    state = compat.output_cache(out).tokenpress_state
    lengths = batch["attention_mask"].sum(-1)
    for layer_next in state.next_position:
        assert torch.equal(layer_next, lengths)
    with tokenpress.compress(model, stack(FASTV, positions="compact")):
        out = model(**batch, use_cache=True)
    state = compat.output_cache(out).tokenpress_state
    assert torch.equal(state.next_position[1], lengths)
    assert torch.equal(state.next_position[2], lengths - 18)


@torch.no_grad()
@pytest.mark.parametrize("padded", [True, False])
def test_follow_up_turn_on_the_cache_reuses_the_first_selection(llava, padded):
    """Multi-turn: a follow-up chunk on the returned cache is appended to every layer's cache; the
    visual selection of the first prompt stays. It equals feeding the follow-up one token at a time."""
    model = llava
    prompts = sample_prompts(2) if padded else [sample_prompts(1)[0]] * 2
    batch = llava_batch(model, prompts)
    follow_up = torch.tensor([[40, 41, 42], [43, 44, 45]])
    with tokenpress.compress(model, stack(FASTV)):
        first = model(**batch, use_cache=True)
        chunk = model(input_ids=follow_up, use_cache=True,
                      **{compat.cache_argument(model): compat.output_cache(first)})
        again = model(**batch, use_cache=True)
        cache = compat.output_cache(again)
        steps = [model(input_ids=follow_up[:, i:i + 1], use_cache=True,
                       **{compat.cache_argument(model): cache}).logits
                 for i in range(3)]
    torch.testing.assert_close(chunk.logits, torch.cat(steps, dim=1), rtol=1e-5, atol=1e-5)
    assert compat.output_cache(first).get_seq_length() == batch["input_ids"].shape[1] + 3
