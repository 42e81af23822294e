"""LLaVA-OneVision specifics, each against a reference written from the model's own modules and the processor's
own formula: anyres rows (base tile + unpadded grid) and the anyres_max_9 resize after the projector, multi-image
prompts (one tile and a newline each), videos (frames pooled 2x2 after the projector, one newline), SigLIP
without a class token (its signals, ToMe inside it), the FLOPs model, identity, batches and generation."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from test_tome import merge_groups, reference_matching
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

import tokenpress
from reference import manual_decoder
from tokenpress.core import flops
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys
from tokenpress.families.llava_onevision.testbed import (
    ONEVISION_IMAGE_TOKEN_ID,
    ONEVISION_VIDEO_TOKEN_ID,
    PINPOINTS,
    onevision_batch,
    select_onevision_rows,
    tiny_llava_onevision,
)
from tokenpress.runtime import compat
from tokenpress.runtime.adapter import ImageSpan
from tokenpress.testing import Prompt, image_features_fed, sample_prompts

PROMPT = Prompt([1, 5, 6], [7, 8, 9, 10])


def stack(*stages: dict, positions: str = "original") -> dict:
    return {"name": "ov", "positions": positions, "stages": list(stages)}


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision("eager")


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava_onevision("sdpa")


def processor_count(size: tuple[int, int], multi: bool = False) -> int:
    """Placeholders of an image by the processor's own formula (its methods bound to a stand-in)."""
    side = 32 // 8
    if multi:
        return side * side + 1
    stub = types.SimpleNamespace(num_image_tokens=side * side, vision_aspect_ratio="anyres_max_9",
                                 image_processor=types.SimpleNamespace(image_grid_pinpoints=PINPOINTS))
    stub._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, stub)
    return LlavaOnevisionProcessor._get_number_of_features(stub, size[0], size[1], 32, 32)


def tile_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The SigLIP features the model projects: the last encoder layer's output, before post_layernorm."""
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]


def stitch(per_tile: torch.Tensor, size: tuple[int, int], model) -> torch.Tensor:
    """(crops, 16, C) -> (C, H, W): the crops side by side on one grid, unpadded to the image's aspect ratio."""
    high, wide = get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, 32)
    grid = per_tile.reshape(high, wide, 4, 4, -1).permute(4, 0, 2, 1, 3).reshape(per_tile.shape[-1], high * 4,
                                                                                    wide * 4)
    return unpad_image(grid, list(size))


def with_newlines(model, grid: torch.Tensor) -> torch.Tensor:
    """(D, h, w) -> (h * (w + 1), D): every grid row ends with the model's image_newline."""
    newline = model.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1)
    return torch.cat([grid, newline], dim=-1).flatten(1).transpose(0, 1)


