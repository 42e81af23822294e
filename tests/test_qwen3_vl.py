"""Qwen3-VL (and Qwen3-VL-MoE) specifics: merge units through the model's own merger, DeepStack following the
tokens (drops, pooling, FastV, routes and merges in the decoder) against by-hand runs of the model's own layers,
interleaved M-RoPE positions and rope_deltas, videos as one row per temporal slice, the encoder signals (and
Qwen2.5-VL's attention received) against the encoders' own eager attention weights, the output classes, and
the FLOPs models against torch's counter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl

import tokenpress
from tokenpress.core import flops
from tokenpress.core.decisions import Merge, Route
from tokenpress.core.select import topk_mask
from tokenpress.core.signals import AttentionReceived, EncoderKeys
from tokenpress.families.qwen2_5_vl.testbed import qwen_batch, tiny_qwen2_5_vl
from tokenpress.families.qwen3_vl.adapter import Qwen3VLMoeAdapter
from tokenpress.families.qwen3_vl.testbed import (
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END,
    QWEN_VISION_START,
    select_qwen_rows,
    tiny_qwen3_vl,
    tiny_qwen3_vl_moe,
    video_batch,
)
from tokenpress.families.testbed import Prompt, sample_prompts
from tokenpress.runtime import compat
from tokenpress.runtime.scorer import attention_rows

PROMPT = Prompt([1, 5, 6], [7, 8, 9, 10])


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl("eager")


@pytest.fixture(scope="module")
def qwen3_moe():
    return tiny_qwen3_vl_moe("eager")


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request, qwen3, qwen3_moe):
    return qwen3 if request.param == "dense" else qwen3_moe


# --- helpers: the model's own pieces, run by hand -------------------------------------------------------


def encoder_outputs(model, pixels: torch.Tensor, grid: torch.Tensor
                    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The model's own image features per image and its DeepStack features per level and image."""
    out = model.model.get_image_features(pixels, grid, return_dict=True)
    return list(out.pooler_output), [list(level) for level in out.deepstack_features]


def full_positions(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    grids = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch}
    return model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                      attention_mask=batch["attention_mask"], **grids)


