"""VisPruner against an independent reference written from the released steps (one image at a time, Python
lists, the de-duplication round by round), on fixed tensors, on padded batches, against a transcription of
the released batched loop where it runs (and its crash on an odd leftover, which the plugin fixes), and
through the stage on a tiny model of every family (the reference fed the stage's own inputs; on LLaVA-1.5
also read from the model's own attention weights and hidden states)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from tokenpress.core.flops import StageShape
from tokenpress.core.signals import AttentionReceived, ClsAttention, served_request
from tokenpress.core.tokens import TokenState
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.testing.contract import FloatAllocationTracker, tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress_plugins.vispruner import method as method_module
from tokenpress_plugins.vispruner import prune
from tokenpress_plugins.vispruner.method import VisPruner, VisPrunerConfig
from tokenpress_plugins.vispruner.prune import dedup_rounds, select_rows, selection_flops, split_budget

# --- the reference: the released steps, one image, plain Python ---------------------------------------


def reference(scores: torch.Tensor, features: torch.Tensor, kept: int, important_ratio: float
              ) -> tuple[list[int], list[int]]:
    """(important patches in descending attention, diverse patches in the residual's final order) of one
    image of N patches keeping ``kept``: ``scores`` (N,) class-token attention, ``features`` (N, C)."""
    n = scores.shape[0]
    if kept >= n:
        return list(range(n)), []
    important_count = int(kept * important_ratio)
    diverse_count = kept - important_count
    ranked = sorted(range(n), key=lambda p: (-float(scores[p]), p))
    important, residual = ranked[:important_count], ranked[important_count:]
    if diverse_count == 0:
        return important, []
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = (unit @ unit.T).tolist()
    while True:
        left = len(residual)
        part_a, part_b = residual[0::2], residual[1::2]
        cut = min(8, left - diverse_count, len(part_a))  # the released min(8, R - T_div), at most all of A
        if cut <= 0:
            return important, residual
        best = [max((similarity[a][b] for b in part_b), default=-math.inf) for a in part_a]
        by_best = sorted(range(len(part_a)), key=lambda i: (-best[i], i))  # descending, ties: earlier place
        residual = [part_a[i] for i in by_best[cut:]] + part_b


def released_loop(scores: torch.Tensor, features: torch.Tensor, kept: int, important_ratio: float) -> torch.Tensor:
    """The released batched loop as it is written (B rows at once, the kept A half sized ``R // 2 - r``),
    for the cases it runs: (B, kept) selected patches."""
    rows = scores.shape[0]
    important = int(kept * important_ratio)
    diverse = kept - important
    order = scores.argsort(dim=-1, descending=True)
    chosen, residual = order[:, :important], order[:, important:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while True:
        left = residual.shape[1]
        cut = min(8, left - diverse)
        if cut <= 0:
            break
        tokens = unit[torch.arange(rows).unsqueeze(-1).expand(-1, left), residual]
        best = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        survivors = best.argsort(dim=-1, descending=True)[:, cut:]
        residual = torch.cat([residual[:, ::2][torch.arange(rows).unsqueeze(-1).expand(-1, left // 2 - cut), survivors],
                              residual[:, 1::2]], dim=-1)
    return torch.cat([chosen, residual], dim=-1)


def synthetic(n: int, seed: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token attention and features of one image of ``n`` patches (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.softmax(torch.randn(n, generator=generator, dtype=torch.float64), 0),
            torch.randn(n, width, generator=generator, dtype=torch.float64))


def padded(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The rows' attention and features padded to the longest row with garbage, and their lengths."""
    width = max(row[0].shape[0] for row in rows)
    scores = torch.full((len(rows), width), 5.0, dtype=torch.float64)  # padding would win every ranking
    features = torch.full((len(rows), width, rows[0][1].shape[1]), 7.0, dtype=torch.float64)
    for r, (score, feature) in enumerate(rows):
        scores[r, :score.shape[0]], features[r, :score.shape[0]] = score, feature
    return scores, features, [row[0].shape[0] for row in rows]


def kept_set(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


# --- (1) the algorithm against the reference ------------------------------------------------------------

BUDGETS = [(kept, ratio) for kept in (1, 2, 5, 9, 16, 22, 32, 45, 63, 64, 100) for ratio in (0.0, 0.25, 0.5, 0.75, 1.0)]


@pytest.mark.parametrize(("kept", "important_ratio"), BUDGETS)
def test_the_same_patches_as_the_reference(kept, important_ratio):
    """One row of 64 patches, every budget (odd leftovers, diverse budgets under 8, all important, all
    diverse, the whole row): the same important and diverse patches as the reference."""
    scores, features = synthetic(64, kept)
    important, diverse = reference(scores, features, kept, important_ratio)
    mask = select_rows(scores.unsqueeze(0), features.unsqueeze(0), [64], [kept], important_ratio)[0]
    assert kept_set(mask) == sorted(important + diverse)
    assert len(important) + len(diverse) == min(kept, 64)
    if kept < 64:
        order = prune.select_group(scores.unsqueeze(0), features.unsqueeze(0), *split_budget(kept, important_ratio))
        assert order[0].tolist() == important + diverse  # the same order too: important, then the residual's


@pytest.mark.parametrize("seed", range(4))
def test_a_padded_batch_selects_in_each_row_what_that_row_selects_alone(seed):
    """Rows of different lengths (rows of the same shape processed together: evenly spaced ones as one
    strided slice, the others one by one) and padding that would win every ranking: each row keeps what the
    reference keeps alone."""
    rows = [synthetic(64, 10 + seed), synthetic(49, 20 + seed), synthetic(64, 30 + seed), synthetic(23, 40 + seed),
            synthetic(49, 50 + seed), synthetic(49, 60 + seed)]
    scores, features, lengths = padded(rows)
    kept = [22, 13, 22, 30, 13, 13]
    assert prune.row_slices([0, 2]) == [slice(0, 3, 2)] and len(prune.row_slices([1, 4, 5])) == 3
    mask = select_rows(scores, features, lengths, kept, 0.5)
    assert mask.sum(-1).tolist() == [22, 13, 22, 23, 13, 13]
    for r, (score, feature) in enumerate(rows):
        important, diverse = reference(score, feature, kept[r], 0.5)
        assert kept_set(mask[r]) == sorted(important + diverse)


@pytest.mark.parametrize(("kept", "important_ratio"), [(64, 0.5), (32, 0.5), (64, 0.75), (30, 0.6), (48, 0.25)])
def test_where_the_released_loop_runs_its_rounds_are_ours(kept, important_ratio):
    """Budgets whose residual stays even and whose diverse part is at least 8 (the released code's own
    settings): a transcription of the released batched loop keeps exactly our patches, for 3 rows at once."""
    rows = [synthetic(144, 50 + r, width=16) for r in range(3)]
    scores = torch.stack([score for score, _ in rows])
    features = torch.stack([feature for _, feature in rows])
    released = released_loop(scores, features, kept, important_ratio)
    ours = select_rows(scores, features, [144] * 3, [kept] * 3, important_ratio)
    for r in range(3):
        assert sorted(released[r].tolist()) == kept_set(ours[r])


def test_the_released_loop_fails_on_an_odd_leftover_and_ours_keeps_the_budget():
    """T = 90, r = 0.5 on 576 patches leaves 531 residual patches: the released loop sizes the kept A half
    R // 2 - r while A holds R // 2 + 1, and fails; here the A patches not dropped are kept."""
    scores, features = synthetic(576, 3, width=16)
    assert split_budget(90, 0.5) == (45, 45)
    with pytest.raises((RuntimeError, IndexError)):
        released_loop(scores.unsqueeze(0).expand(2, -1), features.unsqueeze(0).expand(2, -1, -1), 90, 0.5)
    mask = select_rows(scores.unsqueeze(0), features.unsqueeze(0), [576], [90], 0.5)[0]
    important, diverse = reference(scores, features, 90, 0.5)
    assert kept_set(mask) == sorted(important + diverse) and len(diverse) == 45


def test_rounds_drop_eight_at_a_time_and_at_most_all_of_a():
    assert dedup_rounds(10, 2) == [(5, 5, 5), (3, 2, 3)]  # the released code has min(8, 8) = 8 > |A| = 5: fails
    assert dedup_rounds(24, 8) == [(12, 12, 8), (8, 8, 8)]
    assert dedup_rounds(25, 8) == [(13, 12, 8), (9, 8, 8), (5, 4, 1)]
    assert dedup_rounds(30, 0) == [] and dedup_rounds(8, 8) == []
    assert [cut for _, _, cut in dedup_rounds(576 - 32, 32)] == [8] * 64  # LLaVA-1.5, 64 tokens: 64 rounds


def test_ties_go_to_the_lower_patch_and_exact_duplicates_are_dropped():
    """Equal attention: the lower patch is important (0, not 1). The residual [1 .. 10] splits into
    A = [1, 3, 5, 7, 9] and B = [2, 4, 6, 8, 10]; patch 5 copies patch 6 and patch 9 copies patch 2, so both
    score 1 and the rest 0. One patch is cut: of the tie, the earlier place (5) goes; the kept A patches
    follow in descending score (9 first), then B."""
    scores = torch.tensor([[0.5, 0.5, 0.4, 0.39, 0.38, 0.37, 0.36, 0.35, 0.34, 0.33, 0.32]], dtype=torch.float64)
    features = torch.eye(11, dtype=torch.float64)
    features[5], features[9] = features[6].clone(), features[2].clone()
    assert dedup_rounds(10, 9) == [(5, 5, 1)]
    order = prune.select_group(scores, features.unsqueeze(0), 1, 9)[0].tolist()
    assert order == [0, 9, 1, 3, 7, 2, 4, 6, 8, 10]
    assert reference(scores[0], features, 10, 0.1) == ([0], [9, 1, 3, 7, 2, 4, 6, 8, 10])
    assert kept_set(select_rows(scores, features.unsqueeze(0), [11], [10], 0.1)[0]) == sorted(order)


# --- FLOPs and memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("patches", "kept", "important_ratio"), [(64, 16, 0.5), (64, 22, 0.5), (144, 30, 0.25),
                                                                  (64, 5, 0.0), (64, 8, 1.0), (36, 36, 0.5)])
def test_declared_flops_equal_the_counter(patches, kept, important_ratio):
    scores, features = synthetic(patches, 9, width=24)
    with FlopCounterMode(display=False) as counter:
        select_rows(scores.unsqueeze(0), features.unsqueeze(0), [patches], [kept], important_ratio)
    declared = selection_flops(patches, kept, important_ratio, 24)
    assert compat.counted_flops(counter) == declared
    shape = StageShape(patches, kept, encoder_width=24, llm_width=8, projector_hidden=None)
    assert VisPruner(VisPrunerConfig(tokens=kept, important_ratio=important_ratio)).stage_flops(shape) == declared


def test_published_cost_on_llava_1_5():
    """576 patches, r = 0.5, C = 1024: 64, 56, 48 rounds and about 3.5, 2.9, 2.4 GFLOPs at 64, 128, 192 tokens."""
    for kept, rounds, gflops in ((64, 64, 3.5), (128, 56, 2.9), (192, 48, 2.4)):
        important, diverse = split_budget(kept, 0.5)
        assert len(dedup_rounds(576 - important, diverse)) == rounds
        assert selection_flops(576, kept, 0.5, 1024) / 1e9 == pytest.approx(gflops, abs=0.06)


def test_the_declared_block_is_the_only_quadratic_memory():
    """A round's |A| x |B| scores are the declared pairwise step (the first round's, at most N² / 4): what is
    held beyond them grows about 4x from 256 to 1024 patches (linear; quadratic would be 16x)."""
    beyond = []
    for patches in (256, 1024):
        scores, features = synthetic(patches, 1, width=16)
        stage = VisPruner(VisPrunerConfig(tokens=patches // 16))
        declared = stage.pairwise_scores(patches)
        half = (patches - patches // 32) // 2  # 8 important, the first residual even
        assert declared == half * half <= patches * patches // 4
        with FloatAllocationTracker() as tracker:
            select_rows(scores.float().unsqueeze(0), features.float().unsqueeze(0), [patches], [patches // 16], 0.5)
        assert tracker.largest[0][2] == (1, half, half)
        beyond.append(tracker.float_bytes - 4 * declared)
    assert 0 < beyond[1] / beyond[0] < 6
    assert VisPruner(VisPrunerConfig(tokens=64)).pairwise_scores(64) == 0  # a whole row: nothing


# --- the stage's parameters -----------------------------------------------------------------------------


def test_published_budgets():
    """LLaVA-1.5's 576 patches: 128 at r = 0.5 is 64 + 64; 64 at r = 0.75 is 48 + 16 (the README's MME run)."""
    assert VisPruner(VisPrunerConfig(tokens=128)).split(576) == (64, 64)
    assert VisPruner(VisPrunerConfig(tokens=64, important_ratio=0.75)).split(576) == (48, 16)
    by_ratio = VisPruner(VisPrunerConfig(**VisPruner.params_for_keep(64 / 576)))
    assert by_ratio.kept(576) == 64 and by_ratio.promised_count(torch.tensor([576, 36])).tolist() == [64, 4]
    fixed = VisPruner(VisPrunerConfig(tokens=64))
    assert fixed.promised_count(torch.tensor([576, 36])).tolist() == [64, 36]


@pytest.mark.parametrize(("params", "message"), [
    ({}, "exactly one"), ({"tokens": 64, "keep_ratio": 0.5}, "exactly one"), ({"tokens": 0}, "greater than or equal"),
    ({"keep_ratio": 0}, "greater than 0"), ({"keep_ratio": 0.5, "important_ratio": 1.5}, "less than or equal"),
    ({"keep_ratio": True}, "boolean"), ({"tokens": 64, "important_ratio": "0.5"}, "valid number"),
])
def test_a_bad_budget_is_refused_in_one_sentence(params, message):
    with pytest.raises(tokenpress.StackError, match=message) as error:
        tokenpress.load_stack({"name": "v", "stages": [{"method": "vispruner", "params": params}]})
    assert "\n" not in str(error.value)


def test_encoders_without_a_class_token_give_the_attention_each_patch_receives():
    """The stage asks for the class token's attention at layer -2, averaged over heads; an encoder without a
    class token serves the attention each patch receives instead (the author's rule for such encoders)."""
    (request,) = VisPruner(VisPrunerConfig(keep_ratio=0.25)).required_signals()
    assert request == ClsAttention(layer=-2, heads="mean", class_free="received")
    # with a class token: the plain request, so that one value serves every stage that asks for it
    assert served_request(request, has_class_token=True) == ClsAttention(layer=-2, heads="mean")
    assert served_request(request, has_class_token=False) == AttentionReceived(layer=-2, heads="mean")


def test_the_hook_with_a_whole_budget_returns_the_tokens_unchanged():
    tokens = TokenState.from_dense(torch.randn(2, 36, 8), grid=(1, 6, 6))
    stage = VisPruner(VisPrunerConfig(tokens=64))
    assert stage.post_encoder(tokens=tokens, context=SimpleNamespace(signals={}, stage=None)) is tokens


# --- (2) through a tiny model of every family -----------------------------------------------------------


class ReturnedStates:
    """Observer: the token state every vispruner stage receives and returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[TokenState, TokenState]] = []

    @tokenpress.hookimpl(wrapper=True)
    def tokenpress_run_stage(self, method, payload):
        result = yield
        if method.name == "vispruner":
            self.calls.append((payload, result))
        return result


def recorded_selection(monkeypatch) -> list[tuple]:
    """The inputs of every call the stage makes to the algorithm (attention, features, lengths, budgets)."""
    seen: list[tuple] = []

    def recording(scores, features, patches, kept, important_ratio):
        seen.append((scores.clone(), features.clone(), list(patches), list(kept), important_ratio))
        return select_rows(scores, features, patches, kept, important_ratio)

    monkeypatch.setattr(method_module, "select_rows", recording)
    return seen


STACK = {"name": "v", "stages": [{"method": "vispruner", "params": {"keep_ratio": 0.3, "important_ratio": 0.5}}]}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_every_family_keeps_what_it_promises_and_what_the_reference_keeps(family, monkeypatch):
    """Each family either refuses in one sentence (no attention signal for its encoder) or keeps, per image
    row, its promised count: exactly the reference's patches computed from the stage's own inputs, with
    their features and cells."""
    spec = FAMILIES[family]
    model = tiny_model(family)
    batch = spec.batch(model, prompts(3), "left", 0)
    try:
        handle = tokenpress.compress(model, STACK)
    except tokenpress.UnsupportedModelError as error:
        message = str(error)
        assert "\n" not in message and "attention_received" in message and "class token" in message
        assert tokenpress.attached_handle(model) is None
        return
    seen = recorded_selection(monkeypatch)
    with observing(ReturnedStates()) as observer, handle:
        model(**batch)
    ((received, returned),) = observer.calls
    ((scores, features, lengths, kept, important_ratio),) = seen
    stage = VisPruner(VisPrunerConfig(**STACK["stages"][0]["params"]))
    assert lengths == received.counts_on_host() and kept == stage.promised_count(torch.tensor(lengths)).tolist()
    assert returned.counts().tolist() == kept and torch.equal(features, received.embeddings)
    for row, count in enumerate(lengths):
        important, diverse = reference(scores[row, :count], features[row, :count], kept[row], important_ratio)
        expected = sorted(important + diverse)
        assert returned.grid_index[row, :kept[row]].tolist() == expected
        assert torch.equal(returned.embeddings[row, :kept[row]], received.embeddings[row, expected])


@pytest.mark.parametrize("params", [{"tokens": 20}, {"keep_ratio": 0.5, "important_ratio": 0.75}])
@torch.no_grad()
def test_on_llava_the_reference_reads_the_models_own_layers(params):
    """The reference reads what the released code reads: the class token's row of the attention weights of
    the encoder's second-to-last layer (``output_attentions``), averaged over heads, and that layer's output
    (LLaVA's features), class token removed."""
    model = tiny_model("llava", "eager")
    batch = FAMILIES["llava"].batch(model, prompts(2), "left", 1)
    stack = {"name": "v", "stages": [{"method": "vispruner", "params": params}]}
    with observing(ReturnedStates()) as observer, tokenpress.compress(model, stack):
        model(**batch)
    ((_, returned),) = observer.calls
    out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    cls_attention = out.attentions[-2].mean(1)[:, 0, 1:]
    features = out.hidden_states[-2][:, 1:]
    stage = VisPruner(VisPrunerConfig(**params))
    patches = features.shape[1]
    for image in range(2):
        important, diverse = reference(cls_attention[image].double(), features[image].double(), stage.kept(patches),
                                       stage.config.important_ratio)
        expected = sorted(important + diverse)
        assert returned.grid_index[image, :len(expected)].tolist() == expected
        torch.testing.assert_close(returned.embeddings[image, :len(expected)], features[image, expected])


def test_vispruner_after_a_selection_is_refused_in_one_sentence():
    stack = {"name": "v", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "vispruner", "params": {"keep_ratio": 0.25}}]}
    with pytest.raises(tokenpress.StackError, match=r"stages\[1\] \(vispruner\) cannot run after stages\[0\] "
                                                   r"\(random\)") as error:
        tokenpress.load_stack(stack)
    assert "\n" not in str(error.value)
