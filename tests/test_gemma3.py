"""Gemma 3 specifics on a tiny random-weight model: the pooled grid through the projector, bidirectional image
blocks and sliding windows (prefill, decoding, scorer), per-layer-type rotary tables, the attention scale, SigLIP
signals averaged over the pooled cells, the FLOPs model, and the refusals.

The references are written here with the model's own modules only (its embeddings, vision tower, projector
pieces, decoder layers, rotary embedding) and masks built by hand from token_type_ids runs and positions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from tokenpress.core import flops
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys
from tokenpress.families.gemma3.testbed import (
    GEMMA_IMAGE_TOKEN_ID,
    gemma_batch,
    gemma_image_tokens,
    select_gemma_rows,
    tiny_gemma3,
)
from tokenpress.runtime import compat
from tokenpress.runtime.scorer import attention_rows
from tokenpress.testing import Prompt, sample_prompts

PROMPT = Prompt([1, 5, 6, 7], [8, 9, 10, 11, 12])
FASTV = {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}
POOL = {"method": "pool", "params": {"kernel": 2}}
RANDOM = {"method": "random", "params": {"keep_ratio": 0.5, "seed": 3}}
IDENTITY = {"method": "fastv", "layers": [1], "params": {"keep_ratio": 1.0}}


def stack(*stages: dict, positions: str = "original") -> dict:
    return {"name": "gemma3-test", "positions": positions, "stages": list(stages)}


@pytest.fixture(scope="module")
def eager():
    return tiny_gemma3("eager")


@pytest.fixture(scope="module")
def sdpa():
    return tiny_gemma3("sdpa")


@pytest.fixture(params=["eager", "sdpa"])
def gemma(request, eager, sdpa):
    return eager if request.param == "eager" else sdpa


# --- an independent reference: the model's own layers, masks built by hand -------------------------------------


def blocks_of(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(N,) the run of token_type_ids == 1 each token is in (0, 1, ...), -1 outside: one sample."""
    blocks, run, previous = [], -1, 0
    for value in token_type_ids.tolist():
        if value == 1 and previous != 1:
            run += 1
        blocks.append(run if value == 1 else -1)
        previous = value
    return torch.tensor(blocks)


