"""Checks over every registered model family x every registered method (like timm's tests over
list_models()) that complement the method contract (tests/test_contract_kit.py runs the contract -
identity at ratio 1.0, batch invariance with padding, cache/no-cache greedy equality, promises,
no N x N, dtype, determinism - over the same grid): detach restores the model, and batches that
mix image sizes work. A new method or family is tested here without writing a test."""

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


def attach_or_skip(model, stack: dict):
    """Attach ``stack``, or - where the family cannot serve the method (an encoder signal it does
    not give) - check the refusal is one sentence that leaves the model untouched, and skip."""
    try:
        return tokenpress.compress(model, stack)
    except tokenpress.UnsupportedModelError as exc:
        assert "\n" not in str(exc) and "forward" not in model.model.__dict__
        pytest.skip(f"refused, as it should be: {exc}")


def stage_for(method: str, params: dict | None = None) -> dict:
    method_class = REGISTRY.methods[method]
    point = method_class.default_point()
    stage = {"method": method, "at": point, "params": dict(method_class.example_params if params is None else params)}
    if point == "decoder_layer":
        stage["layers"] = [1]
    return stage


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_detach_restores_the_model(family, method):
    spec, model = family
    batch = spec.batch(model, prompts(2), "left", 3)
    expected = model(**batch).logits
    handle = attach_or_skip(model, {"name": "d", "stages": [stage_for(method)]})
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
    with attach_or_skip(model, {"name": "m", "stages": [stage_for(method)]}) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        counts_in = handle.report().records[0].tokens_in
        alone = [model.generate(**spec.select(batch, i), max_new_tokens=4, do_sample=False)[0, -4:] for i in range(3)]
    assert len(set(counts_in)) > 1, "the batch should hold different visual token counts"
    assert torch.equal(cached[:, -4:], torch.stack(alone))