def anyres_resize(grid: torch.Tensor) -> torch.Tensor:
    """The anyres_max_9 rule on a (D, H, W) grid of 4x4-patch tiles, written from the model card's numbers."""
    height, width = grid.shape[1:]
    ratio = math.sqrt(height * width / (9 * 16))
    if ratio <= 1.1:
        return grid
    return F.interpolate(grid[None], size=[int(height // ratio), int(width // ratio)], mode="bilinear")[0]


def ids_with(prompt: Prompt, count: int, token: int = ONEVISION_IMAGE_TOKEN_ID) -> torch.Tensor:
    return torch.tensor([prompt.before + [token] * count + prompt.after])


@torch.no_grad()
def logits_fed(model, prompt: Prompt, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """The model's own forward with ``features`` (already projected) as its one image's features."""
    input_ids = ids_with(prompt, features.shape[0])
    with image_features_fed(model, [features]):
        return model(input_ids=input_ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).logits


# --- counts and rows ------------------------------------------------------------------------------------------


def test_token_counts_match_the_processors_formula(model):
    adapter = tokenpress.find_adapter(model)
    for size, expected in (((64, 64), 88), ((48, 64), 70), ((120, 128), 172), ((32, 64), 52)):
        assert processor_count(size) == expected
        batch = onevision_batch(model, [PROMPT], sizes=[size])
        assert int((batch["input_ids"] == ONEVISION_IMAGE_TOKEN_ID).sum()) == expected
        media, _, _ = adapter.plan(batch)
        assert media[0].placeholders == expected
    batch = onevision_batch(model, [PROMPT], sizes=[(64, 64), (40, 64)], images=[2], videos=[True], frames=3)
    media, tiles, frames = adapter.plan(batch)
    assert [m.placeholders for m in media] == [processor_count((64, 64), multi=True)] * 2 + [3 * 4 + 1]
    assert [m.kind for m in media] == ["tile", "tile", "video"] and tiles.shape[0] == 2 and frames.shape[0] == 3


@torch.no_grad()
def test_projected_rows_are_the_models_own_features(model):
    """Base tile, stitched + unpadded (+ resized) grid with a newline per row, multi-image tiles and a video
    (frames pooled after the projector): the model's get_image_features / get_video_features, bit for bit."""
    adapter = tokenpress.find_adapter(model)
    batch = onevision_batch(model, sample_prompts(3), sizes=[(64, 64), (48, 64), (120, 128)])
    tokens, _ = adapter.encode_images(batch, [])
    assert tokens.grid.tolist() == [[1, 4, 4], [1, 8, 8], [1, 4, 4], [1, 6, 8], [1, 4, 4], [1, 16, 16]]
    projected = adapter.project(tokens)
    assert projected.grid.tolist()[5] == [1, 12, 12]  # 256 > 1.1^2 x 9 x 16: resized in LLM space
    reference = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                               batch_num_images=batch["batch_num_images"]).pooler_output
    for image, packed in enumerate(reference):
        base, high = projected.embeddings[2 * image], projected.embeddings[2 * image + 1]
        _, height, width = projected.grid[2 * image + 1].tolist()
        grid = high[: height * width].reshape(height, width, -1).permute(2, 0, 1)
        assert torch.equal(torch.cat([base[:16], with_newlines(model, grid)]), packed)

    batch = onevision_batch(model, [PROMPT, PROMPT], sizes=[(64, 64), (40, 64), (64, 64)], images=[2, 1],
                            videos=[True, False], frames=3)
    tokens, _ = adapter.encode_images(batch, [])
    assert tokens.grid.tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 4], [1, 8, 8], [3, 4, 4]]
    projected = adapter.project(tokens)
    assert projected.grid.tolist()[4] == [3, 2, 2]
    images = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                            batch_num_images=batch["batch_num_images"]).pooler_output
    newline = model.model.image_newline[None]
    for row in (0, 1):  # one tile and a newline each
        assert torch.equal(torch.cat([projected.embeddings[row, :16], newline]), images[row])
    video = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output[0]
    assert torch.equal(torch.cat([projected.embeddings[4, :12], newline]), video)


# --- identity -------------------------------------------------------------------------------------------------


def unpadded_batches(model) -> list[dict]:
    """Batches without padding (the model's own positions agree): anyres images resized, a multi-image
    prompt with a video."""
    return [onevision_batch(model, [PROMPT] * 2, sizes=[(120, 128)] * 2),
            onevision_batch(model, [PROMPT] * 2, sizes=[(64, 64), (40, 64)] * 2, images=[2, 2],
                            videos=[True, True])]


@pytest.mark.parametrize("stage", [
    None,
    {"method": "fastv", "layers": [2], "params": {"keep_ratio": 1.0}},
    {"method": "random", "params": {"keep_ratio": 1.0}},
    {"method": "random", "at": "query_conditioned", "params": {"keep_ratio": 1.0}},
    {"method": "pool", "params": {"kernel": 1}},
    {"method": "pool", "at": "projector", "params": {"kernel": 1}},
    {"method": "tome", "params": {"r": 0}},
], ids=["empty", "fastv", "random", "random@query", "pool", "pool@projector", "tome"])
@torch.no_grad()
def test_identity_settings_give_the_unmodified_logits_bit_for_bit(model, stage):
    for batch in unpadded_batches(model):
        expected = model(**batch).logits
        with tokenpress.compress(model, stack(*([stage] if stage else []))):
            actual = model(**batch).logits
        if stage is not None and stage["method"] == "tome":  # run block by block: the same arithmetic, regrouped
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(actual, expected), (actual - expected).abs().max()


@torch.no_grad()
def test_generate_with_an_empty_stack_is_the_models_own(model):
    batch = onevision_batch(model, sample_prompts(3), sizes=[(64, 64), (64, 64), (40, 64), (120, 128)],
                            images=[1, 2, 1], videos=[False, True, True])
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False)
    with tokenpress.compress(model, stack()):
        assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), expected)