def by_hand(model, hidden: torch.Tensor, positions: torch.Tensor, visual: torch.Tensor, deepstack: list[torch.Tensor],
            keep: dict[int, torch.Tensor] | None = None, route: dict[int, torch.Tensor] | None = None,
            before: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Logits of one unpadded sequence run through the model's own decoder layers one by one: ``hidden``
    (1, N, D), ``positions`` (3, 1, N), ``visual`` (N,) bool, ``deepstack[k]`` (visual tokens, D) added to the
    visual tokens after layer k. ``keep[l]``: slots kept from layer l on (their DeepStack vectors with them);
    ``route[l]``: slots that go through layer l (the others skip it and still receive level l);
    ``before(l, state)`` may edit the state (hidden, positions, visual, deepstack) before layer l."""
    language = model.model.language_model
    state = {"hidden": hidden, "positions": positions, "visual": visual, "deepstack": list(deepstack)}
    for index, layer in enumerate(language.layers):
        if keep and index in keep:
            slots = keep[index]
            rank = torch.cumsum(state["visual"].long(), 0) - 1
            kept_visual = rank[slots][state["visual"][slots]]
            state = {"hidden": state["hidden"][:, slots], "positions": state["positions"][:, :, slots],
                     "visual": state["visual"][slots],
                     "deepstack": [level[kept_visual] for level in state["deepstack"]]}
        if before is not None:
            before(index, state)
        chosen = route.get(index) if route else None
        chosen = torch.arange(state["hidden"].shape[1]) if chosen is None else chosen
        sub, sub_positions = state["hidden"][:, chosen], state["positions"][:, :, chosen]
        count = sub.shape[1]
        mask = torch.full((count, count), torch.finfo(sub.dtype).min).triu(1)[None, None]
        out = layer(sub, attention_mask=mask, position_ids=None,
                    position_embeddings=language.rotary_emb(sub, sub_positions))
        hidden = state["hidden"].clone()
        hidden[:, chosen] = out[0] if isinstance(out, tuple) else out
        if index < len(state["deepstack"]):
            hidden[:, state["visual"]] += state["deepstack"][index]
        state["hidden"] = hidden
    return model.lm_head(language.norm(state["hidden"]))


def compressed_reference(model, batch: dict, kept_units: torch.Tensor, features: torch.Tensor,
                         deepstack: list[torch.Tensor], **runs: Any) -> torch.Tensor:
    """The one-image prompt of ``batch`` with only the visual tokens of ``kept_units`` (in order), fed
    ``features`` and ``deepstack`` vectors for them, at their own positions (the full prompt's)."""
    ids = batch["input_ids"][0]
    positions, _ = full_positions(model, batch)
    placeholders = torch.nonzero(ids == QWEN_IMAGE_TOKEN_ID).flatten()
    present = ids != QWEN_IMAGE_TOKEN_ID
    present[placeholders[kept_units]] = True
    embeds = model.model.language_model.embed_tokens(ids.unsqueeze(0))
    embeds[0, placeholders[kept_units]] = features
    visual = (ids == QWEN_IMAGE_TOKEN_ID)[present]
    return by_hand(model, embeds[:, present], positions[:, :, present], visual, deepstack, **runs)


class RecordTokens(tokenpress.Method):
    """Test method: records the tokens it sees (the cells each stands for), changes nothing."""

    name = "test-record-tokens"
    Config = tokenpress.MethodConfig
    points = ("post_encoder", "query_conditioned")
    seen: list = []

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        RecordTokens.seen.append(tokens)
        return tokens

    @tokenpress.hookimpl
    def query_conditioned(self, tokens, context):
        RecordTokens.seen.append(tokens)
        return tokens

    def promised_count(self, tokens_in):
        return tokens_in


class RouteHalf(tokenpress.Method):
    """Test method: routes the even visual slots (of the layer's sequence) through the layer."""

    name = "test-route-half"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)
    routes = True

    @tokenpress.hookimpl
    def decoder_layer(self, context):
        sequence = context.sequence
        rank = torch.cumsum(sequence.is_visual.long(), -1) - 1
        return Route(sequence.is_visual & (rank % 2 == 0))


class MergePairs(tokenpress.Method):
    """Test method: merges visual tokens 0+1 and 2+3 (of the layer's sequence), drops token 4, keeps the rest."""

    name = "test-merge-pairs"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)

    @tokenpress.hookimpl
    def decoder_layer(self, context):
        sequence = context.sequence
        rank = torch.cumsum(sequence.is_visual.long(), -1) - 1
        group = torch.full_like(rank, -1)
        group = torch.where(rank < 4, rank // 2, group)
        group = torch.where(rank == 4, -2, group)
        return Merge(torch.where(sequence.is_visual, group, -1), groups=2)


# --- the units, the merger and DeepStack at the encoder ---------------------------------------------------


@torch.no_grad()
def test_units_and_their_deepstack_vectors_are_the_models_own(qwen3):
    batch = qwen_batch(qwen3, sample_prompts(2), grids=[(8, 8), (8, 12)])
    adapter = tokenpress.find_adapter(qwen3)
    tokens, _ = adapter.encode_images(batch, [])
    assert tokens.grid.tolist() == [[1, 4, 4], [1, 4, 6]]
    assert adapter.encoder_width() == 4 * qwen3.config.vision_config.hidden_size
    projected = adapter.project(tokens)
    features, deepstack = encoder_outputs(qwen3, batch["pixel_values"], batch["image_grid_thw"])
    for image, expected in enumerate(features):
        assert torch.equal(projected.embeddings[image, : expected.shape[0]], expected)
        for level, per_image in zip(adapter.media["deepstack"], deepstack, strict=True):
            assert torch.equal(level[image, : expected.shape[0]], per_image[image])


@torch.no_grad()
def test_an_empty_stack_and_identity_settings_are_bit_identical(model):
    batch = qwen_batch(model, sample_prompts(2), grids=[(8, 8), (8, 12)])
    valid = batch["attention_mask"].bool()
    expected = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for stages in ([], [{"method": "random", "params": {"keep_ratio": 1.0}}],
                   [{"method": "pool", "at": "projector", "params": {"kernel": 1}},
                    {"method": "fastv", "layers": [1], "params": {"keep_ratio": 1.0}}]):
        with tokenpress.compress(model, {"name": "i", "stages": stages}):
            assert torch.equal(model(**batch).logits[valid], expected[valid])
            assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), generated)


