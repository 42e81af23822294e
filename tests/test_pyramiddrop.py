"""PyramidDrop against an independent reference of the released code's steps: its count arithmetic as plain
Python, the stage's choice at every layer against the top-k of the attention row the layer's own eager
attention module gives (every family), and the whole forward on a tiny LLaVA-1.5 against a decoder run layer
by layer from the model's own modules, dropping at each stage and re-numbering the positions as the released
code does."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from reference import llava_patch_features, merged_embeddings
from tokenpress.core import flops
from tokenpress.core.errors import StackError
from tokenpress.core.hookspecs import hookimpl
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.runtime.loading import config_from_file
from tokenpress.testing import MethodContract, llava_batch, sample_prompts, select_rows
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.pyramiddrop.method import PyramidDrop, PyramidDropConfig
from tokenpress_plugins.pyramiddrop.schedule import counts_through, kept, lambda_for_final_share, mean_share

LAYERS = 8  # default layers on 8: floor(l * 8 / 32 + 0.5) for l = 8, 16, 24 -> 2, 4, 6


def stack(layers: list[int] | None = None, positions: str = "original", **params: Any) -> dict:
    stage: dict[str, Any] = {"method": "pyramiddrop", "params": params}
    if layers is not None:
        stage["layers"] = layers
    return {"name": "pyramiddrop", "positions": positions, "stages": [stage]}


# --- the schedule, against the released arithmetic ----------------------------------------------------


def released_counts(original: int, ratios: list[Fraction]) -> list[int]:
    """The released code's counts: every stage ``int(N0 * ratio[s])`` of the ORIGINAL count, the ratios as
    the scripts write them ([0.5, 0.25, 0.125]), taken exactly here."""
    return [int(original * ratio) for ratio in ratios]


@pytest.mark.parametrize("denominator", [2, 4, 5, 8])
def test_counts_equal_the_released_ones_for_unit_fractions(denominator):
    """For lambda = 1/m written exactly (the published 0.5 among them), keeping int(n * lambda) of what enters
    each stage is the released int(N0 * lambda^s) of the original count, for every N0 (no stage left empty)."""
    share = 1.0 / denominator
    ratios = [Fraction(1, denominator ** s) for s in (1, 2, 3)]
    for original in range(denominator ** 3, 3000):
        assert counts_through(original, [share] * 3) == released_counts(original, ratios), original
    assert counts_through(576, [0.5] * 3) == [288, 144, 72]  # the published pyramid


def test_other_shares_lose_at_most_a_token_per_stage():
    """Elsewhere each stage truncates what the stage before truncated: never above the released count (at
    least one token), at most s tokens below it at stage s (exact arithmetic, lambda as written)."""
    for share in (0.19, 0.3, 0.6, 0.7, 0.8, 0.9):
        exact = Fraction(repr(share))
        for original in range(20, 1200, 7):
            ours = counts_through(original, [share] * 3)
            theirs = [max(1, count) for count in released_counts(original, [exact ** s for s in (1, 2, 3)])]
            assert all(0 <= t - o <= s for s, (o, t) in enumerate(zip(ours, theirs, strict=True), 1)), (share, original)
    assert counts_through(577, [0.8] * 3) == [461, 368, 294]  # released: 461, 369, 295 (as the page says)
    assert kept(700, 0.7) == 490 and int(700 * 0.7) == 489  # exact, where floats would lose a token


def test_counts_keep_at_least_one_and_never_more_than_they_hold():
    assert [kept(n, 0.01) for n in (0, 1, 5, 99, 100, 250)] == [0, 1, 1, 1, 1, 2]
    assert [kept(n, 1.0) for n in (0, 1, 36, 576)] == [0, 1, 36, 576]


def test_default_layers_scale_the_published_boundaries():
    default = PyramidDrop.default_layers
    config = PyramidDropConfig()
    assert default(config, 32) == (8, 16, 24)  # the released scripts' layer_list
    assert default(config, 28) == (7, 14, 21)  # Qwen2.5-VL-7B
    assert default(config, 40) == (10, 20, 30)
    assert default(config, LAYERS) == (2, 4, 6)
    assert default(config, 4) == (1, 2, 3)
    assert default(config, 2) == (1,)
    assert default(config, 1) == ()


def test_keep_ratio_is_the_share_left_after_the_last_stage():
    assert PyramidDrop.params_for_keep(0.125) == {"lambda": 0.5}  # the published setting
    for ratio in (0.5, 0.25, 0.11):
        share = PyramidDrop.params_for_keep(ratio)["lambda"]
        assert share == lambda_for_final_share(ratio) and abs(share ** 3 - ratio) < 1e-3
    assert mean_share([0.5] * 3, [8, 16, 24], 32) == pytest.approx(270 / 576)  # 576/288/144/72: 270 on average
    assert mean_share([0.19] * 3, [2, 8, 16], 32) * 576 == pytest.approx(63.7, abs=0.1)  # issue #29's 64


def test_parameters_are_checked_in_one_sentence():
    for params, message in (({"lambda": 0}, r"lambda: .*a share in \(0, 1\] \(got 0\)$"),
                            ({"lambda": 1.5}, r"a share in \(0, 1\] \(got 1.5\)$"),
                            ({"lambda": True}, "a number in .* of them"), ({"lambda": "0.5"}, "a number in"),
                            ({"lambda": []}, "lists no share"), ({"lambda": [0.5, 0]}, r"\(its 0\)"),
                            ({"lambda": [0.5, None]}, r"\(its None\)"), ({"ratio": 0.5}, "unknown field")):
        with pytest.raises(StackError, match=message) as error:
            tokenpress.load_stack(stack(**params))
        assert "\n" not in str(error.value)
    with pytest.raises(StackError, match=r"lists 2 shares for 3 stage layers \(\[1, 2, 3\]\)"):
        tokenpress.load_stack(stack([1, 2, 3], **{"lambda": [0.5, 0.5]}))
    model = tiny_llava("sdpa", num_layers=LAYERS)
    with pytest.raises(StackError, match=r"lists 2 shares for 3 stage layers \(\[2, 4, 6\]\)"):
        tokenpress.compress(model, stack(**{"lambda": [0.5, 0.5]}))  # default layers: refused when resolved
    assert tokenpress.attached_handle(model) is None and "forward" not in model.model.__dict__
    loaded = tokenpress.load_stack(stack([1, 2], **{"lambda": [0.5, 0.25]}))
    assert loaded.stages[0].as_dict()["params"] == {"lambda": [0.5, 0.25]}  # written back as `lambda`
    assert tokenpress.load_stack({"name": "x", "stages": [loaded.stages[0].as_dict()]}).stages[0].config == \
        loaded.stages[0].config
    assert tokenpress.load_stack(stack(lambda_=0.5)).stages[0].config.lambda_ == 0.5  # the field's own name too


# --- the stage through a tiny model of every family -------------------------------------------------------


class DecoderCalls:
    """Records every decoder-layer call of a method: its layer, the sequence entering it, its decision."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[int, Any, Any]] = []

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage, method, point, payload, call, layer):
        result = yield
        if stage.method == self.name and point == "decoder_layer":
            self.calls.append((layer, payload.sequence, result))
        return result


