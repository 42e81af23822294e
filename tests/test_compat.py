"""tokenpress.runtime.compat against the installed transformers: one test per detail that moved between releases.

Each test compares with the model's own behaviour on whichever release is installed (CI runs the
suite on both ends of the tested range), so it fails on the release where the detail changed if
compat got that release wrong.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

import tokenpress
from tokenpress.runtime import compat
from tokenpress.runtime.interception import MEDIA_KEYS
from tokenpress.runtime.scorer import attention_rows
from tokenpress.runtime.sequence import Sequence
from tokenpress.testing import Prompt, sample_prompts
from tokenpress.testing.families import FAMILIES

IDENTITY = {"name": "identity", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 1.0}}]}
FASTV = {"name": "fastv", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    family = FAMILIES[request.param]
    return family, family.build("eager")


def _media(batch: dict) -> dict:
    return {key: batch[key] for key in MEDIA_KEYS if key in batch}


def _image_features(output) -> torch.Tensor | None:
    """The image features an inner-module output carries, under this release's field (if any)."""
    if "image_outputs" in output:
        return torch.cat(list(output.image_outputs.pooler_output))
    return output.get("image_hidden_states")


# --- output classes and their fields -------------------------------------------------------------


@torch.no_grad()
def test_compressed_inner_output_is_the_models_own_class_with_the_same_fields(family):
    """5.23 gave Qwen2.5-VL a plain BaseModelOutputWithPast (no rope_deltas); 5.24 moved LLaVA's
    image_hidden_states into image_outputs and past_key_values into cache."""
    family, model = family
    batch = family.batch(model, sample_prompts(2), "left", 0)
    own = model.model(**batch, use_cache=True)
    with tokenpress.compress(model, IDENTITY):
        ours = model.model(**batch, use_cache=True)
        outer = model(**batch, use_cache=True)  # the outer forward reads the inner output field by field
    assert type(ours) is type(own) is compat.output_class(model.model)
    assert set(ours.keys()) == set(own.keys())
    real = batch["attention_mask"].bool()  # padding slots are not computed while attached
    torch.testing.assert_close(outer.logits[real], model(**batch).logits[real], rtol=1e-5, atol=1e-5)
    assert isinstance(compat.output_cache(ours), tokenpress.CompressedCache)
    if _image_features(own) is not None:
        ours_features, own_features = _image_features(ours), _image_features(own)
        if type(own).__name__ in compat.STACKED_IMAGE_STATES and ours_features.shape != own_features.shape:
            # up to 5.23 InternVL stacks per tile; tokenpress's rows are per sample: the same values, flat
            ours_features, own_features = (ours_features.flatten(0, -2), own_features.flatten(0, -2))
        torch.testing.assert_close(ours_features, own_features, rtol=1e-5, atol=1e-6)
    if "rope_deltas" in ours:
        assert torch.equal(ours.rope_deltas, own.rope_deltas)


def test_build_output_fills_only_the_fields_a_class_has():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    hidden, cache = torch.zeros(1, 2, 3), DynamicCache()
    output = compat.build_output(BaseModelOutputWithPast, hidden, cache, [torch.ones(2, 3)], rope_deltas=1)
    assert output.last_hidden_state is hidden and compat.output_cache(output) is cache
    assert set(output.keys()) == {"last_hidden_state", compat.cache_field(BaseModelOutputWithPast)}


# --- the cache argument ----------------------------------------------------------------------------


@torch.no_grad()
def test_decoder_layers_take_the_cache_under_the_detected_name_without_a_deprecation_warning(family):
    """5.24 renamed past_key_values to cache (the old name warns until 5.40); before, layers take
    **kwargs, so a cache passed under the wrong name is silently dropped."""
    family, model = family
    adapter = tokenpress.find_adapter(model)
    layer = adapter.layers[0]
    hidden = torch.randn(1, 5, adapter.text_config.hidden_size)
    positions = torch.arange(5).view(1, 1, 5).expand(adapter.position_rank, 1, 5)
    cache = DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        layer(hidden, attention_mask=None, position_ids=positions[0], use_cache=True,
              position_embeddings=adapter.position_embeddings(hidden, positions),
              **{compat.cache_argument(layer): cache})
    assert cache.get_seq_length() == 5


@torch.no_grad()
def test_compressed_generate_fills_every_layer_and_warns_nothing(family):
    family, model = family
    batch = family.batch(model, sample_prompts(2), "left", 0)
    handler = _Recorder()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(), tokenpress.compress(model, FASTV):
            warnings.simplefilter("error", FutureWarning)
            out = model(**batch, use_cache=True)
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    cache = compat.output_cache(out)
    assert all(length > 0 for length in cache.layer_lengths())
    assert len(cache.layer_lengths()) == tokenpress.find_adapter(model).num_layers
    assert not [m for m in handler.messages if "deprecat" in m.lower()], handler.messages


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- pre-computed encoder outputs ------------------------------------------------------------------


