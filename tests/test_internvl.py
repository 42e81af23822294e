"""InternVL specifics, on a tiny InternVL (InternViT with a class token, 0.5 pixel shuffle, LayerNorm + MLP
projector, Qwen2 or Qwen3 decoder): tiles known only from the placeholder runs, 2x2 pixel-shuffle units as
encoder-space tokens, encoder signals per unit, identity, exact pre-LLM compression against the model fed the
compressed features, FastV against a reference built from the model's own layers, padded and mixed batches,
multi-image prompts and video frames, generation with and without cache, and the FLOPs model against torch's
counter (measured and config-only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenpress
from reference import manual_decoder, merged_embeddings
from tokenpress.core import flops
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys
from tokenpress.core.weights import projector_copy
from tokenpress.families.internvl.adapter import group_units
from tokenpress.families.internvl.costs import tile_grid
from tokenpress.families.internvl.testbed import (
    INTERNVL_IMAGE_TOKEN_ID,
    image_placeholders,
    internvl_batch,
    select_internvl_rows,
    tiny_internvl,
    tokens_per_tile,
)
from tokenpress.runtime import compat
from tokenpress.testing import Prompt, sample_prompts

PROMPT = Prompt([1, 5, 6], [7, 8, 9, 10])


@pytest.fixture(scope="module")
def eager():
    return tiny_internvl("eager")


@pytest.fixture(scope="module")
def sdpa():
    return tiny_internvl("sdpa")


@pytest.fixture(params=["eager", "sdpa"])
def model(request, eager, sdpa):
    return eager if request.param == "eager" else sdpa


def stack(*stages: dict, positions: str = "original") -> dict:
    return {"name": "test", "positions": positions, "stages": list(stages)}


def features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's own image features (tiles, tokens per tile, D)."""
    config = model.config
    return model.model.get_image_features(pixel_values, vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy="default", return_dict=True).pooler_output


def shuffled_units(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Encoder-space units the model's own way: the tower, the class token dropped, ``pixel_shuffle``."""
    hidden = model.model.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state[:, 1:]
    side = int(hidden.shape[1] ** 0.5)
    grid = model.model.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), model.config.downsample_ratio)
    return grid  # (tiles, side/2, side/2, 4C)


@contextmanager
def features_fed(model, fed: torch.Tensor) -> Iterator[None]:
    """While active the model's own forward takes ``fed`` (all placeholders' features, in order, (n, D)) as
    its image features (its own placeholder check and scatter). ``tokenpress.testing.image_features_fed`` gives
    a tuple, which InternVL's forward cannot take (it calls ``pooler_output.to``)."""
    inner = model.model
    inner.get_image_features = lambda *args, **kwargs: BaseModelOutputWithPooling(pooler_output=fed.unsqueeze(0))
    try:
        yield
    finally:
        del inner.__dict__["get_image_features"]


# --- encoder space ------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"downsample_ratio": 0.25, "patch": 4}, {"feature_layer": -2}],
                         ids=["2x2", "4x4", "layer-2"])
@torch.no_grad()
def test_units_are_the_models_pixel_shuffle_and_project_to_its_image_features(options):
    model = tiny_internvl("eager", **options)
    batch = internvl_batch(model, sample_prompts(2), tiles=[5, 1])
    adapter = tokenpress.find_adapter(model)
    tokens, _ = adapter.encode_images(batch, [])
    cells = int(tokens_per_tile(model) ** 0.5)
    assert tokens.num_images == 6 and tokens.grid.tolist() == [[1, cells, cells]] * 6
    unit = round(1 / model.config.downsample_ratio)
    assert adapter.encoder_width() == model.config.vision_config.hidden_size * unit * unit
    if "feature_layer" not in options:
        expected = shuffled_units(model, batch["pixel_values"])
        assert torch.equal(tokens.embeddings, expected.reshape(6, cells * cells, -1))
    assert torch.equal(adapter.project(tokens).embeddings, features(model, batch["pixel_values"]))


def test_group_units_is_pixel_shuffle_order():
    """Unit (i, j) holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), as the model's pixel shuffle."""
    coords = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1).reshape(1, 36, 2)
    units = group_units(coords, 6, 2).reshape(1, 3, 3, 4, 2)
    assert units[0, 0, 1].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert units[0, 2, 0].tolist() == [[4, 0], [4, 1], [5, 0], [5, 1]]