@pytest.fixture
def record_tokens(register_methods):
    register_methods(RecordTokens)
    RecordTokens.seen.clear()
    return RecordTokens.seen


@torch.no_grad()
def test_deepstack_follows_the_kept_tokens_of_a_random_drop(model, record_tokens):
    """Random keeps half the units; each kept token must receive its own unit's DeepStack vectors (a run of
    the model's own layers by hand); left at the old positions (the first units' vectors, what the model's
    own scatter would do with fewer placeholders), or left out, the logits differ."""
    batch = qwen_batch(model, [PROMPT], grids=[(8, 12)])
    stack = {"name": "r", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "test-record-tokens"}]}
    with tokenpress.compress(model, stack):
        actual = model(**batch).logits[:, -len(PROMPT.after):]
    tokens = record_tokens[0]
    kept = tokens.grid_index[0][tokens.valid[0]]
    assert len(kept) == 12 and not torch.equal(kept, torch.arange(12))
    features, deepstack = encoder_outputs(model, batch["pixel_values"], batch["image_grid_thw"])

    def reference(levels: list[torch.Tensor]) -> torch.Tensor:
        return compressed_reference(model, batch, kept, features[0][kept], levels)[:, -len(PROMPT.after):]

    own = [level[0][kept] for level in deepstack]
    torch.testing.assert_close(actual, reference(own), rtol=1e-5, atol=1e-5)
    old_places = [level[0][: len(kept)] for level in deepstack]
    for wrong in (old_places, []):
        assert (actual - reference(wrong)).abs().max() > 1e-2


@torch.no_grad()
def test_pool_at_the_projector_equals_the_model_fed_pooled_features_and_deepstack(model):
    """Pooling 2x2 cells: the model's own forward fed the pooled features and, per level, the mean of the
    cells' DeepStack vectors (average after projection)."""
    batch = qwen_batch(model, [PROMPT], grids=[(8, 12)])
    with tokenpress.compress(model, {"name": "p", "stages": [{"method": "pool", "at": "projector",
                                                               "params": {"kernel": 2}}]}):
        actual = model(**batch).logits[:, -len(PROMPT.after):]
    features, deepstack = encoder_outputs(model, batch["pixel_values"], batch["image_grid_thw"])

    def pooled(values: torch.Tensor) -> torch.Tensor:
        grid = values.reshape(1, 4, 6, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(6, -1)

    ids = torch.tensor([PROMPT.before + [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN_ID] * 6 + [QWEN_VISION_END]
                        + PROMPT.after])
    fed = modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures(
        pooler_output=(pooled(features[0]),), deepstack_features=[(pooled(level[0]),) for level in deepstack])
    inner = model.model
    inner.get_image_features = lambda *args, **kwargs: fed
    try:
        expected = model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=torch.tensor([[1, 4, 6]]),
                         mm_token_type_ids=(ids == QWEN_IMAGE_TOKEN_ID).int()).logits[:, -len(PROMPT.after):]
    finally:
        del inner.__dict__["get_image_features"]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- DeepStack in the decoder: FastV, routes and merges ----------------------------------------------------


def _full_prompt(model, grids=((8, 8),)):
    batch = qwen_batch(model, [PROMPT], grids=list(grids))
    features, deepstack = encoder_outputs(model, batch["pixel_values"], batch["image_grid_thw"])
    ids = batch["input_ids"][0]
    embeds = model.model.language_model.embed_tokens(batch["input_ids"])
    visual = ids == QWEN_IMAGE_TOKEN_ID
    embeds[0, visual] = features[0]
    positions, _ = full_positions(model, batch)
    return batch, embeds, positions, visual, [level[0] for level in deepstack]


