"""One attached model shared by threads (a server): every thread gets its single-thread answers and its
own report, and detaching restores the model exactly, on every family, with pre-LLM and decoder stacks."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import tokenpress
from tokenpress.core.select import topk_mask
from tokenpress.core.signals import EncoderKeys
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts

THREADS = 4
ROUNDS = 3

STACKS = {
    "pre-llm": {"name": "pool", "stages": [{"method": "pool", "params": {"kernel": 2}}]},
    "decoder": {"name": "fastv", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}]},
    # an encoder signal read as the encoder runs (a block's keys), then a decoder stage
    "signal": {"name": "keys-then-fastv", "stages": [
        {"method": "test-key-norm"}, {"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}]},
}


class KeyNorm(tokenpress.Method):
    """Keeps the half of each image's tokens whose encoder keys (last block, head-averaged) are largest."""

    name = "test-key-norm"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    def required_signals(self) -> list[Any]:
        return [EncoderKeys(layer=-1, heads="mean")]

    @tokenpress.hookimpl
    def post_encoder(self, tokens: tokenpress.TokenState, context: Any) -> tokenpress.TokenState:
        norms = context.signals[EncoderKeys(layer=-1, heads="mean")].norm(dim=-1)
        counts = tokenpress.keep_counts_on_host(tokens.counts_on_host(), 0.5)
        mask = topk_mask(norms, tokens.valid, torch.tensor(counts, device=norms.device))
        return tokens.keep(mask, counts=counts)


def _inputs(family: str, model: Any) -> list[dict[str, torch.Tensor]]:
    """One different prompt (and image) per thread, each a batch of two with padding."""
    record = FAMILIES[family]
    return [record.batch(model, prompts(2, seed), "left", seed) for seed in range(THREADS)]


def _answers(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    logits = model(**batch).logits
    return generated, logits


def _tree(model: Any) -> list[tuple[str, int, type]]:
    return [(name, id(module), type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("kind", sorted(STACKS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_threads_sharing_an_attached_model_each_get_their_single_thread_answers(family: str, kind: str,
                                                                              register_methods: Any) -> None:
    register_methods(KeyNorm)
    model = tiny_model(family)
    batches = _inputs(family, model)
    tree, state = _tree(model), {k: v.clone() for k, v in model.state_dict().items()}
    plain = [_answers(model, batch) for batch in batches]
    with tokenpress.compress(model, STACKS[kind]) as handle:
        alone = []
        for batch in batches:
            alone.append((*_answers(model, batch), handle.report().as_dicts()))
        results: dict[int, list[Any]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def serve(index: int) -> None:
            try:
                start.wait()
                for _ in range(ROUNDS):
                    results.setdefault(index, []).append((*_answers(model, batches[index]),
                                                          handle.report().as_dicts()))
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=serve, args=(index,)) for index in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"{family}, {kind} stack: a thread failed: {type(errors[0]).__name__}: {errors[0]}"
        for index, runs in results.items():
            generated, logits, report = alone[index]
            for got_generated, got_logits, got_report in runs:
                assert torch.equal(got_generated, generated), f"{family}, {kind}: thread {index} answered otherwise"
                assert torch.equal(got_logits, logits), f"{family}, {kind}: thread {index}'s logits differ"
                assert got_report == report, f"{family}, {kind}: thread {index} got another thread's report"
    assert _tree(model) == tree, f"{family}: detaching after threads left another module tree"
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    for batch, (generated, logits) in zip(batches, plain, strict=True):
        again, again_logits = _answers(model, batch)
        assert torch.equal(again, generated) and torch.equal(again_logits, logits), (
            f"{family}: after detaching, the model no longer answers as before")
