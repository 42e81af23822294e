"""The decoder-side primitives query-based methods build on: a ``Merge`` decision (recycling), the
scorer's attention from chosen rows (raters), and the state the stages of one method share."""

from __future__ import annotations

import pytest
import torch

import tokenpress
from tokenpress import DecoderContext, Keep, Merge
from tokenpress.runtime.scorer import Scorer
from tokenpress.runtime.sequence import Sequence
from tokenpress.testing import Prompt, llava_batch, sample_prompts, tiny_llava


def _sequence(hidden: torch.Tensor, visual: list[bool], size: list[float] | None = None) -> Sequence:
    length = hidden.shape[1]
    is_visual = torch.tensor([visual])
    return Sequence(hidden=hidden, positions=torch.arange(length).view(1, 1, -1) * 2,
                    valid=torch.ones(1, length, dtype=torch.bool), is_visual=is_visual,
                    is_prompt=torch.ones(1, length, dtype=torch.bool), column=torch.arange(length).unsqueeze(0),
                    slot_id=torch.arange(length).unsqueeze(0),
                    visual_id=torch.where(is_visual, torch.arange(length), -1), slot_count=length,
                    lengths=(length,), visual_lengths=(sum(visual),),
                    size=None if size is None else torch.tensor([size]))


def test_per_token_extras_follow_packs_and_merges_like_the_hidden_states():
    """A family's per-token values (Qwen3-VL's pending DeepStack features) move with their tokens: a pack
    gathers them, a merge takes the same weighted mean at the group's first member."""
    hidden = torch.arange(7 * 3, dtype=torch.float32).view(1, 7, 3)
    extra = 100 + torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    sequence = _sequence(hidden, [False, True, True, True, True, True, False], [1, 1, 2, 1, 3, 1, 1])
    sequence = sequence.with_extra(deep=extra)
    kept, index, _ = sequence.pack(torch.tensor([[True, False, True, True, False, True, True]]))
    assert torch.equal(kept.extra["deep"][0], extra[0, [0, 2, 3, 5, 6]])
    merged, _, _ = sequence.merge(torch.tensor([[0, -1, 0, -2, 0, 1, 5]]), None, groups=2)
    torch.testing.assert_close(merged.extra["deep"][0, 2], (2 * extra[0, 2] + 3 * extra[0, 4]) / 5)
    assert torch.equal(merged.extra["deep"][0, [0, 1, 3, 4]], extra[0, [0, 1, 5, 6]])


def test_merge_takes_the_weighted_mean_at_its_first_member():
    hidden = torch.arange(7 * 3, dtype=torch.float32).view(1, 7, 3)
    sequence = _sequence(hidden, [False, True, True, True, True, True, False], [1, 1, 2, 1, 3, 1, 1])
    # slot 1 kept, 2 and 4 merge (sizes 2 and 3), 3 dropped, 5 alone in its group; text ignored
    group = torch.tensor([[0, -1, 0, -2, 0, 1, 5]])
    merged, index, picked = sequence.merge(group, None, groups=2)
    assert index[0].tolist() == [0, 1, 2, 5, 6] and picked.all()
    expected = (2 * hidden[0, 2] + 3 * hidden[0, 4]) / 5
    torch.testing.assert_close(merged.hidden[0, 2], expected)
    assert torch.equal(merged.hidden[0, [0, 1, 3, 4]], hidden[0, [0, 1, 5, 6]])  # the others untouched
    assert merged.size[0].tolist() == [1, 1, 5, 1, 1]
    assert merged.positions[0, 0].tolist() == [0, 2, 4, 10, 12]  # a merged token at its first member's
    assert merged.visual_lengths == (3,) and merged.lengths == (5,)
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0]])
    reweighted, _, _ = sequence.merge(group, weights, groups=2)
    torch.testing.assert_close(reweighted.hidden[0, 2], (hidden[0, 2] + 3 * hidden[0, 4]) / 4)