# --- exact pre-LLM compression ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 64), (120, 128)])
@pytest.mark.parametrize("point", ["post_encoder", "projector"])
@torch.no_grad()
def test_pool_equals_the_model_fed_pooled_features(model, point, size):
    """Before the projector: pool the base tile and the unpadded grid, project, then the model's resize rule on
    the pooled grid (a 16x16 grid pooled to 8x8 is under the limit: not resized). At the projector: project
    every tile, stitch, unpad, resize (16x16 -> 12x12), then pool."""
    batch = onevision_batch(model, [PROMPT], sizes=[size])
    with tokenpress.compress(model, stack({"method": "pool", "at": point, "params": {"kernel": 2}})):
        actual = model(**batch).logits

    tiles = image_size_to_num_patches(list(size), PINPOINTS, 32)
    features = tile_features(model, batch["pixel_values"][0, :tiles])  # (tiles, 16, C)
    projector = model.model.multi_modal_projector

    def pool(grid: torch.Tensor) -> torch.Tensor:  # (C, h, w), ceil: a partial window is a cell
        return F.avg_pool2d(grid[None], 2, ceil_mode=True)[0]

    base = features[0].T.reshape(-1, 4, 4)
    high = stitch(features[1:], size, model)
    if point == "post_encoder":
        base = projector(pool(base).flatten(1).T)
        high = projector(pool(high).permute(1, 2, 0)).permute(2, 0, 1)
        high = anyres_resize(high)
    else:
        base = pool(projector(base.flatten(1).T).T.reshape(-1, 4, 4)).flatten(1).T
        high = pool(anyres_resize(projector(high.permute(1, 2, 0)).permute(2, 0, 1)))
    expected = logits_fed(model, PROMPT, torch.cat([base, with_newlines(model, high)]), batch)
    torch.testing.assert_close(actual[:, -4:], expected[:, -4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_video_pooled_before_the_projector_equals_the_model_fed_its_features(model):
    """A video pooled 2x2 before the projector: each 4x4 frame -> 2x2, projected, then the model's own 2x2
    pooling -> 1x1, and one newline: 2 frames -> 3 tokens."""
    batch = onevision_batch(model, [PROMPT], images=[0], videos=[True])
    with tokenpress.compress(model, stack({"method": "pool", "params": {"kernel": 2}})) as handle:
        actual = model(**batch).logits
    assert handle.report().records[0].tokens_out == [2 * 4]
    frames = tile_features(model, batch["pixel_values_videos"][0])  # (2, 16, C)
    pooled = F.avg_pool2d(frames.transpose(1, 2).reshape(2, -1, 4, 4), 2)  # (2, C, 2, 2)
    projected = model.model.multi_modal_projector(pooled.flatten(2).transpose(1, 2)).transpose(1, 2)
    model_pooled = F.interpolate(projected.reshape(2, -1, 2, 2), size=[1, 1], mode="bilinear").flatten(2)
    features = torch.cat([model_pooled.transpose(1, 2).flatten(0, 1), model.model.image_newline[None]])
    input_ids = ids_with(PROMPT, 3, ONEVISION_VIDEO_TOKEN_ID)
    inner = model.model
    inner.get_video_features = lambda *args, **kwargs: BaseModelOutputWithPooling(pooler_output=features[None])
    try:
        expected = model(input_ids=input_ids, pixel_values_videos=batch["pixel_values_videos"]).logits
    finally:
        del inner.__dict__["get_video_features"]
    torch.testing.assert_close(actual[:, -4:], expected[:, -4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_selection_before_the_projector_keeps_the_grid_it_was_made_on(model):
    """A row reduced before the projector is not resized: its tokens keep their cells of the 16x16 grid, a grid
    row keeps its newline while it keeps a token; when that leaves more tokens than placeholders, the
    prefill refuses in one sentence."""
    adapter = tokenpress.find_adapter(model)
    batch = onevision_batch(model, [PROMPT], sizes=[(120, 128)])
    tokens, _ = adapter.encode_images(batch, [])
    keep = torch.zeros_like(tokens.valid)
    keep[0, :16] = True
    keep[1, [0, 5, 40, 41, 255]] = True  # grid rows 0, 2 and 15 of the 16x16 grid
    projected = adapter.project(tokens.keep(keep))
    assert projected.grid.tolist()[1] == [1, 16, 16]  # not resized
    layout = adapter.layout_image(ImageSpan(0, 3, 172, 0, (0, 1)), projected, 3, compact=False)
    high, positions = layout.sources[16:], layout.positions[0][16:]
    start = 3 + 16
    assert [p for s, p in zip(high, positions, strict=True) if s == -1] == [start + r * 17 + 16 for r in (0, 2, 15)]
    assert [p for s, p in zip(high, positions, strict=True) if s != -1] == [
        start + c for c in (0, 5)] + [start + 2 * 17 + 8, start + 2 * 17 + 9, start + 15 * 17 + 15]
    assert layout.next_position == start + 16 * 17

    with tokenpress.compress(model, stack({"method": "random", "params": {"keep_ratio": 0.5}})) as handle:
        model(**batch)
    assert handle.report().records[0].tokens_out == [8 + 128]
    with tokenpress.compress(model, stack({"method": "random", "params": {"keep_ratio": 0.75}})), \
            pytest.raises(tokenpress.CompressionError, match="select at the projector or later") as error:
        model(**batch)
    assert "\n" not in str(error.value)
    with tokenpress.compress(model, stack({"method": "random", "at": "query_conditioned",
                                           "params": {"keep_ratio": 0.75}})) as handle:
        model(**batch)  # after the projector: chosen among the resized grid's 144
    assert handle.report().records[0].tokens_out == [12 + 108]
    with tokenpress.compress(model, stack({"method": "random", "at": "projector",
                                           "params": {"keep_ratio": 0.25}})) as handle:
        model(**batch)  # it projects, then selects: a quarter of the base tile and of the resized 144
    assert (handle.report().records[0].tokens_in, handle.report().records[0].tokens_out) == ([16 + 256], [4 + 36])
    # a video's frames the same: merged to half inside the encoder, 8 a frame, more than the pooled 4
    video = onevision_batch(model, [PROMPT], images=[0], videos=[True])
    with tokenpress.compress(model, stack({"method": "tome", "params": {"keep_ratio": 0.5}})), \
            pytest.raises(tokenpress.CompressionError, match="17 tokens but the prompt holds 9"):
        model(**video)


# --- decoder stages against an independent reference ----------------------------------------------------------


@torch.no_grad()
def test_fastv_matches_a_reference_built_from_the_models_layers(model):
    """The last prompt token's eager attention at layer K-1 (the unmodified model's own weights) ranks the visual
    tokens (newlines included); the reference drops the rest before layer K with the model's own layers."""
    layer, ratio = 2, 0.5
    batch = onevision_batch(model, [PROMPT], sizes=[(48, 64)])
    with tokenpress.compress(model, stack({"method": "fastv", "layers": [layer], "params": {"keep_ratio": ratio}})):
        actual = model(**batch).logits
    full = model(**batch, output_attentions=True)
    before, visual_count = len(PROMPT.before), 70
    visual = torch.arange(before, before + visual_count)
    scores = full.attentions[layer - 1][0, :, -1, visual].mean(0)
    kept = visual[torch.topk(scores, round(visual_count * ratio)).indices.sort().values]
    length = batch["input_ids"].shape[1]
    keep = torch.cat([torch.arange(before), kept, torch.arange(before + visual_count, length)])
    features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    embeds[0, visual] = features
    hidden, _ = manual_decoder(model.model.language_model, embeds, torch.arange(length)[None], keep={layer: keep})
    torch.testing.assert_close(actual[0, -4:], model.lm_head(hidden)[0, -4:], rtol=1e-5, atol=1e-5)


# --- batches and generation -----------------------------------------------------------------------------------


def mixed_media_batch(model, padding_side: str = "left") -> dict:
    """One anyres image resized after the projector; a multi-image prompt; a video after a single image."""
    return onevision_batch(model, sample_prompts(3), sizes=[(120, 128), (64, 64), (40, 64), (48, 64)],
                           padding_side=padding_side, images=[1, 2, 1], videos=[False, False, True])


FASTV = {"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}
RANDOM = {"method": "random", "params": {"keep_ratio": 0.25, "seed": 3}}
POOL = {"method": "pool", "params": {"kernel": 2}}
POOL_AT_PROJECTOR = {"method": "pool", "at": "projector", "params": {"kernel": 2}}
TOME = {"method": "tome", "params": {"keep_ratio": 0.25}}  # 16 -> 8 -> 4 a tile or frame: a video still fits


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("stages", [[FASTV], [RANDOM], [POOL], [POOL_AT_PROJECTOR, FASTV], [TOME]],
                         ids=["fastv", "random", "pool", "pool@projector+fastv", "tome"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@torch.no_grad()
def test_each_sample_of_a_padded_batch_equals_the_sample_alone(sdpa_model, padding_side, stages, positions):
    model = sdpa_model
    batch = mixed_media_batch(model, padding_side)
    with tokenpress.compress(model, stack(*stages, positions=positions)) as handle:
        batched = model(**batch).logits
        records = [record.tokens_out for record in handle.report().records]
        for index in range(3):
            alone = select_onevision_rows(batch, index)
            logits = model(**alone).logits[0]
            real = batch["attention_mask"][index].bool()
            after = len(sample_prompts(3)[index].after)
            torch.testing.assert_close(batched[index][real][-after:], logits[-after:], rtol=1e-5, atol=1e-5)
            assert [record[index] for record in records] == [r.tokens_out[0] for r in handle.report().records]


@pytest.mark.parametrize("stages", [[FASTV], [RANDOM, FASTV], [POOL_AT_PROJECTOR], [TOME, FASTV]],
                         ids=["fastv", "random+fastv", "pool@projector", "tome+fastv"])
@torch.no_grad()
def test_generate_with_and_without_cache_and_alone_agree(sdpa_model, stages):
    model = sdpa_model
    batch = mixed_media_batch(model)
    with tokenpress.compress(model, stack(*stages)) as handle:
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert handle.report().records, "the prefill was not compressed"
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
        alone = [model.generate(**select_onevision_rows(batch, i), max_new_tokens=6, do_sample=False)[0, -6:]
                 for i in range(3)]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, -6:], torch.stack(alone))


@torch.no_grad()
def test_detach_restores_the_model_exactly(model):
    batch = mixed_media_batch(model)
    tree = [(name, id(module), type(module)) for name, module in model.named_modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    expected = model(**batch).logits
    handle = tokenpress.compress(model, stack(TOME, {"method": "random", "at": "query_conditioned",
                                                     "params": {"keep_ratio": 0.5}}, FASTV))
    model.generate(**batch, max_new_tokens=3, do_sample=False)
    handle.detach()
    assert [(name, id(module), type(module)) for name, module in model.named_modules()] == tree
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert "forward" not in model.model.__dict__ and "get_image_features" not in model.model.__dict__
    assert torch.equal(model(**batch).logits, expected)


# --- SigLIP: signals, stages inside the encoder ---------------------------------------------------------------


class RecordsSignals(tokenpress.Method):
    """Asks for SigLIP's signals (the attention each patch receives, a class-token request falling back to it,
    a block's keys), records them, changes nothing."""

    name = "test-ov-records-signals"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)
    seen: list = []

    def required_signals(self) -> list:
        return [AttentionReceived(layer=0), ClsAttention(layer=0, class_free="received"), EncoderKeys(layer=1)]

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        RecordsSignals.seen.append((tokens, dict(context.signals)))
        return tokens

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return tokens_in


class AsksForSignals(RecordsSignals):
    """Asks for a class-token attention (served as the attention each patch receives) and a block's keys."""

    name = "test-ov-asks-signals"

    def required_signals(self) -> list:
        return [ClsAttention(layer=0, class_free="received"), EncoderKeys(layer=1)]


class AsksForClsAttention(RecordsSignals):
    name = "test-ov-asks-cls"

    def required_signals(self) -> list:
        return [ClsAttention(layer=0)]


@torch.no_grad()
def test_signals_are_siglips_own_attention_and_keys_where_the_features_sit(model, register_methods):
    """Each row slot's signal is that of the tile patch whose feature it holds: the attention the patch receives
    (the eager attention weights averaged over heads and every query of its tile: no class token), served for a
    class-token request made with class_free='received', and the block's keys."""
    register_methods(RecordsSignals, AsksForClsAttention)
    RecordsSignals.seen.clear()
    batch = onevision_batch(model, [PROMPT, PROMPT], sizes=[(48, 64), (64, 64), (40, 64)], images=[1, 2])
    with tokenpress.compress(model, stack({"method": "test-ov-records-signals"})):
        model(**batch)
    tokens, signals = RecordsSignals.seen[0]
    tiles = torch.cat([batch["pixel_values"][0, :5], batch["pixel_values"][1:, 0]])
    out = model.model.vision_tower(tiles, output_attentions=True, output_hidden_states=True)
    received = out.attentions[0].mean(dim=2).mean(dim=1).flatten()  # (tiles x 16,)
    block = model.model.vision_tower.encoder.layers[1]
    keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[1])).flatten(0, 1)
    features = out.hidden_states[-1].flatten(0, 1)
    assert signals[AttentionReceived(layer=0)].shape == tokens.valid.shape
    for row in range(tokens.num_images):
        for slot in torch.nonzero(tokens.valid[row]).flatten().tolist():
            source = torch.nonzero((features == tokens.embeddings[row, slot]).all(-1)).flatten()
            assert source.numel() == 1
            torch.testing.assert_close(signals[AttentionReceived(layer=0)][row, slot], received[source[0]])
            torch.testing.assert_close(signals[ClsAttention(layer=0, class_free="received")][row, slot],
                                       received[source[0]])
            torch.testing.assert_close(signals[EncoderKeys(layer=1)][row, slot], keys[source[0]])
    with pytest.raises(tokenpress.UnsupportedModelError, match="no class token") as error:
        tokenpress.compress(model, stack({"method": "test-ov-asks-cls"}))
    assert "\n" not in str(error.value) and "forward" not in model.model.__dict__


def reference_siglip_tome(model, pixels: torch.Tensor, merges: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """One tile through SigLIP block by block as ToMe's patched blocks run, without a class token and without a
    pre-layernorm: attention with log(size) on every key, the matching on the keys averaged over heads, the
    size-weighted merge, then the MLP. Returns the features and each token's patches."""
    tower = model.model.vision_tower
    hidden = tower.embeddings(pixels[None])[0]
    size = torch.ones(hidden.shape[0])
    groups = [[index] for index in range(hidden.shape[0])]
    for layer, r in zip(tower.encoder.layers, merges, strict=True):
        attention = layer.self_attn
        heads, width = attention.num_heads, hidden.shape[-1] // attention.num_heads
        normed = layer.layer_norm1(hidden)
        q, k, v = (proj(normed).view(-1, heads, width).transpose(0, 1)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        logits = q @ k.transpose(-1, -2) * attention.scale + size.log()
        hidden = hidden + attention.out_proj((torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(hidden.shape))
        if r:
            outputs = reference_matching(k.mean(0), r, class_token=False, keep_order=False)
            hidden, size = merge_groups(hidden, size, outputs)
            groups = [sum((groups[i] for i in output), []) for output in outputs]
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, [sorted(group) for group in groups]


@torch.no_grad()
def test_tome_inside_siglip_equals_the_published_algorithm(model, recorded_tokens):
    """ToMe in both SigLIP blocks (no class token: every token may merge): a multi-image prompt's tiles, each
    against the reference run alone; the same partition of the patches, the same features."""
    batch = onevision_batch(model, [PROMPT], sizes=[(64, 64), (40, 64)], images=[2])
    with tokenpress.compress(model, stack({"method": "tome", "params": {"r": 3}},
                                          {"method": "test-record-tokens"})) as handle:
        model(**batch)
    assert [record.block for record in handle.records if record.method == "tome"] == [0, 1]
    assert [record.tokens_out for record in handle.records if record.method == "tome"] == [[26], [20]]
    tokens = recorded_tokens[0]
    for row in range(2):
        hidden, groups = reference_siglip_tome(model, batch["pixel_values"][row, 0], [3, 3])
        owner = tokens.patch_owner()[row]
        ours = {tuple(torch.nonzero(owner == slot).flatten().tolist()): tokens.embeddings[row, slot]
                for slot in torch.nonzero(tokens.valid[row]).flatten().tolist()}
        assert sorted(ours) == sorted(tuple(group) for group in groups)
        for feature, group in zip(hidden, groups, strict=True):
            torch.testing.assert_close(ours[tuple(group)], feature, rtol=1e-5, atol=1e-5)


# --- the FLOPs model --------------------------------------------------------------------------------------------


FLOPS_STACKS = {
    "empty": [],
    "fastv": [FASTV],
    "pool": [POOL],
    "pool@projector": [POOL_AT_PROJECTOR],
    "random": [{"method": "random", "params": {"keep_ratio": 0.25}}],
    "pixel_unshuffle": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}],
    "ldp": [{"method": "ldp", "params": {"stride": 2}}],
    "tome": [TOME],
    "folder": [{"method": "folder", "params": {"keep_ratio": 0.25}}],
    "signals": [{"method": "test-ov-asks-signals"}],
}


@pytest.mark.parametrize("inputs", ["64x64", "120x128", "multi+video"])
@pytest.mark.parametrize("name", list(FLOPS_STACKS))
@torch.no_grad()
def test_measured_flops_equal_the_counter(model, register_methods, name, inputs):
    """torch's counter over a compressed prefill == the FLOPs model on that prefill's token counts, once the
    projector's work on padding slots (rows padded to the widest, seen by a hook on the projector) is taken
    out; the encoder over every tile and frame, SigLIP without a class token."""
    register_methods(AsksForSignals)
    if inputs == "multi+video":
        batch = onevision_batch(model, [PROMPT], sizes=[(64, 64), (40, 64)], images=[2], videos=[True])
    else:
        batch = onevision_batch(model, [PROMPT], sizes=[tuple(int(v) for v in inputs.split("x"))])
    seen = []
    hook = model.model.multi_modal_projector.linear_1.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[:-1].numel()))
    try:
        with tokenpress.compress(model, stack(*FLOPS_STACKS[name])) as handle:
            with FlopCounterMode(display=False) as counter:
                model(**batch, logits_to_keep=1, use_cache=False)
            costs = flops.measured_from_handle(handle, batch)
            stats = handle.prefill_stats  # None: an empty stack runs the model's own forward
    finally:
        hook.remove()
    family = flops.family_costs(model.config)
    projected = sum(stats.projected if stats is not None else family.batch_encoder(batch)[1])
    padding = family.projector_flops(sum(seen) - projected)
    assert costs.total == pytest.approx(compat.counted_flops(counter) - padding, rel=1e-9)


@pytest.mark.parametrize("size", [(64, 64), (48, 64), (120, 128)])
@pytest.mark.parametrize("name", ["empty", "fastv", "pool", "pixel_unshuffle", "ldp"])
@torch.no_grad()
def test_config_only_flops_equal_the_measured_ones(model, name, size):
    """The simulation from the config and the image size gives the measured numbers (newlines on the resized
    grid); where the stack makes them unknowable from the config, it says so in one sentence."""
    batch = onevision_batch(model, [PROMPT], sizes=[size])
    text = int((batch["input_ids"] != ONEVISION_IMAGE_TOKEN_ID).sum())
    spec = stack(*FLOPS_STACKS[name])
    if size == (120, 128) and name not in ("empty", "fastv"):  # re-gridded before or after the resize?
        with pytest.raises(flops.FlopsError, match="before the projector or after it"):
            flops.simulate(model.config, spec, text, size)
        return
    with tokenpress.compress(model, spec) as handle:
        model(**batch, logits_to_keep=1, use_cache=False)
        measured = flops.measured_from_handle(handle, batch)
    simulated = flops.simulate(model.config, spec, text, size)
    assert simulated.compressed.total == pytest.approx(measured.total, rel=1e-9)
    assert simulated.visual_tokens == processor_count(size)
    baseline = flops.measured(model.config, batch)
    assert simulated.baseline.total == pytest.approx(baseline.total, rel=1e-9)


def test_config_only_flops_refuse_what_depends_on_the_image():
    config = tiny_llava_onevision("eager").config
    with pytest.raises(flops.FlopsError, match="newline"):
        flops.simulate(config, stack(FLOPS_STACKS["random"][0]), 7, (64, 64))
    with pytest.raises(flops.FlopsError, match="unpadding"):
        flops.simulate(config, stack(TOME), 7, (64, 64))
    with pytest.raises(flops.FlopsError, match="give its size"):
        flops.simulate(config, stack(), 7, None)


# --- what the adapter refuses --------------------------------------------------------------------------------


def test_unsupported_configurations_are_refused_in_one_sentence():
    def refused(change, match: str) -> None:
        model = tiny_llava_onevision("eager")
        change(model.config)
        with pytest.raises(tokenpress.UnsupportedModelError, match=match) as error:
            tokenpress.compress(model, stack(FASTV))
        assert "\n" not in str(error.value) and "forward" not in model.model.__dict__

    refused(lambda config: setattr(config, "vision_feature_select_strategy", "default"), "full")
    refused(lambda config: setattr(config, "vision_aspect_ratio", "anyres"), "anyres_max_N")
    refused(lambda config: setattr(config.text_config, "layer_types", ["full_attention"] * 3 + ["sliding_attention"]),
            "sliding window")