@torch.no_grad()
def test_generate_encodes_each_prompt_once_while_attached(family):
    """From 5.19 generate() runs the encoder itself and passes mm_encoder_outputs; while a stack is
    attached it must only record the call, so the encoder runs once, in the compressed prefill."""
    family, model = family
    adapter = tokenpress.find_adapter(model)
    encoder = getattr(adapter, "vision_tower", None) or adapter.visual
    calls = []
    hook = encoder.register_forward_hook(lambda *args: calls.append(1))
    batch = family.batch(model, sample_prompts(2), "left", 0)
    try:
        plain = model.generate(**batch, max_new_tokens=3, do_sample=False)
        plain_calls = len(calls)
        calls.clear()
        with tokenpress.compress(model, IDENTITY):
            attached = model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(attached, plain)
    assert plain_calls >= 1 and len(calls) == plain_calls  # once per encoder call the model itself makes
    assert compat.accepts_encoder_outputs(model.model) == ("mm_encoder_outputs" in compat.forward_parameters(
        model.model))


# --- M-RoPE ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_scorer_rows_equal_eager_attention_weights_on_every_family(family):
    """Up to 5.18 Qwen2.5-VL's rotary embedding returned one table per M-RoPE axis; the scorer must
    rotate exactly as the layer does, on every release."""
    family, model = family
    batch = family.batch(model, [Prompt([1, 5, 6], [7, 8, 9])], "left", 0)
    adapter = tokenpress.find_adapter(model)
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    tokens, _ = adapter.encode_images(_media(batch), {})
    sequence = adapter.build_sequence(batch["input_ids"], batch["attention_mask"], adapter.project(tokens),
                                      batch["input_ids"].shape[1], compact=False)
    last = sequence.last_prompt_index().unsqueeze(1)
    for layer in range(adapter.num_layers):
        entering = Sequence(**{**sequence.__dict__, "hidden": out.hidden_states[layer]})
        if layer > 0:  # what the model adds between layers (Qwen3-VL's DeepStack) enters the next one
            entering = adapter.after_layer(layer - 1, entering)
        rows = attention_rows(adapter, layer, entering, last)
        torch.testing.assert_close(rows[:, 0], out.attentions[layer][:, :, -1].mean(1), rtol=1e-5, atol=1e-6)


def test_interleave_mrope_takes_each_frequency_band_from_its_axis():
    section = [1, 2, 1]  # half of head_dim 8: frequencies 0 | 1 2 | 3
    cos = torch.stack([torch.full((1, 2, 8), float(axis)) for axis in range(3)])  # (3, B, N, d): value = axis
    sin = -cos
    combined, combined_sin = compat.interleave_mrope(cos, sin, section)
    expected = torch.tensor([0, 1, 1, 2, 0, 1, 1, 2], dtype=torch.float32).expand(1, 2, 8)
    assert torch.equal(combined, expected) and torch.equal(combined_sin, -expected)
    assert compat.interleave_mrope(expected, -expected, section)[0] is expected  # already combined: unchanged


def test_counted_flops_leaves_rotary_tables_out():
    class Rotary(torch.nn.Module):
        def forward(self, x):
            return torch.arange(4.0).view(4, 1) @ torch.ones(1, 8)  # an outer product, as up to 5.18

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary_emb = Rotary()
            self.proj = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.proj(x) + self.rotary_emb(x)

    with FlopCounterMode(display=False) as counter:
        Block()(torch.zeros(4, 8))
    assert counter.get_total_flops() == 2 * 4 * 8 * 8 + 2 * 4 * 8
    assert compat.counted_flops(counter) == 2 * 4 * 8 * 8


# --- the tested range and missing features at attach time -----------------------------------------


def test_the_declared_range_is_pyprojects_and_holds_the_installed_release():
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    declared = [Requirement(d) for d in project["project"]["dependencies"] if d.startswith("transformers")]
    assert [str(r.specifier) for r in declared] == [str(Requirement(f"transformers{compat.TESTED_TRANSFORMERS}")
                                                        .specifier)]
    assert compat.outside_tested_range() is None, compat.outside_tested_range()


def test_attaching_outside_the_tested_range_warns_in_one_sentence(monkeypatch, llava_eager):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    with pytest.warns(compat.UntestedTransformersWarning) as caught, tokenpress.compress(llava_eager, FASTV):
        pass
    message = str(caught[0].message)
    assert "5.99.0" in message and compat.TESTED_TRANSFORMERS in message and "\n" not in message
    assert compat.outside_tested_range("5.17.0") and compat.outside_tested_range("5.26.0")


def test_in_range_attaching_warns_nothing(llava_eager):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tokenpress.compress(llava_eager, FASTV):
            pass


@torch.no_grad()
def test_a_missing_feature_is_one_clear_error_before_anything_is_touched():
    """A release whose decoder layers took the cache under a name tokenpress does not know."""
    family = FAMILIES["llava"]
    model = family.build("eager")
    layer = model.model.language_model.layers[1]

    class RenamedCacheLayer(type(layer)):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)

    layer.__class__ = RenamedCacheLayer  # this one instance stands for a future release
    batch = family.batch(model, sample_prompts(1), "left", 0)
    before = model(**batch).logits
    with pytest.raises(tokenpress.UnsupportedModelError) as info:
        tokenpress.compress(model, FASTV)
    message = str(info.value)
    assert "RenamedCacheLayer.forward takes none of cache, past_key_values" in message and "\n" not in message
    assert "forward" not in model.model.__dict__ and "generate" not in model.__dict__
    assert tokenpress.attached_handle(model) is None
    assert torch.equal(model(**batch).logits, before)
