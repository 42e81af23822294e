"""DART against an independent reference written from the released code's steps (pivots by the L1 norm of
the keys, then for each pivot in turn the pool tokens least similar to it), one token at a time: on fixed
random tensors, with padding, with both budgets; and through the stage on a tiny model of every family,
the reference reading the unmodified model - the keys its own attention computes in the layer before
(post-rotary, recorded as they reach the attention function) and its hidden states through its final
norm."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import tokenpress
from tokenpress.core import flops
from tokenpress.core.errors import StackError
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress_plugins.dart.duplication import kept_total, quotas, select_keep
from tokenpress_plugins.dart.method import DART, DARTConfig

# --- the reference: the released steps for one sample, one token at a time ------------------------------


def ranked(slots: list[int], norms: list[float]) -> list[int]:
    """Slots by descending key norm, ties to the lower slot."""
    return sorted(slots, key=lambda slot: (-norms[slot], slot))


def reference_dart(norms: list[float], features: torch.Tensor, visual: list[int], after: list[int], total: int,
                   image_pivots: int = 4, text_pivots: int = 4) -> set[int]:
    """The visual slots one sample keeps: ``total`` of them, image pivots included. The pivots take turns
    in rank order (image pivots, then text pivots, each by descending norm); turn t takes ``remaining //
    pivots`` of the pool tokens least similar to it, one more for the first ``remaining % pivots`` turns."""
    image = ranked(visual, norms)[:min(image_pivots, total)]
    pivots = image + ranked(after, norms)[:text_pivots]
    unit = [row / row.norm() for row in features]
    pool = [slot for slot in visual if slot not in image]
    remaining = total - len(image)
    chosen = set(image)
    for turn, pivot in enumerate(pivots):
        quota = remaining // len(pivots) + (1 if turn < remaining % len(pivots) else 0)
        similarity = {slot: float(unit[pivot] @ unit[slot]) for slot in pool}
        taken = sorted(pool, key=lambda slot: (similarity[slot], slot))[:quota]
        chosen.update(taken)
        pool = [slot for slot in pool if slot not in taken]
    return chosen


def released_dart(norms: list[float], features: torch.Tensor, visual: list[int], after: list[int],
                  max_num_trunction: int) -> set[int]:
    """The released code with 4 + 4 pivots: each pivot takes ``M // 8`` of the remaining pool."""
    image = ranked(visual, norms)[:4]
    pivots = image + ranked(after, norms)[:4]
    assert len(pivots) == 8
    unit = [row / row.norm() for row in features]
    pool = [slot for slot in visual if slot not in image]
    chosen = set(image)
    for pivot in pivots:
        similarity = {slot: float(unit[pivot] @ unit[slot]) for slot in pool}
        taken = sorted(pool, key=lambda slot: similarity[slot])[:max_num_trunction // 8]
        chosen.update(taken)
        pool = [slot for slot in pool if slot not in taken]
    return chosen


def synthetic(lengths: list[int], image_at: list[tuple[int, int]], seed: int, width: int = 10):
    """A padded batch of sequences: norms, features, visual and after-image masks, per-sample slot lists.
    ``image_at[b] = (start, count)``: sample b's visual slots."""
    generator = torch.Generator().manual_seed(seed)
    batch, slots = len(lengths), max(lengths) + 2
    norms = torch.rand(batch, slots, generator=generator, dtype=torch.float64) * 10
    features = torch.randn(batch, slots, width, generator=generator, dtype=torch.float64)
    visual = torch.zeros(batch, slots, dtype=torch.bool)
    after = torch.zeros(batch, slots, dtype=torch.bool)
    for b, (length, (start, count)) in enumerate(zip(lengths, image_at, strict=True)):
        visual[b, start:start + count] = True
        after[b, start + count:length] = True
    return norms, features, visual, after


# --- (a) the pure algorithm keeps what the reference keeps ----------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep_ratio", [0.05, 0.22, 0.5, 0.9])
def test_the_kept_tokens_are_the_references(seed, keep_ratio):
    """Three samples of a padded batch (an image early, late, and one with only two text tokens after it)."""
    lengths, image_at = [60, 41, 50], [(3, 40), (5, 30), (2, 46)]
    norms, features, visual, after = synthetic(lengths, image_at, seed)
    for image_pivots, text_pivots in ((4, 4), (2, 6), (3, 0)):
        totals = [kept_total(count, keep_ratio, image_pivots, text_pivots, "exact") for _, count in image_at]
        keep = select_keep(norms, features, visual, after, torch.tensor(totals), image_pivots, text_pivots,
                           max(count for _, count in image_at))
        for b in range(3):
            expected = reference_dart(norms[b].tolist(), features[b], torch.nonzero(visual[b]).flatten().tolist(),
                                      torch.nonzero(after[b]).flatten().tolist(), totals[b], image_pivots,
                                      text_pivots)
            assert set(torch.nonzero(keep[b]).flatten().tolist()) == expected
            assert len(expected) == totals[b]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_num_trunction", [8, 17, 64, 128, 192])
def test_the_released_budget_keeps_what_the_released_code_keeps(seed, max_num_trunction):
    """With every pivot present, the released budget is the released code's: 4 image pivots plus M // 8 per
    pivot, taken in turn (here in rank order, the released code in Python set order: see the README)."""
    norms, features, visual, after = synthetic([300], [(5, 288)], seed)
    total = kept_total(288, max_num_trunction / 288, 4, 4, "released")
    assert total == 4 + 8 * (max_num_trunction // 8)
    keep = select_keep(norms, features, visual, after, torch.tensor([total]), 4, 4, 288)
    expected = released_dart(norms[0].tolist(), features[0], list(range(5, 293)), list(range(293, 300)),
                             max_num_trunction)
    assert set(torch.nonzero(keep[0]).flatten().tolist()) == expected


def test_budgets_on_llava_1_5():
    """The released code keeps 68 / 132 / 196 for M = 64 / 128 / 192 (its count overshoot); the exact budget
    keeps M, image pivots included."""
    for m, released in ((64, 68), (128, 132), (192, 196)):
        assert kept_total(576, m / 576, 4, 4, "released") == released
        assert kept_total(576, m / 576, 4, 4, "exact") == m
    assert kept_total(576, 0.222, 4, 4, "exact") == 128  # the default ratio
    assert kept_total(576, 1.0, 4, 4, "released") == 576  # never more than the image holds
    assert kept_total(10, 0.1, 4, 4, "released") == 4  # M = 1: the image pivots alone, as released
    assert kept_total(10, 0.1, 4, 4, "exact") == 1
    assert kept_total(0, 0.5, 4, 4, "exact") == 0


def test_quotas_split_what_is_left_over_the_pivots_present_in_turn_order():
    valid = torch.tensor([[True, True, True, True, True, True, True, True],
                          [True, True, False, False, True, False, True, True],
                          [True, False, False, False, False, False, False, False]])
    share = quotas(torch.tensor([19, 7, 5]), valid)
    assert share.tolist() == [[3, 3, 3, 2, 2, 2, 2, 2], [2, 2, 0, 0, 1, 0, 1, 1], [5, 0, 0, 0, 0, 0, 0, 0]]


def test_fewer_visual_tokens_than_pivots_and_no_text_after_the_image():
    """Three visual tokens, four image pivots asked and none of the text after the image: the budget still
    holds, and the image pivots within the budget are the largest norms."""
    norms = torch.tensor([[0.0, 5.0, 1.0, 3.0, 9.0]], dtype=torch.float64)
    features = torch.randn(1, 5, 4, dtype=torch.float64)
    visual = torch.tensor([[False, True, True, True, False]])
    after = torch.zeros(1, 5, dtype=torch.bool)
    for total, expected in ((1, {1}), (2, {1, 3}), (3, {1, 2, 3})):
        keep = select_keep(norms, features, visual, after, torch.tensor([total]), 4, 4, 3)
        assert set(torch.nonzero(keep[0]).flatten().tolist()) == expected


# --- configuration -------------------------------------------------------------------------------------


def test_default_layers_scale_the_published_layer():
    default = DART.default_layers
    config = DARTConfig()
    assert default(config, 32) == (2,)  # as published on LLaVA-1.5
    assert default(config, 28) == (2,)  # Qwen2-VL / Qwen2.5-VL-7B: the released scripts also use 2
    assert default(config, 40) == (3,)
    assert default(config, 80) == (5,)
    assert default(config, 4) == (1,)  # never layer 0: its pivots need a layer before
    assert default(config, 2) == (1,)
    assert default(config, 1) == ()


def test_layer_zero_is_refused_in_one_sentence():
    stack = {"name": "d", "stages": [{"method": "dart", "layers": [0, 2], "params": {"keep_ratio": 0.5}}]}
    with pytest.raises(StackError) as raised:
        tokenpress.load_stack(stack)
    message = str(raised.value)
    assert "dart at layer 0 has no layer before it whose keys could choose the pivots" in message
    assert "\n" not in message and message.count(". ") == 0


def test_parameters_and_promise():
    config = DARTConfig()
    assert (config.keep_ratio, config.image_pivots, config.text_pivots, config.budget) == (0.222, 4, 4, "exact")
    assert DART(config).promised_count(torch.tensor([576, 16, 0])).tolist() == [128, 4, 0]
    released = DART(DARTConfig(budget="released"))
    assert released.promised_count(torch.tensor([576])).tolist() == [132]
    assert DART.params_for_keep(0.111) == {"keep_ratio": 0.111}
    for bad in ({"image_pivots": 0}, {"text_pivots": -1}, {"budget": "paper"}, {"keep_ratio": 0.0}):
        with pytest.raises(ValueError):
            DARTConfig(**bad)


# --- through the stage on a tiny model of every family ----------------------------------------------------


@contextlib.contextmanager
def recording_keys(attention_module):
    """The keys ``attention_module`` hands the attention function (post-rotary, before any grouped-query
    repetition), recorded while the model runs as it is (sdpa)."""
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    recorded: list[torch.Tensor] = []

    def recorder(module, query, key, value, *args, **kwargs):
        if module is attention_module:
            recorded.append(key.detach().clone())
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("sdpa", recorder)
    try:
        yield recorded
    finally:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", original)


@torch.no_grad()
def reference_inputs(model, sample: dict, layer: int) -> tuple[list[float], torch.Tensor, list[int], list[int]]:
    """What DART reads before ``layer`` for one unpadded sample, from the unmodified model: the L1 norms of
    the keys layer ``layer - 1`` computes, the hidden states entering ``layer`` (as the layer receives them)
    through the final norm, the image's placeholder columns and the prompt's columns after them."""
    adapter = tokenpress.find_adapter(model)
    language_model = adapter.language_model
    entering: list[torch.Tensor] = []

    def capture(module, args, kwargs):  # what really enters the layer (Qwen3-VL adds DeepStack features first)
        entering.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = language_model.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with recording_keys(language_model.layers[layer - 1].self_attn) as recorded:
            model(**sample, use_cache=False)
    finally:
        hook.remove()
    (keys,), (hidden,) = recorded, entering
    norms = keys[0].abs().sum(dim=(0, 2)).tolist()  # (S,): every head, every channel
    features = language_model.norm(hidden)[0]
    ids = sample["input_ids"][0].tolist()
    placeholders = set(adapter.placeholder_ids())
    visual = [column for column, token in enumerate(ids) if token in placeholders]
    return norms, features, visual, list(range(max(visual) + 1, len(ids)))


def reference_on_model(inputs: tuple[list[float], torch.Tensor, list[int], list[int]], params: dict) -> set[int]:
    """The input columns of the visual tokens DART keeps, from :func:`reference_inputs`."""
    norms, features, visual, after = inputs
    config = DARTConfig(**params)
    total = kept_total(len(visual), config.keep_ratio, config.image_pivots, config.text_pivots, config.budget)
    return reference_dart(norms, features, visual, after, total, config.image_pivots, config.text_pivots)


class Decisions:
    """Every dart call: the sequence it saw and its decision."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @tokenpress.hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage, payload):
        result = yield
        if stage.method == "dart":
            self.calls.append((payload.sequence, result))
        return result


PARAMS = [{"keep_ratio": 0.25}, {"keep_ratio": 0.4, "budget": "released"},
          {"keep_ratio": 0.3, "image_pivots": 2, "text_pivots": 1}]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_the_stage_on_every_family_keeps_what_the_reference_keeps(family):
    """Float64 model, left-padded batch of three, at the default layer and at layer 2: each sample keeps its
    promise, and exactly the tokens the reference keeps from that sample alone."""
    model = tiny_model(family, dtype=torch.float64)
    spec = FAMILIES[family]
    batch = {key: value.double() if value.is_floating_point() else value
             for key, value in spec.batch(model, prompts(3), "left", 0).items()}
    depth = tokenpress.find_adapter(model).num_layers
    references: dict[tuple[int, int], tuple] = {}  # (sample, layer) -> what the reference reads there
    checked = 0
    for params in PARAMS:
        method = DART(DARTConfig(**params))
        for layers in (None, [2]):
            stage = {"method": "dart", "params": params} | ({"layers": layers} if layers else {})
            with observing(Decisions()) as decisions, tokenpress.compress(model, {"name": "d", "stages": [stage]}):
                model(**batch)
            ((sequence, keep),) = decisions.calls
            layer = layers[0] if layers else DART.default_layers(method.config, depth)[0]
            visual = sequence.is_visual & sequence.valid
            for b in range(3):
                kept = set(sequence.slot_id[b][keep.mask[b] & visual[b]].tolist())
                count = int(visual[b].sum())
                assert len(kept) == int(method.promised_count(torch.tensor([count]))[0])
                if (b, layer) not in references:
                    alone = {key: value.double() if value.is_floating_point() else value
                             for key, value in spec.select(batch, b).items()}
                    references[b, layer] = reference_inputs(model, alone, layer)
                assert kept == reference_on_model(references[b, layer], params), (family, params, layers, b)
                checked += len(kept) < count
    assert checked >= 6  # the samples did prune


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_declared_flops_match_the_counter(family):
    """The pivots' keys of the layer before (its k projection over every token that entered it, its q
    projection of one row) and the pivots x visual tokens cosines, for each setting (one at two layers)."""
    model = tiny_model(family, "eager")
    if getattr(model.config, "model_type", None) not in flops.SIMULATED_FAMILIES:
        pytest.skip(f"the FLOPs model does not cover {family}")
    batch = FAMILIES[family].batch(model, prompts(1), "left", 0)
    for params, layers in zip(PARAMS, ([1], [2], [1, 3]), strict=True):
        stack = {"name": "d", "stages": [{"method": "dart", "layers": layers, "params": params}]}
        with tokenpress.compress(model, stack) as handle:
            with FlopCounterMode(display=False) as counter:
                model(**batch, logits_to_keep=1, use_cache=False)
            declared = flops.measured_from_handle(handle, batch)
        assert declared.scoring > 0
        tolerance = FAMILIES[family].flops_tolerance
        counted = compat.counted_flops(counter)
        assert counted * (1 - tolerance) - 1e-6 <= declared.total <= counted * (1 + 1e-9), (params, layers)
        if tolerance == 0:
            assert declared.total == pytest.approx(counted, rel=1e-9), (params, layers)


@torch.no_grad()
def test_nothing_is_scored_when_every_token_stays():
    method = DART(DARTConfig(keep_ratio=1.0), (2,))
    item = flops.ScoringInput(stage=None, layer=2, decoder=flops.DecoderShape(64, 4, 2, 16, 128, 4), tokens=50,
                              previous_tokens=50, text_tokens=14)
    assert method.scoring_flops(item) == 0.0
    shape = flops.DecoderShape(4096, 32, 32, 128, 11008, 32)
    item = flops.ScoringInput(stage=None, layer=2, decoder=shape, tokens=626, previous_tokens=626, text_tokens=50)
    cost = DART(DARTConfig(), (2,)).scoring_flops(item)  # LLaVA-1.5-7B: 576 visual tokens, 50 text
    assert cost == 2 * 626 * 4096 * 4096 + 2 * 4096 * 4096 + 2 * 8 * 576 * 4096
    assert math.isclose(cost / 1e9, 21.08, rel_tol=1e-3)


@torch.no_grad()
def test_after_another_decoder_stage_the_pivots_follow_the_tokens_by_identity():
    """fastv drops half the visual tokens before layer 2, then dart acts there too: its key norms come from
    layer 1, which saw every token, and reach the slots fastv left by identity. Each sample keeps what the
    reference keeps from fastv's survivors (the unmodified model's layer-1 keys and layer-2 inputs: fastv
    drops only before layer 2), and generation with and without the cache agrees."""
    model = tiny_model("llava", dtype=torch.float64)
    spec = FAMILIES["llava"]
    batch = {key: value.double() if value.is_floating_point() else value
             for key, value in spec.batch(model, prompts(3), "left", 1).items()}
    params = {"keep_ratio": 0.3}
    stack = {"name": "fd", "stages": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}},
                                      {"method": "dart", "layers": [2], "params": params}]}
    with observing(Decisions()) as decisions, tokenpress.compress(model, stack) as handle:
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        (record,) = [record for record in handle.report().records if record.method == "dart"]
    assert torch.equal(cached, uncached)
    assert record.tokens_in == [18, 18, 18] and record.tokens_out == [5, 5, 5]
    sequence, keep = decisions.calls[0]
    assert sequence.length < sequence.slot_count  # dart saw the sequence fastv left, not layer 1's
    visual = sequence.is_visual & sequence.valid
    for b in range(3):
        survivors = set(sequence.slot_id[b][visual[b]].tolist())
        alone = {key: value.double() if value.is_floating_point() else value
                 for key, value in spec.select(batch, b).items()}
        norms, features, columns, after = reference_inputs(model, alone, 2)
        total = kept_total(len(survivors), 0.3, 4, 4, "exact")
        expected = reference_dart(norms, features, [c for c in columns if c in survivors], after, total)
        assert set(sequence.slot_id[b][keep.mask[b] & visual[b]].tolist()) == expected