@torch.no_grad()
def test_each_run_of_placeholders_is_one_image_of_whole_tiles(eager):
    batch = internvl_batch(eager, sample_prompts(2), tiles=[[5, 1], [3]])
    adapter = tokenpress.find_adapter(eager)
    tokens, _ = adapter.encode_images(batch, [])
    valid = batch["attention_mask"].bool()
    spans = adapter.image_spans(batch["input_ids"], valid, tokens)
    assert [(span.sample, span.image, span.rows, span.length) for span in spans] == [
        (0, 0, (0, 1, 2, 3, 4), 80), (0, 1, (5,), 16), (1, 2, (6, 7, 8), 48)]
    for span in spans:
        assert batch["input_ids"][span.sample, span.start - 1] == 148  # <img> before, </img> after
        assert batch["input_ids"][span.sample, span.start + span.length] == 149
    short = batch["input_ids"].clone()
    short[1, spans[2].start] = 5  # the last image loses a placeholder: 47 is no whole number of tiles
    with pytest.raises(tokenpress.CompressionError, match="not a whole number"):
        adapter.image_spans(short, valid, tokens)
    more = type(tokens).from_dense(torch.cat([tokens.embeddings, tokens.embeddings[:1]]), (1, 4, 4))
    with pytest.raises(tokenpress.CompressionError, match="10 tiles were given but the prompt has placeholders for 9"):
        adapter.image_spans(batch["input_ids"], valid, more)


def test_inside_the_encoder_is_refused_in_one_sentence(eager):
    with pytest.raises(tokenpress.UnsupportedModelError) as refusal:
        tokenpress.compress(eager, stack({"method": "tome", "layers": [0], "params": {"keep_ratio": 0.5}}))
    message = str(refusal.value)
    assert "pixel-shuffle projector needs every 2x2 patch unit whole" in message and "\n" not in message
    assert "forward" not in eager.model.__dict__