class _Decides(tokenpress.Method):
    """Test method: at its layers, groups the visual tokens as ``plan`` says (``keep`` / ``merge``)."""

    name = "test-decides"
    Config = tokenpress.MethodConfig
    points = ("decoder_layer",)
    plan = "merge"

    @tokenpress.hookimpl
    def decoder_layer(self, context: DecoderContext):
        visual = context.is_visual
        rank = visual.long().cumsum(-1) - 1
        if _Decides.plan == "keep":  # keep the even visual tokens, drop the odd ones
            return Keep(visual & (rank % 2 == 0))
        if _Decides.plan == "singletons":  # the same as a Merge: even kept (-1), odd dropped (-2)
            return Merge(torch.where(rank % 2 == 0, -1, -2), groups=1)
        return Merge(torch.where(visual, rank // 3, -1), groups=int(visual.sum(-1).max()) // 3 + 1)


@pytest.fixture
def decides(register_methods):
    register_methods(_Decides)
    return _Decides


@torch.no_grad()
def test_a_merge_of_singletons_is_a_keep(decides):
    model = tiny_llava("sdpa")
    batch = llava_batch(model, sample_prompts(3))
    stack = {"name": "d", "stages": [{"method": "test-decides", "layers": [1]}]}
    logits = {}
    for plan in ("keep", "singletons"):
        decides.plan = plan
        with tokenpress.compress(model, stack) as handle:
            logits[plan] = model(**batch).logits
        assert handle.records[0].action == ("keep" if plan == "keep" else "merge")
    assert torch.equal(logits["keep"], logits["singletons"])


@torch.no_grad()
def test_merged_tokens_serve_generation_batches_and_traces(decides):
    decides.plan = "merge"
    model = tiny_llava("sdpa")
    batch = llava_batch(model, sample_prompts(3), "left")
    stack = {"name": "d", "stages": [{"method": "test-decides", "layers": [1, 2]}]}
    with tokenpress.compress(model, stack) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        assert [(r.layer, r.action, r.tokens_in, r.tokens_out) for r in handle.records] == [
            (1, "merge", [36] * 3, [12] * 3), (2, "merge", [12] * 3, [4] * 3)]
        alone = [model.generate(**{k: v[i:i + 1] for k, v in batch.items()}, max_new_tokens=4, do_sample=False)
                 for i in range(3)]
        handle.trace = []
        model(**batch)
        trace = dict(handle.trace)
    assert torch.equal(cached, uncached)
    for i, out in enumerate(alone):
        assert torch.equal(out[0, -4:], cached[i, -4:])
    owners = trace["layer 2"][0]  # after two merges, 4 tokens stand for all 36 patches, 9 each
    assert (owners >= 0).all() and torch.unique(owners, return_counts=True)[1].tolist() == [9, 9, 9, 9]


@torch.no_grad()
def test_attention_from_rows_equals_the_models_own_weights(llava_eager):
    """Rows chosen over the current sequence, per head and averaged, at this layer and the previous."""
    model = llava_eager
    batch = llava_batch(model, [Prompt([1, 5, 6], [7, 8, 9, 10])])
    reference = model(**batch, output_attentions=True).attentions
    hidden = model(**batch, output_hidden_states=True).hidden_states
    adapter = tokenpress.find_adapter(model)
    tokens, _ = adapter.encode_images({"pixel_values": batch["pixel_values"]}, [])
    full = adapter.build_sequence(batch["input_ids"], batch["attention_mask"], adapter.project(tokens),
                                  batch["input_ids"].shape[1], compact=False)
    rows = torch.zeros_like(full.valid)
    rows[0, [1, -3, -1]] = True  # a text token before the image, two after it
    for layer in (1, 2):
        before = Sequence(**{**full.__dict__, "hidden": hidden[layer - 1]})
        now = Sequence(**{**full.__dict__, "hidden": hidden[layer]})
        scorer = Scorer(adapter, layer, now, before)
        per_head, valid = scorer.attention_from(rows, layer="current", heads="all")
        assert valid.tolist() == [[True] * 3]
        torch.testing.assert_close(per_head[0], reference[layer][0][:, rows[0]], rtol=1e-5, atol=1e-6)
        averaged, _ = scorer.attention_from(rows, layer="previous")
        torch.testing.assert_close(averaged[0], reference[layer - 1][0][:, rows[0]].mean(0), rtol=1e-5, atol=1e-6)


class _Shares(tokenpress.Method):
    """Test method: its query_conditioned stage counts the prompt's text tokens into the shared state,
    its decoder_layer stage reads them (and sees a fresh state at every prefill)."""

    name = "test-shares"
    Config = tokenpress.MethodConfig
    points = ("query_conditioned", "decoder_layer")
    seen: list = []

    @tokenpress.hookimpl
    def query_conditioned(self, tokens, context):
        assert "text" not in context.state
        context.state["text"] = [len(context.text_embeddings(i)) for i in range(tokens.num_images)]
        return tokens

    @tokenpress.hookimpl
    def decoder_layer(self, context: DecoderContext):
        _Shares.seen.append((context.layer_index, list(context.state["text"]), context.initial is not None))
        context.state.setdefault("layers", []).append(context.layer_index)
        return None


def test_the_stages_of_one_method_share_one_state_per_prefill(register_methods):
    register_methods(_Shares)
    model = tiny_llava("sdpa")
    batch = llava_batch(model, [Prompt([1, 5], [7, 8, 9]), Prompt([1], [7, 8, 9, 10, 11])])
    stack = {"name": "s", "stages": [{"method": "test-shares", "at": "query_conditioned"},
                                     {"method": "test-shares", "at": "decoder_layer", "layers": [1, 3]}]}
    _Shares.seen.clear()
    with torch.no_grad(), tokenpress.compress(model, stack):
        model(**batch)
        model(**batch)  # a second prefill: the query_conditioned stage finds an empty state again
    assert _Shares.seen == [(1, [5, 6], True), (3, [5, 6], True)] * 2