def hand_allowed(blocks: torch.Tensor | None, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """(N, N) bool for one unpadded sequence in slot order: causal or the same image block, and, with a window,
    ``position(query) - position(key) < window``."""
    count = positions.shape[0]
    query, key = torch.arange(count)[:, None], torch.arange(count)[None, :]
    allowed = key <= query
    if blocks is not None:
        allowed = allowed | ((blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0))
    if window is not None:
        allowed = allowed & (positions[None, :] > positions[:, None] - window)
    return allowed


def run_by_hand(model: Any, embeds: torch.Tensor, blocks: torch.Tensor | None,
                keep: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed hidden states of one unpadded sequence through the model's own decoder layers, with hand-built
    masks (image blocks, the window on sliding layers) and each layer type's rotary table at the tokens' original
    positions; ``keep[l]``: the indices kept from layer l on. Returns them and the kept positions."""
    language_model = model.model.language_model
    config = language_model.config
    positions = torch.arange(embeds.shape[1])
    hidden = embeds
    for index, layer in enumerate(language_model.layers):
        if keep and index in keep:
            hidden, positions = hidden[:, keep[index]], positions[keep[index]]
            blocks = None if blocks is None else blocks[keep[index]]
        layer_type = config.layer_types[index]
        window = config.sliding_window if layer_type == "sliding_attention" else None
        allowed = hand_allowed(blocks, positions, window)[None, None]
        if config._attn_implementation == "eager":
            allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        tables = language_model.rotary_emb(hidden, positions[None], layer_type)
        out = layer(hidden, attention_mask=allowed, position_ids=positions[None], position_embeddings=tables)
        hidden = out[0] if isinstance(out, tuple) else out
    return language_model.norm(hidden), positions


def fed_embeddings(model: Any, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The model's (scaled) text embeddings with its image placeholders holding ``features`` (unscaled)."""
    embeds = model.model.language_model.embed_tokens(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def pooled_patch_grid(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(I, C, s, s): the tower's features (after post_layernorm) averaged over the projector's cells, by hand."""
    features = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    grid = features.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
    tokens_side = int(model.config.mm_tokens_per_image ** 0.5)
    return F.avg_pool2d(grid, side // tokens_side)


def project_by_hand(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    projector = model.model.multi_modal_projector
    return torch.matmul(projector.mm_soft_emb_norm(tokens), projector.mm_input_projection_weight)


# --- the image path ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_the_pooled_tokens_through_the_projector_are_the_model_image_features(eager):
    batch = gemma_batch(eager, sample_prompts(2), images=[1, 2])
    adapter = tokenpress.find_adapter(eager)
    tokens, signals = adapter.encode_images(batch, [])
    assert not signals and tokens.grid.tolist() == [[1, 4, 4]] * 3 and tokens.embeddings.shape[-1] == 32
    assert adapter.encoder_width() == 32 and adapter.projector_mlp() is None
    grid = pooled_patch_grid(eager, batch["pixel_values"])
    torch.testing.assert_close(tokens.embeddings, grid.flatten(2).transpose(1, 2))
    projected = adapter.project(tokens)
    expected = eager.model.get_image_features(batch["pixel_values"]).pooler_output
    assert projected.space == "llm" and torch.equal(projected.embeddings, expected)


@torch.no_grad()
def test_text_embeddings_are_scaled_and_visual_tokens_are_not(eager, register_methods):
    seen = []

    class Record(tokenpress.Method):
        name = "test-gemma-record-initial"
        Config = tokenpress.MethodConfig
        points = ("decoder_layer",)

        @tokenpress.hookimpl
        def decoder_layer(self, context):
            seen.append(context.sequence)

    register_methods(Record)
    batch = gemma_batch(eager, [PROMPT])
    with tokenpress.compress(eager, stack({"method": "test-gemma-record-initial", "layers": [0]})):
        eager(**batch)
    sequence = seen[0]
    text = sequence.valid[0] & ~sequence.is_visual[0]
    ids = batch["input_ids"][0][sequence.column[0][text]]
    table = eager.model.language_model.embed_tokens.weight
    torch.testing.assert_close(sequence.hidden[0][text], table[ids] * 64 ** 0.5)
    features = eager.model.get_image_features(batch["pixel_values"]).pooler_output[0]
    assert torch.equal(sequence.hidden[0][sequence.is_visual[0]], features)


@torch.no_grad()
def test_an_image_id_outside_the_vocabulary_is_embedded_as_zero():
    model = tiny_gemma3("eager")
    model.config.image_token_id = model.config.text_config.vocab_size  # the model looks it up as token 0
    batch = gemma_batch(model, [PROMPT])
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["token_type_ids"].bool(), model.config.image_token_id)
    expected = model(**batch).logits
    with tokenpress.compress(model, stack(IDENTITY)):
        assert torch.equal(model(**batch).logits, expected)


# --- identity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [[], [IDENTITY], [{"method": "pool", "params": {"kernel": 1}}],
                                    [{"method": "random", "params": {"keep_ratio": 1.0}}],
                                    [{"method": "fastv", "layers": [0, 3],
                                      "params": {"keep_ratio": 1.0, "query": "text", "score_layer": "current"}}]],
                         ids=["empty", "fastv", "pool", "random", "fastv-text"])
@pytest.mark.parametrize("token_types", [True, False], ids=["token_type_ids", "causal"])
@torch.no_grad()
def test_identity_settings_are_bit_identical(gemma, stages, token_types):
    """With token_type_ids the model attends both ways among an image's tokens, without it causally: the
    compressed forward at identity settings gives the model's logits, bit for bit, either way."""
    batch = gemma_batch(gemma, [PROMPT, PROMPT], images=[2, 2])  # no padding: the model's own positions agree
    batch["pixel_values"][2:] = -batch["pixel_values"][2:]
    if not token_types:
        del batch["token_type_ids"]
    expected = gemma(**batch).logits
    with tokenpress.compress(gemma, stack(*stages)):
        actual = gemma(**batch).logits
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_the_image_blocks_change_the_logits(eager):
    batch = gemma_batch(eager, [PROMPT])
    causal = {key: value for key, value in batch.items() if key != "token_type_ids"}
    with tokenpress.compress(eager, stack(IDENTITY)):
        assert not torch.allclose(eager(**batch).logits, eager(**causal).logits, atol=1e-4)


@torch.no_grad()
def test_adjacent_images_share_one_block_as_in_the_model(eager):
    """Two images with nothing between their placeholders are one run of token_type_ids: one block."""
    image = gemma_image_tokens(eager)
    ids = torch.tensor([[1, 5] + image[:-2] + image[2:] + [8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": (ids == GEMMA_IMAGE_TOKEN_ID).long(),
             "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    expected = eager(**batch).logits
    with tokenpress.compress(eager, stack(IDENTITY)):
        assert torch.equal(eager(**batch).logits, expected)


@torch.no_grad()
def test_generate_attached_at_identity_equals_the_model_with_its_sliding_cache(sdpa):
    """Decoding past the window (8 positions): the compressed cache keeps every key and the mask windows it; the
    model's own cache keeps 7 keys on its sliding layers. Left padding; an image with a crop beside one alone."""
    batch = gemma_batch(sdpa, sample_prompts(3, seed=2), images=[1, 2, 1])
    options = {"max_new_tokens": 12, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    expected = sdpa.generate(**batch, **options)
    with tokenpress.compress(sdpa, stack()):
        empty = sdpa.generate(**batch, **options)
    with tokenpress.compress(sdpa, stack(IDENTITY)) as handle:
        actual = sdpa.generate(**batch, **options)
        assert handle.report().records
    assert torch.equal(empty.sequences, expected.sequences)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_follow_up_turn_on_the_compressed_cache_equals_one_pass_of_the_model(eager):
    """Several new tokens at once against the compressed cache: causal among them, windowed on sliding layers."""
    batch = gemma_batch(eager, [PROMPT])
    follow_up = torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    whole = {"input_ids": torch.cat([batch["input_ids"], follow_up], 1),
             "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 10, dtype=torch.long),
             "token_type_ids": torch.cat([batch["token_type_ids"], torch.zeros_like(follow_up)], 1),
             "pixel_values": batch["pixel_values"]}
    expected = eager(**whole).logits[:, -10:]
    with tokenpress.compress(eager, stack(IDENTITY)):
        first = eager(**batch, use_cache=True)
        cache = compat.output_cache(first)
        assert cache.tokenpress_state is not None
        actual = eager(input_ids=follow_up, attention_mask=whole["attention_mask"],
                       **{compat.cache_argument(eager.model): cache}).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- pre-LLM compression is exact -------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["post_encoder", "projector"])
@torch.no_grad()
def test_pool_equals_the_model_fed_the_pooled_tokens(eager, point):
    """The 4x4 pooled grid pooled again 2x2 (in encoder space, or after the projector), laid out as 4 tokens per
    picture: the model given those embeddings and token_type_ids on its 4 placeholders gives the same logits."""
    batch = gemma_batch(eager, [PROMPT], images=[2])
    with tokenpress.compress(eager, stack({"method": "pool", "at": point, "params": {"kernel": 2}})) as handle:
        actual = eager(**batch).logits
    assert handle.report().records[0].tokens_out == [8]
    grid = pooled_patch_grid(eager, batch["pixel_values"])  # (2, C, 4, 4)
    if point == "post_encoder":
        features = project_by_hand(eager, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    else:
        projected = project_by_hand(eager, grid.flatten(2).transpose(1, 2))  # (2, 16, D)
        features = F.avg_pool2d(projected.transpose(1, 2).reshape(2, -1, 4, 4), 2).flatten(2).transpose(1, 2)
    picture = [108, 148] + [GEMMA_IMAGE_TOKEN_ID] * 4 + [149, 108]
    ids = torch.tensor([PROMPT.before + picture + [109] + picture + PROMPT.after])
    embeds = fed_embeddings(eager, ids, features.reshape(-1, features.shape[-1]))
    expected = eager(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                     token_type_ids=(ids == GEMMA_IMAGE_TOKEN_ID).long()).logits
    after = len(PROMPT.after)
    torch.testing.assert_close(actual[:, -after:], expected[:, -after:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[:, :len(PROMPT.before)], expected[:, :len(PROMPT.before)], rtol=0, atol=0)


# --- decoder-side compression: FastV against a reference built by hand -----------------------------------------


@pytest.fixture
def recorder(register_methods):
    """``test-gemma-masks``: records, at its layers, the sequence it sees and the masks the adapter gives the
    layer and the next one over it (a stage after FastV at the same layer sees the kept tokens)."""
    seen: list[dict[str, Any]] = []

    class RecordMasks(tokenpress.Method):
        name = "test-gemma-masks"
        Config = tokenpress.MethodConfig
        points = ("decoder_layer",)

        @tokenpress.hookimpl
        def decoder_layer(self, context):
            adapter, layer = context.adapter, context.layer_index
            seen.append({"sequence": context.sequence, "layer": layer,
                         "masks": {index: adapter.layer_mask(index, context.sequence)
                                   for index in (layer, layer + 1) if index < adapter.num_layers}})

    register_methods(RecordMasks)
    return seen


@torch.no_grad()
def test_fastv_keeps_the_image_blocks_of_its_kept_tokens_and_matches_the_model_run_by_hand(eager, recorder):
    """FastV at layer 2 on an image with one crop: the last prompt token's attention in layer 1 (the model's own
    eager attention weights, with token_type_ids) ranks the 32 visual tokens; the 16 kept ones attend to the kept
    tokens of their own image both ways, and on sliding layers within 8 of their original positions. The masks
    the adapter gives layers 2 and 3 equal the masks built directly from the kept tokens' blocks and positions,
    and the logits equal the model's own layers run by hand with them."""
    model = eager
    batch = gemma_batch(model, [PROMPT], images=[2])
    with tokenpress.compress(model, stack(FASTV, {"method": "test-gemma-masks", "layers": [2]})) as handle:
        actual = model(**batch).logits
    assert handle.report().records[0].tokens_out == [16]

    full = model(**batch, output_attentions=True)
    ids, token_types = batch["input_ids"][0], batch["token_type_ids"][0]
    visual = torch.nonzero(token_types).flatten()
    scores = full.attentions[1][0, :, -1, visual].mean(0)
    kept_visual = visual[torch.topk(scores, 16).indices.sort().values]
    keep = torch.cat([torch.nonzero(token_types == 0).flatten(), kept_visual]).sort().values
    blocks = blocks_of(token_types)

    seen = recorder[0]
    sequence = seen["sequence"]
    assert torch.equal(sequence.positions[0, 0], keep)  # original positions
    assert torch.equal(sequence.column[0][~sequence.is_visual[0]], keep[token_types[keep] == 0])
    window = model.config.text_config.sliding_window
    for layer, limit in ((2, window), (3, None)):
        mask = seen["masks"][layer]
        allowed = mask[0, 0] == 0  # eager: additive
        assert torch.equal(allowed, hand_allowed(blocks[keep], keep, limit))
    # the kept tokens of one image see each other both ways, not the other image's later tokens
    first_image = (blocks[keep] == 0).nonzero().flatten()
    assert bool(allowed[first_image[0], first_image[-1]]) and not bool(allowed[first_image[0], -1])

    features = model.model.get_image_features(batch["pixel_values"]).pooler_output
    embeds = fed_embeddings(model, ids[None], features.reshape(-1, features.shape[-1]))
    hidden, positions = run_by_hand(model, embeds, blocks, keep={2: keep})
    expected = model.lm_head(hidden)
    after = len(PROMPT.after)
    torch.testing.assert_close(actual[0, -after:], expected[0, -after:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_fastv_generates_alike_with_and_without_cache_and_alone(sdpa, positions):
    batch = gemma_batch(sdpa, sample_prompts(3, seed=1), images=[2, 1, 3])
    with tokenpress.compress(sdpa, stack(FASTV, positions=positions)) as handle:
        cached = sdpa.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=True)
        assert handle.report().records[0].tokens_out == [16, 8, 24]
        uncached = sdpa.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=False)
        alone = [sdpa.generate(**select_gemma_rows(batch, i), max_new_tokens=10, do_sample=False)[0, -10:]
                 for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -10:], torch.stack(alone))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("stages", [[FASTV], [RANDOM], [POOL], [POOL, FASTV]], ids=["fastv", "random", "pool",
                                                                                    "pool+fastv"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_each_sample_of_a_padded_batch_equals_the_sample_alone(gemma, padding_side, stages, positions):
    prompts = sample_prompts(3)
    batch = gemma_batch(gemma, prompts, images=[1, 3, 2], padding_side=padding_side)
    with tokenpress.compress(gemma, stack(*stages, positions=positions)) as handle:
        batched = gemma(**batch).logits
        records = handle.report().records
        for index in range(3):
            alone = gemma(**select_gemma_rows(batch, index)).logits[0]
            real = batch["attention_mask"][index].bool()
            after = len(prompts[index].after)
            torch.testing.assert_close(batched[index][real][-after:], alone[-after:], rtol=1e-5, atol=1e-5)
            for record, alone_record in zip(records, handle.report().records, strict=True):
                assert record.tokens_out[index] == alone_record.tokens_out[0]


# --- the scorer: per-layer rotary tables, the attention scale, the masks -----------------------------------------


@torch.no_grad()
def test_the_scorer_recomputes_the_models_own_attention_weights(register_methods):
    """query_pre_attn_scalar 24 (scale 24**-0.5, not head_dim**-0.5 = 0.25): the scorer's rows of a text token and
    of an image token equal the model's eager attention weights, on a sliding and on a full layer."""
    model = tiny_gemma3("eager", query_pre_attn_scalar=24)
    adapter = tokenpress.find_adapter(model)
    parts = adapter.attention_parts(0)
    assert parts.scaling == 24 ** -0.5 and parts.q_norm is model.model.language_model.layers[0].self_attn.q_norm
    batch = gemma_batch(model, [PROMPT], images=[2])
    rows: dict[int, torch.Tensor] = {}
    image_query = int(torch.nonzero(batch["token_type_ids"][0])[3])  # the 4th token of the first image

    class Rows(tokenpress.Method):
        name = "test-gemma-rows"
        Config = tokenpress.MethodConfig
        points = ("decoder_layer",)

        @tokenpress.hookimpl
        def decoder_layer(self, context):
            sequence = context.sequence
            query = torch.tensor([[sequence.length - 1, image_query]])
            rows[context.layer_index] = attention_rows(context.adapter, context.layer_index, sequence, query)

    register_methods(Rows)
    with tokenpress.compress(model, stack({"method": "test-gemma-rows", "layers": [0, 1]})):
        model(**batch)
    attentions = model(**batch, output_attentions=True).attentions
    for layer in (0, 1):
        expected = attentions[layer][0, :, [-1, image_query]].mean(0)
        torch.testing.assert_close(rows[layer][0], expected, rtol=1e-5, atol=1e-6)
    assert bool((rows[0][0, 0, : batch["input_ids"].shape[1] - 8] == 0).all())  # the window of a text query
    block = torch.nonzero(blocks_of(batch["token_type_ids"][0]) == 0).flatten()
    assert bool((rows[1][0, 1, block] > 0).all())  # an image token sees its whole image, later tokens included


@torch.no_grad()
def test_rotary_tables_follow_the_layer_type(eager):
    adapter = tokenpress.find_adapter(eager)
    hidden = torch.zeros(1, 30, 64)
    positions = torch.arange(30).view(1, 1, -1)
    rotary = eager.model.language_model.rotary_emb
    for layer, layer_type in enumerate(eager.config.text_config.layer_types):
        cos, sin = adapter.position_embeddings(hidden, positions, layer)
        expected_cos, expected_sin = rotary(hidden, positions[0], layer_type)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert not torch.allclose(adapter.rotary_tables(hidden, positions, 0)[0], adapter.rotary_tables(hidden, positions,
                                                                                                    1)[0])


# --- encoder signals ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_signals_are_the_patches_values_averaged_over_each_pooled_cell(eager, register_methods):
    """SigLIP has no class token: cls_attention with class_free 'received' is the attention each patch receives
    (the tower's own eager weights, averaged over heads and queries); keys are a block's k projection; both are
    averaged over the 2x2 patches of each pooled cell so that they line up with the tokens."""
    requests = [AttentionReceived(layer=0), ClsAttention(layer=0, class_free="received"), EncoderKeys(layer=1),
                EncoderKeys(layer=-1, heads="mean")]
    seen = []

    class Signals(tokenpress.Method):
        name = "test-gemma-signals"
        Config = tokenpress.MethodConfig
        points = ("post_encoder",)

        def required_signals(self):
            return requests

        @tokenpress.hookimpl
        def post_encoder(self, tokens, context):
            seen.append(dict(context.signals))
            return tokens

    register_methods(Signals)
    batch = gemma_batch(eager, [PROMPT], images=[2])
    with tokenpress.compress(eager, stack({"method": "test-gemma-signals"})):
        eager(**batch)
    signals = seen[0]
    tower = eager.model.vision_tower
    out = tower(pixel_values=batch["pixel_values"], output_attentions=True, output_hidden_states=True)

    def cells(values: torch.Tensor) -> torch.Tensor:
        grid = values.reshape(values.shape[0], 8, 8, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).squeeze(-1)

    received = out.attentions[0].mean(dim=2).mean(dim=1)  # (images, patches)
    torch.testing.assert_close(signals[AttentionReceived(layer=0)], cells(received[..., None]))
    torch.testing.assert_close(signals[ClsAttention(layer=0, class_free="received")], cells(received[..., None]))
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    keys = layers[1].self_attn.k_proj(layers[1].layer_norm1(out.hidden_states[1]))
    torch.testing.assert_close(signals[EncoderKeys(layer=1)], cells(keys))
    assert signals[EncoderKeys(layer=-1, heads="mean")].shape == (2, 16, 8)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_flash_attention_is_refused_in_one_sentence():
    model = tiny_gemma3("sdpa")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(tokenpress.UnsupportedModelError, match="bidirectional attention among each image") as error:
        tokenpress.compress(model, stack(FASTV))
    assert "\n" not in str(error.value) and "forward" not in model.model.__dict__


def test_stages_inside_the_encoder_are_refused_in_one_sentence(sdpa):
    with pytest.raises(tokenpress.UnsupportedModelError, match="average-pools the encoder's full 8x8 patch grid"):
        tokenpress.compress(sdpa, stack({"method": "tome", "layers": [0], "params": {"r": 2}}))
    assert "forward" not in sdpa.model.__dict__
    with tokenpress.compress(sdpa, stack({"method": "tome", "params": {"r": 2}})) as handle:  # after the encoder
        sdpa(**gemma_batch(sdpa, [PROMPT]))
    assert handle.report().records[0].tokens_out[0] < 16


def test_a_class_token_signal_is_refused_where_no_fallback_is_asked(sdpa):
    problem = tokenpress.find_adapter(sdpa).check_signal(ClsAttention(layer=-2))
    assert "no class token" in problem and "\n" not in problem


@torch.no_grad()
def test_token_type_ids_must_mark_the_placeholders(sdpa):
    batch = gemma_batch(sdpa, [PROMPT])
    batch["token_type_ids"][0, 0] = 1
    with tokenpress.compress(sdpa, stack(FASTV)), pytest.raises(tokenpress.CompressionError,
                                                                 match="exactly on the image placeholder"):
        sdpa(**batch)


@torch.no_grad()
def test_projector_replacements_start_from_a_seeded_mlp_since_the_projector_is_not_one(sdpa):
    """No two-layer MLP to copy: pixel_unshuffle refuses init: projector and, with init: auto, starts from the
    seeded random MLP that init: random gives; ldp and qformer start from a seeded one too."""
    from tokenpress.core.weights import seeded_mlp

    assert tokenpress.find_adapter(sdpa).projector_mlp() is None
    with pytest.raises(tokenpress.InputError, match="init: projector"):
        tokenpress.compress(sdpa, stack({"method": "pixel_unshuffle", "params": {"ratio": 2, "init": "projector"}}))
    batch = gemma_batch(sdpa, [PROMPT])
    logits = []
    for init in ("auto", "random"):
        with tokenpress.compress(sdpa, stack({"method": "pixel_unshuffle", "params": {"ratio": 2, "init": init}})):
            logits.append(sdpa(**batch).logits)
    assert torch.equal(logits[0], logits[1])
    with tokenpress.compress(sdpa, stack({"method": "ldp", "params": {"stride": 2}})) as handle:
        first = handle.entries[0].method.weights.state_dict()
        expected = seeded_mlp(32, 64, 64, 0).state_dict()
        assert any(torch.equal(value, expected["0.weight"]) for value in first.values())


def test_a_bidirectional_text_config_is_refused():
    model = tiny_gemma3("sdpa")
    model.config.text_config.use_bidirectional_attention = True
    with pytest.raises(tokenpress.UnsupportedModelError, match="use_bidirectional_attention"):
        tokenpress.compress(model, stack(FASTV))


# --- FLOPs ----------------------------------------------------------------------------------------------------------

FLOPS_STACKS = {
    "empty": [],
    "fastv": [FASTV],
    "pool": [POOL],
    "random": [{"method": "random", "params": {"keep_ratio": 0.25}}],
    "alvts": [{"method": "alvts", "params": {"keep_ratio": 0.25}}],
    "pixel_unshuffle": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}],
    "ldp": [{"method": "ldp", "params": {"stride": 2}}],
    "qformer": [{"method": "qformer", "params": {"queries": 6, "heads": 2}}],
    "received": [{"method": "vispruner", "params": {"keep_ratio": 0.25}}],
}


@pytest.mark.parametrize("stack_name", list(FLOPS_STACKS))
@torch.no_grad()
def test_analytical_flops_match_the_flop_counter(eager, stack_name):
    """torch's counter over a compressed prefill (eager; lm_head on the last position) equals the FLOPs model fed
    with that prefill's token counts (an image with a crop: two encoder runs) and, for one image, the FLOPs model
    from the config alone."""
    if stack_name == "received" and "vispruner" not in tokenpress.get_registry().methods:
        pytest.skip("vispruner is not registered")
    stages = stack(*FLOPS_STACKS[stack_name])
    for images in (2, 1):
        batch = gemma_batch(eager, [PROMPT], images=[images])
        with tokenpress.compress(eager, stages) as handle:
            with FlopCounterMode(display=False) as counter:
                eager(**batch, logits_to_keep=1, use_cache=False)
            costs = flops.measured_from_handle(handle, batch)
        counted = compat.counted_flops(counter)
        assert costs.total == pytest.approx(counted, rel=1e-9)
    text = int((batch["input_ids"] != GEMMA_IMAGE_TOKEN_ID).sum())
    assert flops.simulate(eager.config, stages, text).compressed_flops == pytest.approx(counted, rel=1e-9)
    if stack_name == "empty":  # the unmodified model
        with FlopCounterMode(display=False) as counter:
            eager(**batch, logits_to_keep=1, use_cache=False)
        assert flops.measured(eager.config, batch).total == pytest.approx(compat.counted_flops(counter), rel=1e-9)


@torch.no_grad()
def test_the_encoder_flops_count_an_attention_pooling_head_where_the_tower_has_one():
    model = tiny_gemma3("eager", vision_use_head=True)
    batch = gemma_batch(model, [PROMPT])
    with FlopCounterMode(display=False) as counter:
        model(**batch, logits_to_keep=1, use_cache=False)
    assert flops.measured(model.config, batch).total == pytest.approx(compat.counted_flops(counter), rel=1e-9)
