"""Attaching touches one instance only; detaching (or an error) restores it exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokenpress
from tokenpress.core.signals import ClsAttention, EncoderKeys
from tokenpress.testing import llava_batch, sample_prompts, tiny_llava

FASTV = {"name": "fastv", "stages": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}]}


def snapshot(model):
    """Everything attaching could change: instance attributes, module objects, parameters."""
    return {
        "model_dict": set(model.__dict__),
        "inner_dict": set(model.model.__dict__),
        "modules": [id(m) for m in model.modules()],
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "forward": type(model.model).forward,
    }


def assert_restored(model, before, batch, expected_logits):
    after = snapshot(model)
    assert after["model_dict"] == before["model_dict"]
    assert after["inner_dict"] == before["inner_dict"]
    assert "forward" not in model.model.__dict__ and "generate" not in model.__dict__
    assert after["modules"] == before["modules"]
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    assert type(model.model).forward is before["forward"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected_logits)
    assert tokenpress.attached_handle(model) is None


@pytest.fixture
def model_and_batch():
    model = tiny_llava("sdpa")
    batch = llava_batch(model, sample_prompts(2))
    with torch.no_grad():
        logits = model(**batch).logits
    return model, batch, logits


def test_detach_restores_the_model(model_and_batch):
    model, batch, logits = model_and_batch
    before = snapshot(model)
    handle = tokenpress.compress(model, FASTV)
    assert "forward" in model.model.__dict__  # instance attribute, never the class
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, logits)
    other = tiny_llava("sdpa")
    assert "forward" not in other.model.__dict__  # another instance is untouched
    handle.detach()
    assert_restored(model, before, batch, logits)
    handle.detach()  # idempotent


def test_context_manager_restores_the_model(model_and_batch):
    model, batch, logits = model_and_batch
    before = snapshot(model)
    with tokenpress.compress(model, FASTV), torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert_restored(model, before, batch, logits)


class Explodes(tokenpress.Method):
    name = "test-explodes"
    Config = tokenpress.MethodConfig
    points = ("post_encoder", "decoder_layer")

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        raise RuntimeError("boom in a stage")

    @tokenpress.hookimpl
    def decoder_layer(self, context):
        raise RuntimeError("boom in a stage")


class ExplodesAtSetup(tokenpress.Method):
    name = "test-explodes-at-setup"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    def setup(self, model_info):
        raise RuntimeError("boom at setup")

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        return tokens


class WantsSignal(tokenpress.Method):
    """Asks for the CLS attention of encoder layer 0 and keeps the most attended half."""

    name = "test-wants-signal"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)
    seen: list = []
    adapters: list = []

    def required_signals(self):
        return {"cls_attention": 0}  # the older name: layer form

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        attention = context.signals[ClsAttention(layer=0)]
        WantsSignal.seen.append(attention)
        WantsSignal.adapters.append(context.adapter)
        counts = tokenpress.keep_count(tokens.counts(), 0.5)
        from tokenpress.core.select import topk_mask

        return tokens.keep(topk_mask(attention, tokens.valid, counts))


class WantsSignalElsewhere(tokenpress.Method):
    """Typed requests: CLS attention of encoder layer 1 (both ways of averaging heads) and its keys;
    records what it gets, changes nothing."""

    name = "test-wants-signal-elsewhere"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)
    seen: list = []

    def required_signals(self):
        return [ClsAttention(layer=1), ClsAttention(layer=1, heads="full"), EncoderKeys(layer=1),
                EncoderKeys(layer=1, heads="mean")]

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        WantsSignalElsewhere.seen.append(dict(context.signals))
        return tokens

    def promised_count(self, tokens_in):
        return tokens_in  # keeps every token: a stage reading signals may follow it


class BadSignature(tokenpress.Method):
    name = "test-bad-signature"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context, surprise):
        return tokens


@pytest.fixture
def test_methods():
    class Plugin:
        @tokenpress.hookimpl
        def tokenpress_register_methods(self):
            return [Explodes, ExplodesAtSetup, WantsSignal, WantsSignalElsewhere, BadSignature]

    tokenpress.get_registry().register_plugin(Plugin(), name="test-attach-methods")
    yield
    tokenpress.get_registry(reload=True)


@pytest.mark.parametrize("point", ["post_encoder", "decoder_layer"])
def test_a_stage_that_raises_leaves_the_model_untouched(model_and_batch, test_methods, point):
    model, batch, logits = model_and_batch
    before = snapshot(model)
    stage = {"method": "test-explodes", "at": point}
    if point == "decoder_layer":
        stage["layers"] = [1]
    with pytest.raises(RuntimeError, match="boom in a stage"), tokenpress.compress(
            model, {"name": "x", "stages": [stage]}), torch.no_grad():
        model(**batch)
    assert_restored(model, before, batch, logits)


@pytest.mark.parametrize("method,error", [
    ("test-explodes-at-setup", RuntimeError),
    ("test-bad-signature", tokenpress.PluginError),
])
def test_a_failure_while_attaching_leaves_the_model_untouched(model_and_batch, test_methods, method, error):
    model, batch, logits = model_and_batch
    before = snapshot(model)
    with pytest.raises(error):
        tokenpress.compress(model, {"name": "x", "stages": [{"method": method}]})
    assert_restored(model, before, batch, logits)


def test_encoder_signals_reach_the_stage(model_and_batch, test_methods):
    model, batch, _ = model_and_batch
    WantsSignal.seen.clear()
    with tokenpress.compress(model, {"name": "x", "stages": [{"method": "test-wants-signal"}]}) as handle, \
            torch.no_grad():
        model(**batch)
    attention = WantsSignal.seen[0]
    assert attention.shape == (2, 36)
    # a distribution over the patches with the CLS column removed: positive, sums to less than 1
    assert bool((attention > 0).all()) and bool((attention.sum(-1) < 1).all())
    assert handle.report().records[0].tokens_out == [18, 18]
    assert WantsSignal.adapters[-1] is handle.adapter  # the stage context carries the model's adapter


@torch.no_grad()
def test_stages_asking_one_signal_differently_each_get_theirs(model_and_batch, test_methods):
    """Typed requests are computed once each; every value equals an independent computation from the
    encoder's own hidden states (the attention of one row: softmax of q_cls . k over the patches)."""
    model, batch, _ = model_and_batch
    WantsSignalElsewhere.seen.clear()
    stack = {"name": "x", "stages": [{"method": "test-wants-signal-elsewhere"}, {"method": "test-wants-signal"}]}
    with tokenpress.compress(model, stack):
        model(**batch)
    signals = WantsSignalElsewhere.seen[0]
    assert "cls_attention" not in signals  # asked three ways: only by request
    tower = model.model.vision_tower
    hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    for layer in (0, 1):
        block = getattr(tower, "vision_model", tower).encoder.layers[layer]
        normed = block.layer_norm1(hidden[layer])
        query, key = block.self_attn.q_proj(normed[:, :1]), block.self_attn.k_proj(normed)
        heads = block.self_attn.num_heads
        per_head = torch.stack([torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
                                for q, k in zip(query.chunk(heads, -1), key.chunk(heads, -1), strict=True)])
        mean = per_head.mean(0)[:, 0, 1:]
        full = torch.softmax(query @ key.transpose(1, 2) / query.shape[-1] ** 0.5, -1)[:, 0, 1:]
        if layer == 1:
            torch.testing.assert_close(signals[ClsAttention(layer=1)], mean)
            torch.testing.assert_close(signals[ClsAttention(layer=1, heads="full")], full)
            torch.testing.assert_close(signals[EncoderKeys(layer=1)], key[:, 1:])
            torch.testing.assert_close(signals[EncoderKeys(layer=1, heads="mean")],
                                       torch.stack(key[:, 1:].chunk(heads, -1)).mean(0))
        else:  # the other stage's request (the older {"cls_attention": 0} form)
            torch.testing.assert_close(WantsSignal.seen[-1], mean)


