"""One suite over every registered model family x every registered method (like timm's tests over
list_models()): identity at ratio 1.0, batch invariance with padding, cache/no-cache greedy equality,
detach restores the model. A new method or family is tested here without writing a test."""

from __future__ import annotations

import pytest
import torch

import tokenpress
from tokenpress.testing.families import FAMILIES, prompts

REGISTRY = tokenpress.get_registry()
METHODS = sorted(REGISTRY.methods)
FAMILY_NAMES = sorted(adapter.family for adapter in REGISTRY.adapters)


def test_every_registered_family_has_a_tiny_model():
    missing = [name for name in FAMILY_NAMES if name not in FAMILIES]
    assert not missing, f"no tiny test model for families {missing} (tokenpress.testing.families)"


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    spec = FAMILIES[request.param]
    return spec, spec.build("sdpa")


def stage_for(method: str, params: dict | None = None) -> dict:
    method_class = REGISTRY.methods[method]
    point = method_class.default_point()
    stage = {"method": method, "at": point, "params": dict(method_class.example_params if params is None else params)}
    if point == "decoder_layer":
        stage["layers"] = [1]
    return stage


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_identity_settings_give_the_unmodified_outputs(family, method):
    spec, model = family
    identity = REGISTRY.methods[method].identity_params
    if identity is None:
        pytest.skip(f"{method} has no identity setting")
    same_length = [prompts(1)[0]] * 2
    batch = spec.batch(model, same_length, "left", 0)
    expected = model(**batch).logits
    with tokenpress.compress(model, {"name": "id", "stages": [stage_for(method, identity)]}):
        actual = model(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_batch_invariance_with_padding(family, method):
    spec, model = family
    batch = spec.batch(model, prompts(3), "left", 1)
    with tokenpress.compress(model, {"name": "b", "stages": [stage_for(method)]}):
        batched = model(**batch).logits
        for index in range(3):
            alone = model(**spec.select(batch, index)).logits[0]
            real = batch["attention_mask"][index].bool()
            after = len(prompts(3)[index].after)
            torch.testing.assert_close(batched[index][real][-after:], alone[-after:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_generate_with_and_without_cache_agree(family, method):
    spec, model = family
    batch = spec.batch(model, prompts(3, seed=2), "left", 2)
    with tokenpress.compress(model, {"name": "g", "stages": [stage_for(method)]}) as handle:
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        assert handle.report().records
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_detach_restores_the_model(family, method):
    spec, model = family
    batch = spec.batch(model, prompts(2), "left", 3)
    expected = model(**batch).logits
    handle = tokenpress.compress(model, {"name": "d", "stages": [stage_for(method)]})
    model(**batch)
    handle.detach()
    assert "forward" not in model.model.__dict__ and "generate" not in model.__dict__
    assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_mixed_image_sizes_in_one_batch(family, method):
    spec, model = family
    if spec.mixed_batch is None:
        pytest.skip(f"{spec.name} takes one image size")
    batch = spec.mixed_batch(model, prompts(3))
    with tokenpress.compress(model, {"name": "m", "stages": [stage_for(method)]}) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        counts_in = handle.report().records[0].tokens_in
        alone = [model.generate(**spec.select(batch, i), max_new_tokens=4, do_sample=False)[0, -4:] for i in range(3)]
    assert len(set(counts_in)) > 1, "the batch should hold different visual token counts"
    assert torch.equal(cached[:, -4:], torch.stack(alone))
