"""Methods with weights: parts outside the model's state_dict that follow its device and dtype, a
weights file that round trips and is refused for another method or model, teardown on detach, and
``tokenpress fit`` (deterministic, and its teacher is the uncompressed model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokenpress
from tokenpress.core import weights
from tokenpress.core.errors import InputError
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress.testing.models import tiny_llava
from tokenpress.tools.fit import _teacher, _with_answer, fit

UNSHUFFLE = {"name": "u", "stages": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}]}
UNSHUFFLE_RANDOM = {"name": "u", "stages": [{"method": "pixel_unshuffle", "params": {"ratio": 2, "init": "random"}}]}


def with_weights(path: Path | str, **params) -> dict:
    return {"name": "u", "stages": [{"method": "pixel_unshuffle", "params": {"ratio": 2, "weights": str(path),
                                                                             **params}}]}


def saved(model, path: Path, scale: float = 1.0) -> tuple[Path, torch.Tensor]:
    """Attach, perturb the MLP (so the file differs from the initial weights), save; return the logits."""
    batch = FAMILIES["llava"].batch(model, prompts(2), "left", 0)
    with torch.no_grad(), tokenpress.compress(model, UNSHUFFLE) as handle:
        method = handle.entries[0].method
        for parameter in method.weights.parameters():
            parameter.add_(scale * 0.01)
        logits = model(**batch).logits
        weights.save(path, method.name, method.weights_shaping(), weights.model_signature(handle.adapter),
                     method.weights)
    return path, logits


@torch.no_grad()
def test_weights_stay_out_of_the_state_dict_and_detach_drops_them():
    model = tiny_llava("sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tokenpress.compress(model, UNSHUFFLE) as handle:
        method = handle.entries[0].method
        assert isinstance(method.weights, torch.nn.Module)
        state = model.state_dict()
        assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
        assert not any(p is q for p in method.weights.parameters() for q in model.parameters())
    assert method.weights is None  # teardown


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
@torch.no_grad()
def test_weights_follow_the_models_dtype_after_attaching(family):
    spec = FAMILIES[family]
    model = spec.build("sdpa")
    batch = spec.batch(model, prompts(2), "left", 0)
    with tokenpress.compress(model, UNSHUFFLE) as handle:
        reference = model(**batch).logits
        model.to(torch.float64)
        batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        logits = model(**batch64).logits
        assert logits.dtype == torch.float64
        assert all(p.dtype == torch.float64 for p in handle.entries[0].method.weights.parameters())
        torch.testing.assert_close(logits.float(), reference, rtol=1e-4, atol=1e-4)
    model.to(torch.float32)


@torch.no_grad()
def test_a_weights_file_round_trips(tmp_path):
    model = tiny_llava("sdpa")
    path, expected = saved(model, tmp_path / "w.safetensors")
    batch = FAMILIES["llava"].batch(model, prompts(2), "left", 0)
    with tokenpress.compress(model, with_weights(path)):
        assert torch.equal(model(**batch).logits, expected)
    with tokenpress.compress(model, UNSHUFFLE):  # without the file: the seeded initial weights, not the file's
        assert not torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("case", ["another architecture", "other weights", "other ratio", "another method",
                                  "missing", "not safetensors"])
def test_a_weights_file_for_something_else_is_refused_in_one_sentence(tmp_path, case):
    path, _ = saved(tiny_llava("sdpa"), tmp_path / "w.safetensors")
    model = {"another architecture": lambda: tiny_llava("sdpa", num_layers=3),
             "other weights": lambda: tiny_llava("sdpa", seed=7)}.get(case, lambda: tiny_llava("sdpa"))()
    stack = with_weights(path)
    expected = {"another architecture": "made for another model", "other weights": "other weights of the same",
                "other ratio": "but this stage has", "another method": "weights of method 'acme'",
                "missing": "no such weights file", "not safetensors": "not a safetensors file"}[case]
    if case == "other ratio":
        stack = {"name": "u", "stages": [{"method": "pixel_unshuffle", "params": {"ratio": 3, "weights": str(path)}}]}
    elif case == "another method":
        header_model = weights.model_signature(tokenpress.find_adapter(model))
        weights.save(path, "acme", {"ratio": 2, "hidden": None}, header_model, torch.nn.Linear(2, 2))
    elif case == "missing":
        stack = with_weights(tmp_path / "none.safetensors")
    elif case == "not safetensors":
        path.write_text("nope", encoding="utf-8")
    with pytest.raises(InputError) as error:
        tokenpress.compress(model, stack)
    message = str(error.value)
    assert expected in message and "\n" not in message and "stages[0] (pixel_unshuffle)" in message
    assert "forward" not in model.model.__dict__


def test_the_teacher_is_the_uncompressed_model(tmp_path):
    """generate()'s logits of the greedy answer equal a teacher-forced forward of prompt + answer."""
    model = tiny_llava("sdpa")
    batch = FAMILIES["llava"].batch(model, prompts(3), "left", 0)
    with tokenpress.compress(model, UNSHUFFLE) as handle:
        with handle.suspended():
            assert "forward" not in model.model.__dict__
            answer, teacher = _teacher(model, batch, 2)
        assert "forward" in model.model.__dict__
    with torch.no_grad():
        logits = model(**_with_answer(batch, answer)).logits[:, -3:-1]
    torch.testing.assert_close(teacher, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(answer[:, 0], logits[:, 0].argmax(-1))


def test_fit_is_reproducible_and_lowers_the_loss(tmp_path, checkpoint):
    from tokenpress.runtime.loading import load_model_and_processor
    from tokenpress.tools.calibration import PromptedImage

    generator = torch.Generator().manual_seed(0)
    from PIL import Image

    def picture() -> Image.Image:
        return Image.fromarray(torch.randint(0, 255, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy())

    train = [PromptedImage(picture(), f"w{5 + i} w{9 + i}") for i in range(8)]
    held = [PromptedImage(picture(), "w7 w8"), PromptedImage(picture(), "w9")]
    results = []
    for run in range(2):
        model, processor = load_model_and_processor(checkpoint)
        report = fit(model, processor, UNSHUFFLE_RANDOM, train, held, tmp_path / f"run{run}", steps=6, batch_size=4,
                     lr=3e-3, seed=0, progress=False)
        results.append(report)
    first, second = results
    assert first.losses == second.losses
    a = (tmp_path / "run0" / "pixel_unshuffle-ratio2.safetensors").read_bytes()
    assert a == (tmp_path / "run1" / "pixel_unshuffle-ratio2.safetensors").read_bytes()
    assert first.held_out_loss_after < first.held_out_loss_before
    # resuming from the saved state continues, and gives what one run of that length gives
    model, processor = load_model_and_processor(checkpoint)
    longer = fit(model, processor, UNSHUFFLE_RANDOM, train, held, tmp_path / "run0", steps=8, batch_size=4, lr=3e-3,
                 seed=0, progress=False, resume=True)
    model, processor = load_model_and_processor(checkpoint)
    straight = fit(model, processor, UNSHUFFLE_RANDOM, train, held, tmp_path / "straight", steps=8, batch_size=4,
                   lr=3e-3, seed=0, progress=False, save_every=6)
    assert longer.losses == straight.losses


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@torch.no_grad()
def test_unfitted_pixel_unshuffle_starts_as_average_pooling_before_the_projector(family):
    """init: projector -> the MLP is the model's projector on each window's mean: pool(kernel 2, avg)."""
    spec = FAMILIES[family]
    model = spec.build("sdpa")
    batch = spec.batch(model, prompts(2), "left", 0)
    pooled = {"name": "p", "stages": [{"method": "pool", "at": "post_encoder", "params": {"kernel": 2}}]}
    with tokenpress.compress(model, pooled):
        expected = model(**batch).logits
    with tokenpress.compress(model, {"name": "u", "stages": [{"method": "pixel_unshuffle",
                                                              "params": {"ratio": 2, "init": "projector"}}]}):
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
@torch.no_grad()
def test_unfitted_ldp_starts_as_average_pooling_after_the_projector(family):
    """Its MLP starts as the model's projector, its depthwise block as the identity and its strided
    convolution as 2x2 average pooling: pool(kernel 2) at the projector point."""
    spec = FAMILIES[family]
    model = spec.build("sdpa")
    batch = spec.batch(model, prompts(2), "left", 0)
    with tokenpress.compress(model, {"name": "p", "stages": [{"method": "pool", "at": "projector",
                                                              "params": {"kernel": 2}}]}):
        expected = model(**batch).logits
    with tokenpress.compress(model, {"name": "l", "stages": [{"method": "ldp", "params": {"stride": 2}}]}):
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
