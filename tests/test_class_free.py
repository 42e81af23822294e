"""VisionZip and PruMerge on encoders without a class token (SigLIP, Qwen's ViTs): they rank the patches by
the attention each patch receives (``ClsAttention(class_free="received")`` served as ``AttentionReceived``),
the rest of their algorithms unchanged - checked against independent implementations of that adaptation:
the published algorithms (tests/test_visionzip.py, tests/test_prumerge.py references) fed the attention
received, read from the model independently of the stage."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_prumerge import reference as prumerge_reference  # noqa: E402
from test_visionzip import expected_tokens, our_tokens
from test_visionzip import reference as visionzip_reference

import tokenpress
from tokenpress.core.signals import AttentionReceived, EncoderKeys
from tokenpress.runtime.attach import find_adapter
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts

SEEN: list[tuple[tokenpress.TokenState, dict[Any, torch.Tensor]]] = []


def _class_free_families() -> list[str]:
    return [name for name in sorted(FAMILIES) if not find_adapter(tiny_model(name)).has_class_token]


def test_there_are_families_without_a_class_token() -> None:
    assert _class_free_families(), "no registered family has an encoder without a class token"


def _recorder(layer: int, heads: str) -> type[tokenpress.Method]:
    class Records(tokenpress.Method):
        """Records the encoder's tokens, the attention each patch receives and the keys; changes nothing."""

        name = "test-records-received"
        Config = tokenpress.MethodConfig
        points = ("post_encoder",)

        def required_signals(self) -> list[Any]:
            return [AttentionReceived(layer=layer, heads=heads), EncoderKeys(layer=layer, heads="mean"),
                    EncoderKeys(layer=layer)]

        @tokenpress.hookimpl
        def post_encoder(self, tokens: tokenpress.TokenState, context: Any) -> tokenpress.TokenState:
            SEEN.append((tokens, dict(context.signals)))
            return tokens

        def promised_count(self, tokens_in: torch.Tensor) -> torch.Tensor:
            return tokens_in

    return Records


def _record(model: Any, batch: dict, layer: int, heads: str, register_methods: Any) -> tuple[Any, dict]:
    SEEN.clear()
    register_methods(_recorder(layer, heads))
    with torch.no_grad(), tokenpress.compress(model, {"name": "r", "stages": [{"method": "test-records-received"}]}):
        model(**batch)
    return SEEN[0]


def _stage_output(model: Any, batch: dict, stage: dict, recorded: list) -> tokenpress.TokenState:
    recorded.clear()
    stack = {"name": "s", "stages": [stage, {"method": "test-record-tokens"}]}
    with torch.no_grad(), tokenpress.compress(model, stack):
        model(**batch)
    return recorded[0]


@pytest.mark.parametrize("family", _class_free_families())
def test_visionzip_without_a_class_token_ranks_by_the_attention_received(family: str, register_methods,
                                                                          recorded_tokens) -> None:
    model = tiny_model(family)
    batch = FAMILIES[family].batch(model, prompts(2), "left", 0)
    tokens, signals = _record(model, batch, -2, "mean", register_methods)
    received, keys = signals[AttentionReceived(layer=-2)], signals[EncoderKeys(layer=-2, heads="mean")]
    params = {"keep_ratio": 0.5}
    out = _stage_output(model, batch, {"method": "visionzip", "params": params}, recorded_tokens)
    from tokenpress_plugins.visionzip.method import VisionZip, VisionZipConfig

    method = VisionZip(VisionZipConfig(**params))
    for row in range(tokens.num_images):
        count = int(tokens.counts()[row])
        dominant, contextual = method.split(count)
        features = tokens.embeddings[row, :count]
        expected = expected_tokens(*visionzip_reference(received[row, :count], keys[row, :count], features,
                                                        dominant, contextual), features)
        ours = our_tokens(out, row)
        assert [patches for patches, _ in ours] == [patches for patches, _ in expected]
        for (_, embedding), (_, feature) in zip(ours, expected, strict=True):
            torch.testing.assert_close(embedding, feature, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", _class_free_families())
def test_prumerge_without_a_class_token_ranks_by_the_attention_received(family: str, register_methods,
                                                                         recorded_tokens) -> None:
    model = tiny_model(family)
    batch = FAMILIES[family].batch(model, prompts(2), "left", 0)
    tokens, signals = _record(model, batch, -1, "full", register_methods)
    received, keys = signals[AttentionReceived(layer=-1, heads="full")], signals[EncoderKeys(layer=-1)]
    out = _stage_output(model, batch, {"method": "prumerge", "params": {"rest_token": False}}, recorded_tokens)
    for row in range(tokens.num_images):
        count = int(tokens.counts()[row])
        kept, merged, _ = prumerge_reference(received[row, :count], keys[row, :count],
                                             tokens.embeddings[row, :count], plus=False)
        ours = our_tokens(out, row)
        assert sorted(patches[0] for patches, _ in ours) == sorted(kept)
        for patches, embedding in ours:
            torch.testing.assert_close(embedding, merged[patches[0]], rtol=1e-4, atol=1e-5)