def test_attaching_twice_is_refused(model_and_batch):
    model, _, _ = model_and_batch
    with tokenpress.compress(model, FASTV), pytest.raises(tokenpress.PluginError, match="already attached"):
        tokenpress.compress(model, FASTV)


def test_unsupported_model_is_refused_and_untouched():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=64))
    before = set(model.__dict__)
    with pytest.raises(tokenpress.UnsupportedModelError, match="no tokenpress adapter supports LlamaForCausalLM"):
        tokenpress.compress(model, FASTV)
    assert set(model.__dict__) == before and "forward" not in model.model.__dict__


def test_eager_only_features_are_refused_while_compressing(model_and_batch):
    model, batch, _ = model_and_batch
    with tokenpress.compress(model, FASTV), pytest.raises(tokenpress.CompressionError, match="output_attentions"):
        model(**batch, output_attentions=True)


def test_a_third_party_family_is_one_adapter_registered_through_the_hook():
    """A family is added by an adapter alone: no method changes, the same hook as methods use."""
    from tokenpress.families.llava import LlavaAdapter

    class TaggedLlavaAdapter(LlavaAdapter):
        family = "test-tagged-llava"

        @classmethod
        def supports(cls, model):
            return getattr(model.config, "tokenpress_test_family", False)

    class Plugin:
        @tokenpress.hookimpl
        def tokenpress_register_adapters(self):
            return [TaggedLlavaAdapter]

    registry = tokenpress.get_registry()
    registry.register_plugin(Plugin(), name="tagged")
    try:
        model = tiny_llava("sdpa")
        model.config.tokenpress_test_family = True
        assert isinstance(tokenpress.find_adapter(model), TaggedLlavaAdapter)
        batch = llava_batch(model, sample_prompts(2))
        with tokenpress.compress(model, FASTV) as handle, torch.no_grad():
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert isinstance(handle.adapter, TaggedLlavaAdapter)
        assert handle.report().records[0].tokens_out == [18, 18]
        assert "adapter:test-tagged-llava" in registry.origins
    finally:
        tokenpress.get_registry(reload=True)
