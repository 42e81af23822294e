"""Encoder signals for encoders with and without a class token: the attention each patch receives equals
the encoder's own attention weights averaged over heads and queries; a class-token request made with
``class_free="received"`` is served as that attention where there is no class token, and refused otherwise."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tokenpress
from tokenpress.core.signals import AttentionReceived, ClsAttention, EncoderKeys, served_request
from tokenpress.runtime.encoder import attention_received
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts

SEEN: list[dict[Any, torch.Tensor]] = []


class RecordsSignals(tokenpress.Method):
    """Asks for the attention received (mean and one full-width head) and a class-token attention that
    falls back to it; records what it gets, changes nothing."""

    name = "test-records-signals"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    def required_signals(self) -> list[Any]:
        return [AttentionReceived(layer=0), AttentionReceived(layer=1, heads="full"),
                ClsAttention(layer=0, class_free="received")]

    @tokenpress.hookimpl
    def post_encoder(self, tokens: tokenpress.TokenState, context: Any) -> tokenpress.TokenState:
        SEEN.append(dict(context.signals))
        return tokens

    def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
        return tokens_in


def test_the_blockwise_attention_received_equals_the_full_matrix() -> None:
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 37, 8, generator=generator), torch.randn(2, 3, 37, 8, generator=generator)
    bias = torch.zeros(2, 1, 37, 37)
    bias[1, :, :20, 20:] = bias[1, :, 20:, :20] = torch.finfo(torch.float32).min  # two segments in row 1
    weights = torch.softmax(query @ key.transpose(-1, -2) * 0.3 + bias, dim=-1)
    expected = weights.mean(dim=2).mean(dim=1)
    torch.testing.assert_close(attention_received(query, key, 0.3, bias, chunk=5), expected)
    assert torch.allclose(expected.sum(-1), torch.ones(2))
    # a subset of the queries (a window's) against every key: sized by the keys
    subset = attention_received(query[:, :, :11], key, 0.3, bias[:, :, :11], chunk=4)
    torch.testing.assert_close(subset, weights[:, :, :11].mean(dim=2).mean(dim=1))


def test_a_class_token_request_is_served_as_received_attention_only_where_asked() -> None:
    asked = ClsAttention(layer=-2, heads="full", class_free="received")
    assert served_request(asked, has_class_token=True) == ClsAttention(layer=-2, heads="full")  # computed once
    assert served_request(asked, has_class_token=False) == AttentionReceived(layer=-2, heads="full")
    assert served_request(ClsAttention(layer=-2), has_class_token=False) == ClsAttention(layer=-2)
    assert served_request(EncoderKeys(layer=0), has_class_token=False) == EncoderKeys(layer=0)


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@torch.no_grad()
def test_attention_received_equals_the_encoders_own_attention(family: str, register_methods: Any) -> None:
    """On a CLIP tower: each patch's column of the eager attention weights, averaged over heads and over
    every query of its tile (the class token's included), the class token's column removed."""
    register_methods(RecordsSignals)
    model = tiny_model(family, "eager")
    batch = FAMILIES[family].batch(model, prompts(1), "left", 0)
    SEEN.clear()
    with tokenpress.compress(model, {"name": "x", "stages": [{"method": "test-records-signals"}]}):
        model(**batch)
    signals = SEEN[0]
    pixels = batch["pixel_values"]
    tiles = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
    tower = model.model.vision_tower
    attentions = tower(tiles, output_attentions=True).attentions
    received = attentions[0].mean(dim=2).mean(dim=1)[:, 1:]  # (tiles, patches)
    from_class_token = attentions[0].mean(dim=1)[:, 0, 1:]
    # LLaVA: one row per image; LLaVA-NeXT: signals stitched like the features, the base tile's row first
    first_row = slice(None) if family == "llava" else (0, slice(0, received.shape[1]))
    expected = received if family == "llava" else received[0]
    torch.testing.assert_close(signals[AttentionReceived(layer=0)][first_row], expected)
    # the CLIP tower has a class token: the fallback is not taken
    torch.testing.assert_close(signals[ClsAttention(layer=0, class_free="received")][first_row],
                               from_class_token if family == "llava" else from_class_token[0])
    full = signals[AttentionReceived(layer=1, heads="full")]
    assert full.shape == signals[AttentionReceived(layer=0)].shape and bool((full >= 0).all())