def attention_row(model: Any, layer: int, sequence: Any) -> torch.Tensor:
    """(B, N): each sample's last prompt text token's attention inside decoder layer ``layer``, heads
    averaged, from the layer's own eager attention module (its returned weights) on ``sequence``."""
    adapter = tokenpress.find_adapter(model)
    module = adapter.layers[layer]
    embeddings = adapter.position_embeddings(sequence.hidden, sequence.positions, layer)
    mask = adapter.layer_mask(layer, sequence)
    if mask is None or mask.dtype == torch.bool or mask.dim() != 4:  # the eager weights need the additive form
        count = sequence.hidden.shape[1]
        allowed = torch.ones(count, count, dtype=torch.bool).tril() & sequence.valid[:, None, :]
        mask = torch.where(allowed, 0.0, torch.finfo(sequence.hidden.dtype).min)[:, None]
    _, weights = module.self_attn(hidden_states=module.input_layernorm(sequence.hidden), attention_mask=mask,
                                  position_embeddings=embeddings)
    rows = []
    for sample in range(sequence.hidden.shape[0]):
        text = [slot for slot in range(sequence.hidden.shape[1]) if bool(sequence.valid[sample, slot])
                and bool(sequence.is_prompt[sample, slot]) and not bool(sequence.is_visual[sample, slot])]
        rows.append(weights[sample, :, text[-1]].mean(0))  # the last prompt text token
    return torch.stack(rows)