@torch.no_grad()
def test_fastv_between_deepstack_levels_matches_a_reference_built_from_eager_attention_weights(model):
    """FastV drops before layer 1 (level 1 still to come) by the attention the last prompt token pays at
    layer 0 (the model's own eager weights); the survivors keep their own level-1 vectors."""
    batch, embeds, positions, visual, deepstack = _full_prompt(model)
    with tokenpress.compress(model, {"name": "f", "stages": [{"method": "fastv", "layers": [1],
                                                               "params": {"keep_ratio": 0.5}}]}):
        actual = model(**batch).logits[:, -len(PROMPT.after):]

    layer = model.model.language_model.layers[0]
    count = embeds.shape[1]
    mask = torch.full((count, count), torch.finfo(embeds.dtype).min).triu(1)[None, None]
    cos_sin = model.model.language_model.rotary_emb(embeds, positions)
    _, weights = layer.self_attn(layer.input_layernorm(embeds), attention_mask=mask, position_embeddings=cos_sin)
    scores = weights[0, :, -1].mean(0)[visual]
    top = torch.topk(scores, 8).indices.sort().values
    slots = torch.cat([torch.nonzero(~visual).flatten(), torch.nonzero(visual).flatten()[top]]).sort().values
    expected = by_hand(model, embeds, positions, visual, deepstack, keep={1: slots})[:, -len(PROMPT.after):]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_token_routed_around_a_layer_still_receives_its_deepstack_level(model, register_methods):
    register_methods(RouteHalf)
    batch, embeds, positions, visual, deepstack = _full_prompt(model)
    with tokenpress.compress(model, {"name": "r", "stages": [{"method": "test-route-half", "layers": [0, 1]}]}):
        actual = model(**batch).logits[:, -len(PROMPT.after):]
    rank = torch.cumsum(visual.long(), 0) - 1
    through = torch.nonzero(~visual | (rank % 2 == 0)).flatten()
    expected = by_hand(model, embeds, positions, visual, deepstack, route={0: through, 1: through})
    torch.testing.assert_close(actual, expected[:, -len(PROMPT.after):], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_decoder_merge_merges_the_pending_deepstack_levels_like_the_hidden_states(model, register_methods):
    """Merge at layer 1: tokens 0+1 and 2+3 become their means (hidden states and level-1 vectors alike,
    at the first member's place), token 4 is dropped."""
    register_methods(MergePairs)
    batch, embeds, positions, visual, deepstack = _full_prompt(model)
    with tokenpress.compress(model, {"name": "m", "stages": [{"method": "test-merge-pairs", "layers": [1]}]}):
        actual = model(**batch).logits[:, -len(PROMPT.after):]

    def merge(index: int, state: dict) -> None:
        if index != 1:
            return
        slots = torch.nonzero(state["visual"]).flatten()
        hidden = state["hidden"].clone()
        levels = [level.clone() for level in state["deepstack"]]
        for first, second in ((0, 1), (2, 3)):
            hidden[:, slots[first]] = (hidden[:, slots[first]] + hidden[:, slots[second]]) / 2
            for level in levels:
                level[first] = (level[first] + level[second]) / 2
        gone = {1, 3, 4}
        keep = torch.tensor([slot for slot in range(hidden.shape[1]) if slot not in {int(slots[i]) for i in gone}])
        kept_visual = torch.tensor([i for i in range(len(slots)) if i not in gone])
        state.update(hidden=hidden[:, keep], positions=state["positions"][:, :, keep], visual=state["visual"][keep],
                     deepstack=[level[kept_visual] for level in levels])

    expected = by_hand(model, embeds, positions, visual, deepstack, before=merge)
    torch.testing.assert_close(actual, expected[:, -len(PROMPT.after):], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scorer_rows_equal_eager_attention_weights_with_deepstack_between_layers(model):
    """The scorer recomputes a layer's attention rows from what enters it: the previous layer's output with its
    DeepStack level added (``after_layer``; the hidden states the model records are the layers' outputs,
    before the addition); the interleaved rotary tables go through as the layers apply them."""
    batch = qwen_batch(model, [PROMPT], grids=[(8, 12)])  # unpadded: the packed layout is the model's
    adapter = tokenpress.find_adapter(model)
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    tokens, _ = adapter.encode_images(batch, [])
    sequence = adapter.build_sequence(batch["input_ids"], batch["attention_mask"], adapter.project(tokens),
                                      batch["input_ids"].shape[1], compact=False)
    last = sequence.last_prompt_index().unsqueeze(1)
    for layer in range(adapter.num_layers):
        entering = dataclasses.replace(sequence, hidden=out.hidden_states[layer])
        if layer > 0:
            entering = adapter.after_layer(layer - 1, entering)
        rows = attention_rows(adapter, layer, entering, last)
        expected = out.attentions[layer][:, :, -1].mean(1)
        torch.testing.assert_close(rows[:, 0], expected, rtol=1e-5, atol=1e-6)


# --- positions, rope_deltas, batches and generation --------------------------------------------------------


class RecordSequence(tokenpress.Method):
    name = "test-record-sequence"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)
    seen: list = []

    @tokenpress.hookimpl
    def decoder_layer(self, context):
        RecordSequence.seen.append(context.sequence)


@torch.no_grad()
def test_survivors_keep_their_get_rope_index_positions_and_decoding_continues_from_rope_deltas(qwen3,
                                                                                                register_methods):
    register_methods(RecordSequence)
    RecordSequence.seen.clear()
    batch = qwen_batch(qwen3, sample_prompts(2), grids=[(8, 12), (8, 8)])
    positions, rope_deltas = full_positions(qwen3, batch)
    stack = {"name": "q", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}},
                                     {"method": "test-record-sequence", "layers": [1, 2]}]}
    with tokenpress.compress(qwen3, stack) as handle:
        out = qwen3.model(**batch, use_cache=True)
    assert handle.report().records[0].tokens_out == [12, 8]
    for sequence in RecordSequence.seen:
        for sample in range(2):
            visual = sequence.valid[sample] & sequence.is_visual[sample]
            first = int((batch["input_ids"][sample] == QWEN_IMAGE_TOKEN_ID).nonzero()[0])
            expected = positions[:, sample, first + sequence.visual_id[sample][visual] % 24]
            assert torch.equal(sequence.positions[:, sample][:, visual], expected)
            text = sequence.valid[sample] & ~sequence.is_visual[sample]
            expected_text = positions[:, sample, sequence.column[sample][text]]
            assert torch.equal(sequence.positions[:, sample][:, text], expected_text)
        assert sequence.extra is None or "deepstack_0" not in sequence.extra  # level 0 was added after layer 0
    lengths = batch["attention_mask"].sum(-1)
    for next_position in compat.output_cache(out).tokenpress_state.next_position:
        assert torch.equal(next_position, lengths + rope_deltas[:, 0])
    if "rope_deltas" in {field.name for field in dataclasses.fields(out)}:  # the output field, up to 5.23
        assert torch.equal(out.rope_deltas, rope_deltas)


