"""LLaVA-NeXT specifics: base tile + unpadded high-resolution grid, image newlines, mixed sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

import tokenpress
from tokenpress.core.signals import ClsAttention, EncoderKeys
from tokenpress.runtime.adapter import ImageSpan
from tokenpress.testing import Prompt, image_features_fed
from tokenpress.testing.models import llava_next_batch, llava_next_token_count, tiny_llava_next


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next("eager")


def test_token_counts_match_the_model(next_model):
    assert llava_next_token_count(next_model, (64, 64)) == (5, 88)
    assert llava_next_token_count(next_model, (32, 64)) == (3, 52)


@torch.no_grad()
def test_encoder_rows_are_the_base_tile_and_the_unpadded_grid(next_model):
    batch = llava_next_batch(next_model, [Prompt([1], [5])] * 2, sizes=[(64, 64), (48, 64)])
    adapter = tokenpress.find_adapter(next_model)
    tokens, _ = adapter.encode_images(batch, [])
    assert tokens.grid.tolist() == [[1, 4, 4], [1, 8, 8], [1, 4, 4], [1, 6, 8]]
    projected = adapter.project(tokens)
    reference = next_model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    for image, packed in enumerate(reference):  # base tile, then rows of (grid + newline)
        base, high = projected.embeddings[2 * image], projected.embeddings[2 * image + 1]
        _, height, width = tokens.grid[2 * image + 1].tolist()
        torch.testing.assert_close(packed[:16], base[:16])
        rows = packed[16:].reshape(height, width + 1, -1)
        torch.testing.assert_close(rows[:, :width].reshape(height * width, -1), high[: height * width])
        torch.testing.assert_close(rows[:, width], next_model.model.image_newline.expand(height, -1))


@torch.no_grad()
def test_encoder_signals_sit_where_their_patches_features_sit(next_model):
    """Per tile, CLS attention and keys from the tower's own hidden states (an independent
    computation); each stitched position holds the signal of the tile patch whose feature it holds."""
    batch = llava_next_batch(next_model, [Prompt([1], [5])] * 2, sizes=[(64, 64), (48, 64)])
    adapter = tokenpress.find_adapter(next_model)
    cls, keys = ClsAttention(layer=-2), EncoderKeys(layer=-2)
    tokens, signals = adapter.encode_images(batch, [cls, keys])
    tower = next_model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    tiles = [image_size_to_num_patches(size, next_model.config.image_grid_pinpoints, 32)
             for size in batch["image_sizes"]]
    pixels = torch.cat([batch["pixel_values"][i, :count] for i, count in enumerate(tiles)])
    hidden = tower(pixels, output_hidden_states=True).hidden_states
    block = encoder.layers[-2]
    normed = block.layer_norm1(hidden[-3])  # hidden_states[l] enters layer l: layer -2 is entered by [-3]
    query, key = block.self_attn.q_proj(normed[:, :1]), block.self_attn.k_proj(normed)
    heads = block.self_attn.num_heads
    attention = torch.stack([torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)[:, 0, 1:]
                             for q, k in zip(query.chunk(heads, -1), key.chunk(heads, -1), strict=True)]).mean(0)
    features = hidden[-2][:, 1:].flatten(0, 1)  # the features the model uses, every tile patch in a row
    reference_cls, reference_keys = attention.flatten(), key[:, 1:].flatten(0, 1)
    assert signals[cls].shape == tokens.valid.shape and signals[keys].shape[:2] == tokens.valid.shape
    for row in range(tokens.num_images):
        for slot in torch.nonzero(tokens.valid[row]).flatten().tolist():
            source = torch.nonzero((features == tokens.embeddings[row, slot]).all(-1)).flatten()
            assert source.numel() == 1, (row, slot)  # random features: every patch's is unique
            torch.testing.assert_close(signals[cls][row, slot], reference_cls[source[0]])
            torch.testing.assert_close(signals[keys][row, slot], reference_keys[source[0]])


@torch.no_grad()
def test_pool_at_the_projector_equals_the_model_fed_pooled_features(next_model):
    prompt = Prompt([1, 5, 6], [7, 8, 9, 10])
    batch = llava_next_batch(next_model, [prompt], sizes=[(48, 64)])
    with tokenpress.compress(next_model, {"name": "p", "stages": [{"method": "pool", "at": "projector",
                                                                    "params": {"kernel": 2}}]}):
        actual = next_model(**batch).logits

    # Reference, written from the model's own pieces: project every tile, pool the base tile and the
    # stitched + unpadded grid, re-append a newline per (pooled) row, feed it in place of the image.
    config = next_model.config
    tiles = batch["pixel_values"][0, :5]
    hidden = next_model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = next_model.model.multi_modal_projector(hidden)
    base = F.avg_pool2d(projected[0].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), 2)
    base = base.permute(0, 2, 3, 1).reshape(4, -1)
    high, wide = get_anyres_image_grid_shape([48, 64], config.image_grid_pinpoints, 32)
    grid = projected[1:].view(high, wide, 4, 4, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, [48, 64])
    pooled = F.avg_pool2d(grid.unsqueeze(0), 2, ceil_mode=True)[0]  # (C, 3, 4)
    newline = next_model.model.image_newline[:, None, None].expand(-1, pooled.shape[1], 1)
    rows = torch.cat([pooled, newline], dim=-1).flatten(1).transpose(0, 1)
    features = torch.cat([base, rows])
    input_ids = torch.tensor([prompt.before + [config.image_token_id] * features.shape[0] + prompt.after])
    with image_features_fed(next_model, [features]):
        expected = next_model(input_ids=input_ids, pixel_values=batch["pixel_values"],
                              image_sizes=batch["image_sizes"]).logits
    torch.testing.assert_close(actual[:, -4:], expected[:, -4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_row_keeps_its_newline_while_it_keeps_a_token(next_model):
    batch = llava_next_batch(next_model, [Prompt([1], [5])], sizes=[(64, 64)])
    adapter = tokenpress.find_adapter(next_model)
    tokens, _ = adapter.encode_images(batch, [])
    keep = torch.zeros_like(tokens.valid)
    keep[0, :16] = True  # the whole base tile
    keep[1, [0, 3, 17, 18, 63]] = True  # grid rows 0, 2, 7 (row 1 and others: nothing)
    kept = tokens.keep(keep)
    layout = adapter.layout_image(ImageSpan(0, 1, 88, 0, (0, 1)), kept, 10, compact=False)
    newline = -1
    high = layout.sources[16:]
    positions = layout.positions[0][16:]
    assert high.count(newline) == 3
    assert [p for s, p in zip(high, positions, strict=True) if s == newline] == [10 + 16 + r * 9 + 8 for r in (0, 2, 7)]
    assert [p for s, p in zip(high, positions, strict=True) if s != newline] == [
        10 + 16 + c for c in (0, 3)] + [10 + 16 + 2 * 9 + 1, 10 + 16 + 2 * 9 + 2, 10 + 16 + 7 * 9 + 7]
    assert layout.next_position == 10 + 88
    compact = adapter.layout_image(ImageSpan(0, 1, 88, 0, (0, 1)), kept, 10, compact=True)
    assert compact.positions[0] == list(range(10, 10 + 16 + 5 + 3)) and compact.next_position == 10 + 24