def check_top(scores: torch.Tensor, visual: list[int], chosen: set[int], count: int, where: str) -> None:
    """``chosen`` is ``count`` of ``visual`` and a top-``count`` set of ``scores`` (the reference's exact top
    set where no two scores sit within float noise of each other at its edge)."""
    assert len(chosen) == count and chosen <= set(visual), where
    ranked = sorted(visual, key=lambda slot: (-float(scores[slot]), slot))
    if set(ranked[:count]) != chosen:
        edge = float(scores[ranked[count - 1]])
        assert all(abs(float(scores[slot]) - edge) < 1e-6 for slot in chosen ^ set(ranked[:count])), where


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", ["left", "right"])
@torch.no_grad()
def test_every_call_keeps_the_top_of_the_layers_own_attention(family, padding):
    """At every default layer of every family, each sample of a padded batch keeps int(n * lambda) of its n
    visual tokens: the top of the last prompt token's attention inside that very layer, as the layer's own
    eager attention module computes it (weights heads-averaged)."""
    model = tiny_model(family, "eager")
    batch = FAMILIES[family].batch(model, prompts(3), padding, 0)
    with observing(DecoderCalls("pyramiddrop")) as recorder, \
            tokenpress.compress(model, stack(**{"lambda": [0.6, 0.5, 0.3]})) as handle:
        model(**batch)
        method = handle.entries[0].method
    layers = PyramidDrop.default_layers(PyramidDropConfig(), tokenpress.find_adapter(model).num_layers)
    assert [layer for layer, _, _ in recorder.calls] == list(layers)
    for layer, sequence, decision in recorder.calls:
        scores = attention_row(model, layer, sequence)
        for sample in range(sequence.hidden.shape[0]):
            visual = torch.nonzero(sequence.is_visual[sample] & sequence.valid[sample]).flatten().tolist()
            count = int(method.promised_count_at(torch.tensor([len(visual)]), layer)[0])
            assert count == kept(len(visual), method.share_at(layer))
            chosen = set(torch.nonzero(decision.mask[sample] & sequence.is_visual[sample]
                                       & sequence.valid[sample]).flatten().tolist())
            check_top(scores[sample], visual, chosen, count, f"{family} layer {layer} sample {sample}")


# --- the whole forward on LLaVA-1.5, against the released steps --------------------------------------------


@pytest.fixture(scope="module")
def llava():
    return tiny_llava("eager", num_layers=LAYERS)