@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_mixed_sizes_with_padding_each_sample_as_alone_and_cache_equals_no_cache(model, positions):
    batch = qwen_batch(model, sample_prompts(3), grids=[(8, 8), (8, 12), (4, 8)])
    stack = {"name": "c", "positions": positions,
             "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                        {"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}]}
    with tokenpress.compress(model, stack):
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        alone = [model.generate(**select_qwen_rows(batch, i), max_new_tokens=5, do_sample=False)[0, -5:]
                 for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -5:], torch.stack(alone))


# --- videos: one TokenState row per temporal slice ---------------------------------------------------------


@pytest.mark.parametrize("stage,kept", [
    ({"method": "random", "params": {"keep_ratio": 1.0}}, [16, 16]),
    ({"method": "pool", "params": {"kernel": 2}}, [4, 4]),
    ({"method": "random", "params": {"keep_ratio": 0.25}}, [4, 4]),
])
@torch.no_grad()
def test_a_video_is_one_row_per_temporal_slice(qwen3, stage, kept, record_tokens):
    batch = video_batch(qwen3, PROMPT)
    expected = qwen3(**batch).logits
    stack = {"name": "v", "stages": [stage, {"method": "test-record-tokens", "at": "query_conditioned"}]}
    with tokenpress.compress(qwen3, stack) as handle:
        actual = qwen3(**batch).logits
        cached = qwen3.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = qwen3.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert record_tokens[0].counts().tolist() == kept and record_tokens[0].original_grid.tolist() == [[1, 4, 4]] * 2
    assert (handle.report().records[0].tokens_in, handle.report().records[0].tokens_out) == ([32], [sum(kept)])
    if kept == [16, 16]:  # identity: each slice at its own start, DeepStack as the model adds it
        assert torch.equal(actual, expected)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_a_video_slice_drop_keeps_the_slices_positions_and_deepstack(qwen3, record_tokens):
    """Random drops in both slices of a video: a by-hand run with the kept units' own features, DeepStack
    vectors and positions (the video's own get_rope_index: each slice positioned at its own start)."""
    batch = video_batch(qwen3, PROMPT)
    stack = {"name": "v", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "test-record-tokens"}]}
    with tokenpress.compress(qwen3, stack):
        actual = qwen3(**batch).logits[:, -len(PROMPT.after):]
    tokens = record_tokens[0]
    kept = torch.cat([tokens.grid_index[row][tokens.valid[row]] + 16 * row for row in range(2)])
    out = qwen3.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
    ids = batch["input_ids"][0]
    positions, _ = full_positions(qwen3, batch)
    placeholders = torch.nonzero(ids == QWEN_VIDEO_TOKEN_ID).flatten()
    present = ids != QWEN_VIDEO_TOKEN_ID
    present[placeholders[kept]] = True
    embeds = qwen3.model.language_model.embed_tokens(ids.unsqueeze(0))
    embeds[0, placeholders[kept]] = out.pooler_output[0][kept]
    visual = (ids == QWEN_VIDEO_TOKEN_ID)[present]
    expected = by_hand(qwen3, embeds[:, present], positions[:, :, present], visual,
                       [level[0][kept] for level in out.deepstack_features])
    torch.testing.assert_close(actual, expected[:, -len(PROMPT.after):], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_images_and_a_video_in_one_prompt_are_the_models_own(qwen3):
    image = qwen_batch(qwen3, [Prompt([1, 5], [])], grids=[(4, 8)])
    video = video_batch(qwen3, Prompt([], [7, 8, 9]), grid=(4, 4))
    ids = torch.cat([image["input_ids"], video["input_ids"]], dim=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": image["pixel_values"],
             "image_grid_thw": image["image_grid_thw"], "pixel_values_videos": video["pixel_values_videos"],
             "video_grid_thw": video["video_grid_thw"],
             "mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN_ID).int() + 2 * (ids == QWEN_VIDEO_TOKEN_ID).int()}
    expected = qwen3(**batch).logits
    with tokenpress.compress(qwen3, {"name": "i", "stages": [{"method": "random", "params": {"keep_ratio": 1.0}}]}):
        assert torch.equal(qwen3(**batch).logits, expected)


# --- encoder signals --------------------------------------------------------------------------------------


@contextmanager
def eager_vision_weights(model, module) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """(block, weights (1, H, n, n)) of every segment the vision blocks attend in, from the model's own eager
    attention (its module-level ``eager_attention_forward``, wrapped for the block)."""
    seen: list[tuple[int, torch.Tensor]] = []
    current = {}
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        seen.append((current["block"], weights))
        return out, weights

    def entering(index):
        def hook(*_):
            current["block"] = index
        return hook

    hooks = [block.register_forward_pre_hook(entering(index)) for index, block in enumerate(model.model.visual.blocks)]
    module.eager_attention_forward = recording
    try:
        yield seen
    finally:
        module.eager_attention_forward = original
        for hook in hooks:
            hook.remove()


def _received_reference(model, module, batch: dict, tokens, blocks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Per block: each unit's mean over its 4 patches of the attention each patch receives (the eager weights
    averaged over heads and the queries of its segment), laid out like ``tokens``: units found by their
    features in the encoder's own order (its windows reorder them)."""
    visual = model.model.visual
    seen_out = {}
    hook = visual.blocks[-1].register_forward_hook(lambda _m, _a, output: seen_out.update(out=output))
    try:
        with eager_vision_weights(model, module) as seen:
            visual(batch["pixel_values"].type(visual.dtype), grid_thw=batch["image_grid_thw"])
    finally:
        hook.remove()
    width = visual.config.hidden_size
    encoder_units = seen_out["out"].reshape(-1, 4 * width)
    flat = tokens.embeddings[tokens.valid]
    where = torch.tensor([int(torch.nonzero((encoder_units == unit).all(-1)).flatten()[0]) for unit in flat])
    expected = {}
    for block in blocks:
        per_patch = torch.cat([weights[0].mean(0).mean(0) for index, weights in seen if index == block])
        per_unit = per_patch.reshape(-1, 4).mean(-1)
        values = torch.zeros(tokens.valid.shape)
        values[tokens.valid] = per_unit[where]
        expected[block] = values
    return expected


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl"])
@torch.no_grad()
def test_attention_received_equals_the_encoders_own_eager_attention(family, qwen3):
    """Qwen3-VL: full attention per image; Qwen2.5-VL: block 0 attends within windows (an image of 3x5 units
    has partial ones), block 1 over the whole image. Each segment's values sum to 1."""
    if family == "qwen3-vl":
        model, module, grids = qwen3, modeling_qwen3_vl, [(8, 8), (8, 12)]
    else:
        model, module, grids = tiny_qwen2_5_vl("eager"), modeling_qwen2_5_vl, [(8, 8), (6, 10)]
    batch = qwen_batch(model, sample_prompts(2), grids=grids)
    adapter = tokenpress.find_adapter(model)
    requests = [AttentionReceived(layer=0), AttentionReceived(layer=1), AttentionReceived(layer=-1, heads="full"),
                EncoderKeys(layer=0)]
    plain, _ = adapter.encode_images(batch, [])
    tokens, found = adapter.encode_images(batch, requests)
    assert torch.equal(tokens.embeddings, plain.embeddings)  # asking for signals changes nothing else
    expected = _received_reference(model, module, batch, tokens, (0, 1))
    torch.testing.assert_close(found[AttentionReceived(layer=0)], expected[0])
    torch.testing.assert_close(found[AttentionReceived(layer=1)], expected[1])
    full = found[AttentionReceived(layer=-1, heads="full")]
    assert full.shape == tokens.valid.shape and bool((full[tokens.valid] > 0).all())
    counts = tokens.counts().tolist()
    sums = (full * tokens.valid).sum(-1) * 4  # 4 patches per unit; the last block attends over the image
    torch.testing.assert_close(sums, torch.ones(len(counts)))
    assert found[EncoderKeys(layer=0)].shape == (*tokens.valid.shape, 4 * model.config.vision_config.hidden_size)


@torch.no_grad()
def test_encoder_keys_are_the_blocks_own_per_unit(qwen3):
    batch = qwen_batch(qwen3, sample_prompts(1))
    adapter = tokenpress.find_adapter(qwen3)
    tokens, found = adapter.encode_images(batch, [EncoderKeys(layer=1, heads="mean")])
    visual = qwen3.model.visual
    seen = {}
    hook = visual.blocks[1].register_forward_pre_hook(lambda _m, args: seen.update(block_input=args[0]))
    try:
        visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    finally:
        hook.remove()
    block, width, heads = visual.blocks[1], visual.config.hidden_size, visual.config.num_heads
    keys = block.attn.qkv(block.norm1(seen["block_input"]))[:, width:2 * width]
    keys = keys.reshape(-1, heads, width // heads).mean(1)
    torch.testing.assert_close(found[EncoderKeys(layer=1, heads="mean")][0], keys.reshape(16, -1))


def test_stages_inside_the_encoder_are_refused_in_one_sentence(qwen3):
    adapter = tokenpress.find_adapter(qwen3)
    assert adapter.feature_blocks() is None
    refusal = adapter.check_encoder_blocks((0,))
    assert "DeepStack mergers" in refusal and "blocks 0, 1 and the last" in refusal and "\n" not in refusal
    assert refusal.count(". ") == 0 and not refusal.endswith(".")


# --- the MoE variant's output class ---------------------------------------------------------------------


@torch.no_grad()
def test_the_moe_inner_output_is_the_class_its_forward_returns(qwen3_moe):
    batch = qwen_batch(qwen3_moe, [PROMPT])
    returned = type(qwen3_moe.model(**batch))
    adapter = tokenpress.find_adapter(qwen3_moe)
    assert isinstance(adapter, Qwen3VLMoeAdapter) and compat.output_class(qwen3_moe.model) is returned
    assert "router_logits" in {field.name for field in dataclasses.fields(returned)}
    with tokenpress.compress(qwen3_moe, {"name": "f", "stages": [{"method": "fastv", "layers": [1],
                                                                   "params": {"keep_ratio": 0.5}}]}):
        inner = qwen3_moe.model(**batch)
        outer = qwen3_moe(**batch, output_router_logits=True)
    assert type(inner) is returned and inner.router_logits is None and outer.aux_loss == 0


# --- FLOPs ---------------------------------------------------------------------------------------------------


class ReceivedKeep(tokenpress.Method):
    """Test method: keeps the half of each image's tokens that receive the most attention (last block), after
    asking for keys and a full-width received attention too (each signal charged once)."""

    name = "test-received-keep"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    def required_signals(self):
        return [AttentionReceived(layer=-1), AttentionReceived(layer=0, heads="full"), EncoderKeys(layer=1)]

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        counts = tokenpress.keep_counts_on_host(tokens.counts_on_host(), 0.5)
        scores = context.signals[AttentionReceived(layer=-1)]
        return tokens.keep(topk_mask(scores, tokens.valid, torch.tensor(counts)), counts=counts)

    def promised_count(self, tokens_in):
        return tokenpress.keep_count(tokens_in, 0.5)


STACKS = {
    "empty": [],
    "fastv": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}],
    "pool": [{"method": "pool", "params": {"kernel": 2}}],
    "random": [{"method": "random", "params": {"keep_ratio": 0.25}}],
    "alvts": [{"method": "alvts", "params": {"keep_ratio": 0.25}}],
    "pixel_unshuffle": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}],
    "ldp": [{"method": "ldp", "params": {"stride": 2}}],
    "qformer": [{"method": "qformer", "params": {"queries": 6, "heads": 2}}],
    "signals": [{"method": "test-received-keep"}],
}


