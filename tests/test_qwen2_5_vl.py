"""Qwen2.5-VL specifics: merge units and the merger, M-RoPE positions of survivors, rope_deltas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenpress
from tokenpress.runtime import compat
from tokenpress.testing import Prompt, image_features_fed, qwen_batch, sample_prompts, select_qwen_rows, tiny_qwen2_5_vl
from tokenpress.testing.models import QWEN_IMAGE_TOKEN_ID, QWEN_VISION_END, QWEN_VISION_START


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl("eager")


@torch.no_grad()
def test_units_through_the_projector_equal_the_model_image_features(qwen):
    batch = qwen_batch(qwen, sample_prompts(2), grids=[(8, 8), (8, 12)])
    adapter = tokenpress.find_adapter(qwen)
    tokens, _ = adapter.encode_images(batch, {})
    assert tokens.grid.tolist() == [[1, 4, 4], [1, 4, 6]]
    projected = adapter.project(tokens)
    expected = qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    for image, features in enumerate(expected):
        assert torch.equal(projected.embeddings[image, : features.shape[0]], features)


class RecordSequence(tokenpress.Method):
    """Test method: records the sequence entering its layer."""

    name = "test-record-sequence"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)
    seen: list = []

    @tokenpress.hookimpl
    def decoder_layer(self, context):
        RecordSequence.seen.append(context.sequence)


@pytest.fixture
def recorder():
    class Plugin:
        @tokenpress.hookimpl
        def tokenpress_register_methods(self):
            return [RecordSequence]

    tokenpress.get_registry().register_plugin(Plugin(), name="test-record-plugin")
    RecordSequence.seen.clear()
    yield RecordSequence.seen
    tokenpress.get_registry(reload=True)


@torch.no_grad()
def test_fastv_survivors_keep_their_get_rope_index_positions_and_decoding_continues_from_rope_deltas(qwen, recorder):
    batch = qwen_batch(qwen, sample_prompts(2), grids=[(8, 12), (8, 8)])
    full_positions, rope_deltas = qwen.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])
    stack = {"name": "q", "stages": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}},
                                     {"method": "test-record-sequence", "layers": [2, 3]}]}
    with tokenpress.compress(qwen, stack) as handle:
        out = qwen(**batch, use_cache=True)
    assert handle.report().records[0].tokens_out == [12, 8]
    slots = 24  # widest image: 4 x 6 units
    for sequence in recorder:
        for sample in range(2):
            visual = sequence.valid[sample] & sequence.is_visual[sample]
            first_placeholder = int((batch["input_ids"][sample] == QWEN_IMAGE_TOKEN_ID).nonzero()[0])
            cell = sequence.visual_id[sample][visual] % slots
            expected = full_positions[:, sample, first_placeholder + cell]
            assert torch.equal(sequence.positions[:, sample][:, visual], expected)
            text = sequence.valid[sample] & ~sequence.is_visual[sample]
            expected_text = full_positions[:, sample, sequence.column[sample][text]]
            assert torch.equal(sequence.positions[:, sample][:, text], expected_text)
    assert recorder[0].visual_counts().tolist() == [12, 8]
    lengths = batch["attention_mask"].sum(-1)
    for next_position in compat.output_cache(out).tokenpress_state.next_position:
        assert torch.equal(next_position, lengths + rope_deltas[:, 0])


@torch.no_grad()
def test_pool_at_the_projector_equals_the_model_fed_pooled_features(qwen):
    prompt = Prompt([1, 5, 6], [7, 8, 9, 10])
    batch = qwen_batch(qwen, [prompt], grids=[(8, 12)])
    stack = {"name": "p", "stages": [{"method": "pool", "at": "projector", "params": {"kernel": 2}}]}
    with tokenpress.compress(qwen, stack):
        actual = qwen(**batch).logits

    features = qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    grid = features.reshape(1, 4, 6, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(6, -1)
    input_ids = torch.tensor([prompt.before + [QWEN_VISION_START] + [QWEN_IMAGE_TOKEN_ID] * 6 + [QWEN_VISION_END]
                              + prompt.after])
    with image_features_fed(qwen, [pooled]):
        expected = qwen(input_ids=input_ids, pixel_values=batch["pixel_values"],
                        image_grid_thw=torch.tensor([[1, 4, 6]]),
                        mm_token_type_ids=(input_ids == QWEN_IMAGE_TOKEN_ID).int()).logits
    torch.testing.assert_close(actual[:, -len(prompt.after):], expected[:, -len(prompt.after):], rtol=1e-5,
                               atol=1e-5)


@torch.no_grad()
def test_compact_positions_generate_with_and_without_cache_alike(qwen):
    batch = qwen_batch(qwen, sample_prompts(3), grids=[(8, 8), (8, 12), (4, 8)])
    stack = {"name": "c", "positions": "compact",
             "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                        {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}]}
    with tokenpress.compress(qwen, stack):
        cached = qwen.generate(**batch, max_new_tokens=5, do_sample=False)
        uncached = qwen.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        alone = [qwen.generate(**select_qwen_rows(batch, i), max_new_tokens=5, do_sample=False)[0, -5:]
                 for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -5:], torch.stack(alone))


@torch.no_grad()
def test_ratio_one_is_bit_identical_on_qwen(qwen):
    batch = qwen_batch(qwen, [Prompt([1, 5], [7, 8, 9])])
    expected = qwen(**batch).logits
    with tokenpress.compress(qwen, {"name": "i", "stages": [{"method": "fastv", "layers": [1],
                                                                  "params": {"keep_ratio": 1.0}}]}):
        assert torch.equal(qwen(**batch).logits, expected)


def video_batch(model, frames: int = 2):
    from tokenpress.testing.models import QWEN_VIDEO_TOKEN_ID

    vision = model.config.vision_config
    units = frames * 4 * 4
    ids = torch.tensor([[1, 5, QWEN_VISION_START] + [QWEN_VIDEO_TOKEN_ID] * units + [QWEN_VISION_END, 7, 8, 9]])
    generator = torch.Generator().manual_seed(4)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(frames * 64, 3 * vision.temporal_patch_size * vision.patch_size ** 2,
                                           generator=generator),
        "video_grid_thw": torch.tensor([[frames, 8, 8]]),
        "second_per_grid_ts": torch.tensor([1.0]),
        "mm_token_type_ids": (ids == QWEN_VIDEO_TOKEN_ID).int() * 2,
    }


@pytest.mark.parametrize("stage,kept", [
    ({"method": "random", "params": {"keep_ratio": 1.0}}, 32),
    ({"method": "pool", "params": {"kernel": 1}}, 32),
    ({"method": "pool", "params": {"kernel": 2}}, 8),
    ({"method": "random", "params": {"keep_ratio": 0.25}}, 8),
])
@torch.no_grad()
def test_video_goes_through_the_pre_llm_points(qwen, stage, kept):
    batch = video_batch(qwen)
    expected = qwen(**batch).logits
    with tokenpress.compress(qwen, {"name": "v", "stages": [stage]}) as handle:
        actual = qwen(**batch).logits
        cached = qwen.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = qwen.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    record = handle.report().records[0]
    assert (record.tokens_in, record.tokens_out) == ([32], [kept])
    if kept == 32:  # identity settings: the video's 3-D positions (with its time interval) are the model's
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_encoder_keys_follow_the_units_as_the_features_do(qwen):
    """EncoderKeys on Qwen2.5-VL: the block's keys (its norm, the k third of its qkv, before the rotary
    embedding) of each merge unit's four patches, side by side in the unit's place, exactly as the
    features are: checked by finding each unit's patches in the encoder's own (windowed) order."""
    from tokenpress.core.signals import EncoderKeys

    model = qwen
    batch = qwen_batch(model, sample_prompts(2))
    adapter = tokenpress.find_adapter(model)
    requests = [EncoderKeys(layer=1), EncoderKeys(layer=-1, heads="mean")]
    plain, _ = adapter.encode_images(batch, [])
    tokens, found = adapter.encode_images(batch, requests)
    assert torch.equal(tokens.embeddings, plain.embeddings)  # asking for keys changes nothing else
    visual = model.model.visual
    seen = {}

    def keep(key):
        def hook(module, args, kwargs=None, output=None):
            seen[key] = output if output is not None else (args[0] if args else kwargs["hidden_states"])
        return hook

    hooks = [visual.blocks[index].register_forward_pre_hook(keep(index), with_kwargs=True)
             for index in (1, len(visual.blocks) - 1)]
    hooks.append(visual.blocks[-1].register_forward_hook(lambda module, args, output: keep("out")(
        module, args, output=output)))
    try:
        visual(batch["pixel_values"].type(visual.dtype), grid_thw=batch["image_grid_thw"])
    finally:
        for hook in hooks:
            hook.remove()
    width, heads = visual.config.hidden_size, visual.config.num_heads
    windowed_units = seen["out"].reshape(-1, 4 * width)  # the encoder's output, unit by unit, its own order
    for index, request in zip((1, len(visual.blocks) - 1), requests, strict=True):
        block = visual.blocks[index]
        keys = block.attn.qkv(block.norm1(seen[index]))[:, width:2 * width]
        if request.heads == "mean":
            keys = keys.view(-1, heads, width // heads).mean(1)
        keys = keys.reshape(windowed_units.shape[0], -1)
        flat = tokens.embeddings[tokens.valid]
        where = [int(torch.nonzero((windowed_units == unit).all(-1)).flatten()[0]) for unit in flat]
        torch.testing.assert_close(found[request][tokens.valid], keys[where])