def reference_pyramiddrop(model: Any, batch: dict, share: float, boundaries: list[int], compact: bool) -> dict:
    """One unpadded sample through the decoder layer by layer, as the released ``pdrop_forward`` runs it:
    before each boundary r, layer r's own attention (its norm, q/k, rotary; eager weights, heads averaged) of
    the last prompt token ranks the image tokens; the top int(N0 * share^s) of the ORIGINAL count N0 stay, in
    order; positions re-numbered 0..n-1 (``compact``) or kept. Returns the kept input columns per stage and the
    logits at the text columns."""
    language_model = model.model.language_model
    ids = batch["input_ids"][0]
    features = model.model.multi_modal_projector(llava_patch_features(model, batch["pixel_values"]))
    hidden = merged_embeddings(model, batch["input_ids"], features[0])
    columns = list(range(ids.numel()))  # the input column each token stands for
    image = [column for column in columns if int(ids[column]) == model.config.image_token_id]
    original = len(image)
    positions = torch.arange(ids.numel()).unsqueeze(0)
    stages = []
    for index, layer in enumerate(language_model.layers):
        length = hidden.shape[1]
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos_sin = language_model.rotary_emb(hidden, positions)
        if index in boundaries:
            _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin,
                                         attention_mask=mask)
            row = weights[0, :, length - 1].mean(0)  # the last prompt token (the sample ends with text)
            slots = [i for i, column in enumerate(columns) if column in image]
            count = int(original * Fraction(repr(share)) ** (boundaries.index(index) + 1))
            top = sorted(sorted(slots, key=lambda i: (-float(row[i]), i))[:count])
            keep = [i for i, column in enumerate(columns) if column not in image or i in top]
            stages.append({columns[i] for i in top})
            hidden, columns = hidden[:, keep], [columns[i] for i in keep]
            positions = torch.arange(len(keep)).unsqueeze(0) if compact else positions[:, keep]
            cos_sin = language_model.rotary_emb(hidden, positions)
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(language_model.norm(hidden))[0]
    text = [i for i, column in enumerate(columns) if column not in image]
    return {"stages": stages, "text_columns": [columns[i] for i in text], "logits": logits[text]}


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("padding", ["left", "right"])
@torch.no_grad()
def test_the_forward_equals_the_released_steps(llava, positions, padding):
    """Kept tokens at every stage and the logits of every sample of a padded batch against the reference run on
    that sample alone: ``positions: compact`` is the released re-numbering, ``original`` keeps positions."""
    boundaries = [2, 4, 6]
    batch = llava_batch(llava, sample_prompts(3), padding)
    with observing(DecoderCalls("pyramiddrop")) as recorder, \
            tokenpress.compress(llava, stack(positions=positions, **{"lambda": 0.5})):
        logits = llava(**batch).logits
    assert [layer for layer, _, _ in recorder.calls] == boundaries
    for sample in range(3):
        expected = reference_pyramiddrop(llava, select_rows(batch, sample), 0.5, boundaries, positions == "compact")
        real = batch["attention_mask"][sample].bool()
        offset = int(torch.nonzero(real)[0])  # input column c of the sample is batch column offset + c
        for (_, sequence, decision), columns in zip(recorder.calls, expected["stages"], strict=True):
            kept_slots = decision.mask[sample] & sequence.is_visual[sample] & sequence.valid[sample]
            assert set((sequence.column[sample, kept_slots] - offset).tolist()) == columns
        assert [len(columns) for columns in expected["stages"]] == [18, 9, 4]  # 36 tokens at lambda 0.5
        text = [offset + column for column in expected["text_columns"]]
        torch.testing.assert_close(logits[sample, text], expected["logits"], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_declared_flops_match_the_counter(llava):
    """The scorer's one row at every stage (none where nothing is dropped), for several settings."""
    batch = llava_batch(llava, sample_prompts(1))
    for entry in (stack(**{"lambda": 0.5}), stack([1, 5], **{"lambda": [0.3, 1.0]}), stack(**{"lambda": 1.0}),
                  stack([0, 3], positions="compact", **{"lambda": 0.4})):
        with tokenpress.compress(llava, entry) as handle:
            with FlopCounterMode(display=False) as counter:
                llava(**batch, logits_to_keep=1, use_cache=False)
            declared = flops.measured_from_handle(handle, batch)
        assert declared.total == pytest.approx(compat.counted_flops(counter), rel=1e-9), entry
        assert (declared.scoring > 0) == (entry["stages"][0]["params"]["lambda"] != 1.0)


@pytest.mark.parametrize("positions", ["compact", "original"])
@torch.no_grad()
def test_generation_with_and_without_cache_agree(llava, positions):
    batch = llava_batch(llava, sample_prompts(3), "left")
    with tokenpress.compress(llava, stack(positions=positions, **{"lambda": 0.5})) as handle:
        cached = llava.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = llava.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        assert [(r.layer, r.tokens_out) for r in handle.report().records] == [(2, [18] * 3), (4, [9] * 3),
                                                                             (6, [4] * 3)]
    assert torch.equal(cached, uncached)


def test_the_config_only_flops_model_follows_the_pyramid():
    """``tokenpress flops`` from the config alone: the published pyramid on LLaVA-1.5-7B's geometry."""
    config = config_from_file(Path(__file__).resolve().parents[1] / "configs" / "llava-1.5-7b.json")
    breakdown = flops.simulate(config, stack(**{"lambda": 0.5}), text_tokens=50)
    visual = [tokens - 50 for tokens in breakdown.layer_tokens]
    assert visual == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert breakdown.compressed.scoring > 0


# --- the contract kit, beyond the shared suite's default settings ------------------------------------------


def one_axis_families() -> tuple[str, ...]:
    """The families whose positions are one number per token: on M-RoPE families ``positions: compact``
    re-numbers the image's (t, h, w) positions even where a stage drops nothing (fastv at keep_ratio 1.0 does
    the same), so the contract's identity check, against the model's own positions, cannot hold there."""
    return tuple(name for name in sorted(FAMILIES) if tokenpress.find_adapter(tiny_model(name)).position_rank == 1)


class TestPyramidDropCompactPositions(MethodContract):
    """The contract with the released code's re-numbered positions and one share per stage."""

    method = "pyramiddrop"
    positions = "compact"
    params = {"lambda": [0.7, 0.5, 0.5]}
    families = one_axis_families()