def _counted(model, batch: dict, stack: dict) -> tuple[int, flops.Costs]:
    with torch.no_grad(), tokenpress.compress(model, stack) as handle:
        with FlopCounterMode(display=False) as counter:
            model(**batch, logits_to_keep=1, use_cache=False)
        costs = flops.measured_from_handle(handle, batch)
    return compat.counted_flops(counter), costs


@pytest.mark.parametrize("stack_name", list(STACKS))
@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3-vl-moe", "qwen2.5-vl"])
def test_the_flops_model_equals_torchs_counter(family, stack_name, qwen3, qwen3_moe, register_methods):
    if family == "qwen2.5-vl" and stack_name != "signals":
        pytest.skip("tests/test_flops.py covers Qwen2.5-VL's other stacks")
    register_methods(ReceivedKeep)
    model = {"qwen3-vl": qwen3, "qwen3-vl-moe": qwen3_moe}.get(family) or tiny_qwen2_5_vl("eager")
    batch = qwen_batch(model, [PROMPT], grids=[(8, 12)])
    stack = {"name": stack_name, "stages": STACKS[stack_name]}
    counted, costs = _counted(model, batch, stack)
    assert costs.total == pytest.approx(counted, rel=1e-9)
    text = int((batch["input_ids"] != QWEN_IMAGE_TOKEN_ID).sum())
    patch = model.config.vision_config.patch_size
    breakdown = flops.simulate(model.config, stack, text, (8 * patch, 12 * patch))
    assert breakdown.compressed_flops == pytest.approx(counted, rel=1e-9)
    if stack_name == "empty":
        assert breakdown.baseline_flops == counted


def test_the_flops_model_on_a_video_and_a_refused_moe_config(qwen3):
    batch = video_batch(qwen3, PROMPT, frames=2, grid=(8, 12))
    for stages in ([], [{"method": "pool", "params": {"kernel": 2}}]):
        counted, costs = _counted(qwen3, batch, {"name": "v", "stages": stages})
        assert costs.total == pytest.approx(counted, rel=1e-9)
    config = tiny_qwen3_vl_moe().config
    config.text_config.mlp_only_layers = [0]
    with pytest.raises(flops.FlopsError, match="mixes dense and mixture-of-experts"):
        flops.simulate(config, {"name": "e", "stages": []}, 5, (64, 64))