# --- encoder signals ----------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
@torch.no_grad()
def test_signals_are_the_encoders_own_attention_and_keys_laid_out_as_the_units(qk_norm):
    """Per patch from the tower's own eager attention weights and the keys its blocks compute (read with a
    hook on ``k_norm``, identity without ``use_qk_norm``), then grouped by the model's own ``pixel_shuffle``:
    a unit's attention is the sum over its patches, its keys its patches' keys side by side."""
    model = tiny_internvl("eager", qk_norm=qk_norm)
    batch = internvl_batch(model, sample_prompts(1), tiles=[3])
    adapter = tokenpress.find_adapter(model)
    layer = 0
    requests = [ClsAttention(layer=layer), AttentionReceived(layer=layer), EncoderKeys(layer=layer),
                EncoderKeys(layer=-1, heads="mean"), ClsAttention(layer=-1, heads="full")]
    plain, _ = adapter.encode_images(batch, [])
    tokens, found = adapter.encode_images(batch, requests)
    assert torch.equal(tokens.embeddings, plain.embeddings)
    tower = model.model.vision_tower
    keys = {}
    hooks = [tower.encoder.layer[index].attention.k_norm.register_forward_hook(
        lambda module, args, output, index=index: keys.setdefault(index, output)) for index in (0, 1)]
    try:
        attentions = tower(pixel_values=batch["pixel_values"], output_attentions=True, return_dict=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    tiles, side = 3, 8
    shuffle = model.model.pixel_shuffle

    def per_unit(values: torch.Tensor) -> torch.Tensor:  # (tiles, patches, c) -> (tiles, units, 4c)
        return shuffle(values.reshape(tiles, side, side, -1), 0.5).reshape(tiles, 16, -1)

    cls = attentions[layer].mean(1)[:, 0, 1:]
    received = attentions[layer].mean(2).mean(1)[:, 1:]
    torch.testing.assert_close(found[requests[0]], per_unit(cls.unsqueeze(-1)).sum(-1))
    torch.testing.assert_close(found[requests[1]], per_unit(received.unsqueeze(-1)).sum(-1))
    torch.testing.assert_close(found[requests[2]], per_unit(keys[0][:, 1:]))
    mean_keys = keys[1][:, 1:].unflatten(-1, (4, -1)).mean(-2)
    torch.testing.assert_close(found[requests[3]], per_unit(mean_keys))
    assert found[requests[3]].shape[-1] == adapter.encoder_width() // adapter.encoder_heads()
    full = found[requests[4]]
    assert full.shape == (tiles, 16) and bool((full >= 0).all()) and bool((full.sum(-1) <= 1 + 1e-5).all())


# --- identity and exactness ---------------------------------------------------------------------


def unpadded(model) -> dict:
    """Two samples of equal length (no padding, so the model's own positions are right): one image of four
    tiles, and two images of three and one tiles."""
    batch = internvl_batch(model, [Prompt(PROMPT.before + [11, 12, 13], PROMPT.after), PROMPT], tiles=[4, [3, 1]])
    assert bool(batch["attention_mask"].all())
    return batch


@pytest.mark.parametrize("stage", [
    None,
    {"method": "fastv", "layers": [2], "params": {"keep_ratio": 1.0}},
    {"method": "random", "params": {"keep_ratio": 1.0}},
    {"method": "random", "at": "decoder_layer", "layers": [1], "params": {"keep_ratio": 1.0}},
    {"method": "pool", "params": {"kernel": 1}},
    {"method": "pool", "at": "projector", "params": {"kernel": 1}},
], ids=["empty", "fastv", "random", "random@decoder", "pool", "pool@projector"])
@torch.no_grad()
def test_identity_gives_the_unmodified_logits(model, stage):
    batch = unpadded(model)
    expected = model(**batch).logits
    with tokenpress.compress(model, stack(*([stage] if stage else []))):
        actual = model(**batch).logits
    if stage is None or model.config.text_config._attn_implementation == "eager":
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:  # sdpa: tokenpress passes an explicit mask where the model passes is_causal
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_with_an_empty_stack_is_generate_without(sdpa):
    batch = internvl_batch(sdpa, sample_prompts(3), tiles=[5, [1, 1], 3])
    expected = sdpa.generate(**batch, max_new_tokens=5, do_sample=False)
    with tokenpress.compress(sdpa, stack()):
        assert torch.equal(sdpa.generate(**batch, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("point", ["post_encoder", "projector"])
@torch.no_grad()
def test_pool_equals_the_model_fed_pooled_features(eager, point):
    """Pooling 2x2 units of every tile (in encoder space: the 4C units, before the projector's LayerNorm; at the
    projector: its outputs) equals the model's own forward fed those features in four placeholders a tile."""
    model = eager
    batch = internvl_batch(model, [PROMPT], tiles=[[5, 1]])
    with tokenpress.compress(model, stack({"method": "pool", "at": point, "params": {"kernel": 2}})) as handle:
        actual = model(**batch).logits
    assert handle.report().records[0].tokens_out == [24]

    def pool(grid: torch.Tensor) -> torch.Tensor:  # (tiles, 4, 4, c) -> (tiles, 4, c)
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2)
        return pooled.permute(0, 2, 3, 1).reshape(grid.shape[0], 4, -1)

    if point == "post_encoder":
        fed = model.model.multi_modal_projector(pool(shuffled_units(model, batch["pixel_values"])))
    else:
        fed = pool(features(model, batch["pixel_values"]).reshape(6, 4, 4, -1))
    input_ids = torch.tensor([PROMPT.before + [148] + [INTERNVL_IMAGE_TOKEN_ID] * 20 + [149, 10, 148]
                              + [INTERNVL_IMAGE_TOKEN_ID] * 4 + [149] + PROMPT.after])
    with features_fed(model, fed.reshape(24, -1)):
        expected = model(input_ids=input_ids, pixel_values=batch["pixel_values"]).logits
    after = len(PROMPT.after)
    assert torch.equal(actual[:, -after:], expected[:, -after:])
    assert torch.equal(actual[:, :len(PROMPT.before)], expected[:, :len(PROMPT.before)])


@pytest.mark.parametrize("text_model", ["qwen2", "qwen3"])
@torch.no_grad()
def test_fastv_matches_a_reference_built_from_the_models_own_layers(text_model):
    """FastV at layer K ranks the visual tokens by the last prompt token's attention in layer K-1 (the
    unmodified model's eager attention weights, mean over heads) and drops the rest before layer K: the
    decoder's own layers run by hand on what is left. Qwen3's text layers bring q/k norms to the scorer."""
    model = tiny_internvl("eager", text_model=text_model)
    batch = internvl_batch(model, [PROMPT], tiles=[[3, 1]])
    layer = 2
    with tokenpress.compress(model, stack({"method": "fastv", "layers": [layer], "params": {"keep_ratio": 0.5}})):
        actual = model(**batch).logits

    input_ids = batch["input_ids"]
    full = model(**batch, output_attentions=True)
    visual = torch.nonzero(input_ids[0] == INTERNVL_IMAGE_TOKEN_ID).flatten()
    scores = full.attentions[layer - 1][0, :, -1, visual].mean(0)
    kept_visual = visual[torch.topk(scores, visual.numel() // 2).indices]
    keep = torch.cat([torch.nonzero(input_ids[0] != INTERNVL_IMAGE_TOKEN_ID).flatten(), kept_visual]).sort().values
    embeds = merged_embeddings(model, input_ids, features(model, batch["pixel_values"]).reshape(-1, 64))
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    hidden, _ = manual_decoder(model.model.language_model, embeds, positions, keep={layer: keep})
    after = len(PROMPT.after)
    torch.testing.assert_close(actual[0, -after:], model.lm_head(hidden)[0, -after:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_original_positions_continue_after_the_whole_image_and_compact_ones_after_the_kept(eager):
    batch = internvl_batch(eager, sample_prompts(2), tiles=[5, [3, 1]])
    lengths = batch["attention_mask"].sum(-1)
    with tokenpress.compress(eager, stack({"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}})):
        state = compat.output_cache(eager(**batch, use_cache=True)).tokenpress_state
    assert all(torch.equal(layer, lengths) for layer in state.next_position)
    with tokenpress.compress(eager, stack({"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}},
                                          positions="compact")):
        state = compat.output_cache(eager(**batch, use_cache=True)).tokenpress_state
    assert torch.equal(state.next_position[1], lengths)
    assert torch.equal(state.next_position[2], lengths - torch.tensor([40, 32]))


# --- batches and generation ---------------------------------------------------------------------


FASTV = {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}
RANDOM = {"method": "random", "params": {"keep_ratio": 0.5, "seed": 3}}
POOL = {"method": "pool", "params": {"kernel": 2}}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("stages", [[FASTV], [RANDOM], [POOL, FASTV]], ids=["fastv", "random", "pool+fastv"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_each_sample_of_a_padded_mixed_batch_equals_the_sample_alone(sdpa, padding_side, stages, positions):
    tiles = [5, [1, 3], 1]
    prompts = sample_prompts(3)
    batch = internvl_batch(sdpa, prompts, tiles=tiles, padding_side=padding_side)
    with tokenpress.compress(sdpa, stack(*stages, positions=positions)) as handle:
        batched = sdpa(**batch).logits
        records = handle.report().records
        assert records[0].tokens_in == [80, 64, 16]
        for index in range(3):
            alone = sdpa(**select_internvl_rows(batch, index)).logits[0]
            real = batch["attention_mask"][index].bool()
            after = len(prompts[index].after)
            torch.testing.assert_close(batched[index][real][-after:], alone[-after:], rtol=1e-5, atol=1e-5)
            for record, alone_record in zip(records, handle.report().records, strict=True):
                assert record.tokens_out[index] == alone_record.tokens_out[0]


def video_batch(model, frames: int = 3) -> dict:
    """A video as InternVL's processor writes it: ``Frame{i}: <img>`` + one tile's placeholders + ``</img>``,
    frames joined by a newline; every frame is one tile of ``pixel_values``."""
    row = [1, 5]
    for frame in range(frames):
        row += [20 + frame, 21] + image_placeholders(model, 1) + [22]
    row += [7, 8, 9]
    ids = torch.tensor([row])
    generator = torch.Generator().manual_seed(7)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(frames, 3, 64, 64, generator=generator)}


@pytest.mark.parametrize("stages", [[POOL], [RANDOM, FASTV]], ids=["pool", "random+fastv"])
@torch.no_grad()
def test_video_frames_and_multi_image_prompts_generate_with_and_without_cache_alike(sdpa, stages):
    video = video_batch(sdpa)
    with tokenpress.compress(sdpa, stack(*stages)) as handle:
        cached = sdpa.generate(**video, max_new_tokens=5, do_sample=False)
        assert handle.report().records[0].tokens_in == [48]
        uncached = sdpa.generate(**video, max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        batch = internvl_batch(sdpa, sample_prompts(3, seed=1), tiles=[[5, 1], [1, 1, 1], 4])
        cached = sdpa.generate(**batch, max_new_tokens=5, do_sample=False)
        uncached = sdpa.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        alone = [sdpa.generate(**select_internvl_rows(batch, i), max_new_tokens=5, do_sample=False)[0, -5:]
                 for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -5:], torch.stack(alone))


# --- methods that replace the projector ---------------------------------------------------------


@torch.no_grad()
def test_the_projector_mlp_norms_the_whole_unit_and_its_copies_start_from_it(eager):
    """``projector_mlp`` is LayerNorm(4C) + MLP: its copy (what ldp and qformer start from) is the model's
    projector; pixel_unshuffle's copy over r x r units projects the mean of the normed units."""
    adapter = tokenpress.find_adapter(eager)
    projector = adapter.projector_mlp()
    width = adapter.encoder_width()
    assert projector.norm_width == width == projector.first.in_features == 128
    generator = torch.Generator().manual_seed(0)
    units = torch.randn(2, 5, width, generator=generator)
    torch.testing.assert_close(projector_copy(projector)(units), eager.model.multi_modal_projector(units))
    windows = torch.randn(2, 3, 4, width, generator=generator)
    module = eager.model.multi_modal_projector
    expected = module.linear_2(module.act(module.linear_1(module.layer_norm(windows).mean(2))))
    torch.testing.assert_close(projector_copy(projector, 4)(windows.flatten(2)), expected)


# --- FLOPs --------------------------------------------------------------------------------------


FLOPS_STACKS = {
    "empty": [],
    "fastv": [FASTV],
    "pool": [POOL],
    "random": [{"method": "random", "params": {"keep_ratio": 0.25}}],
    "pixel_unshuffle": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}],
    "ldp": [{"method": "ldp", "params": {"stride": 2}}],
    "qformer": [{"method": "qformer", "params": {"queries": 6, "heads": 2}}],
    "visionzip": [{"method": "visionzip", "params": {"keep_ratio": 0.25}}],  # cls attention and mean keys
    "prumerge": [{"method": "prumerge", "params": {"plus": False}}],  # full-width cls attention and keys
}


@pytest.mark.parametrize("stack_name", list(FLOPS_STACKS))
def test_analytical_flops_match_the_flop_counter(eager, stack_name):
    """Measured counts and the config alone (an image of 64x128 pixels: 2x1 crops + thumbnail = 3 tiles)
    give the FLOPs torch counts on the compressed prefill (the lm_head on the last position)."""
    size = (64, 128)
    columns, rows = tile_grid(*size, 64)
    assert (columns, rows) == (2, 1)
    batch = internvl_batch(eager, [PROMPT], tiles=[columns * rows + 1])
    compressed = {"name": stack_name, "stages": FLOPS_STACKS[stack_name]}
    with torch.no_grad(), tokenpress.compress(eager, compressed) as handle:
        with FlopCounterMode(display=False) as counter:
            eager(**batch, logits_to_keep=1, use_cache=False)
        costs = flops.measured_from_handle(handle, batch)
    counted = compat.counted_flops(counter)
    assert costs.total == pytest.approx(counted, rel=1e-9)
    text = int((batch["input_ids"] != INTERNVL_IMAGE_TOKEN_ID).sum())
    if stack_name == "prumerge":  # adaptive: it promises no count
        with pytest.raises(flops.FlopsError, match="no promise"):
            flops.simulate(eager.config, compressed, text, size)
        return
    breakdown = flops.simulate(eager.config, compressed, text, size)
    assert breakdown.compressed_flops == pytest.approx(counted, rel=1e-9)
    assert breakdown.visual_tokens == 48 and "2x1 crops + thumbnail, 3 tiles" in breakdown.notes[0]
    if stack_name == "empty":
        assert breakdown.baseline_flops == counted


def test_simulation_needs_the_image_size(eager):
    with pytest.raises(flops.FlopsError, match="give its size"):
        flops.simulate(eager.config, stack(FASTV), 10)


@pytest.mark.parametrize("size", [(448, 448), (448, 896), (900, 300), (1000, 1000), (300, 2000), (256, 700)])
def test_tiles_are_picked_as_the_processor_picks_them(size):
    canvas = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2",
                                 exc_type=ImportError).get_optimal_tiled_canvas
    assert tile_grid(*size, 448) == canvas(size, (448, 448), 1, 12)
