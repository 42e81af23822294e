"""SCOPE against a brute-force reference of the released greedy (one image at a time, every coverage and
every gain recomputed from the chosen set at every step, Python lists), on fixed tensors, on padded
batches, for memory (one N x N similarity per row, no other) and FLOPs, and through the stage on a tiny
model of every family (the reference fed the stage's own inputs; on LLaVA-1.5 also read from the model's
own attention weights, summed over heads as released, and hidden states)."""

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
from tokenpress_plugins.scope import method as method_module
from tokenpress_plugins.scope.greedy import greedy_group, select_rows, selection_flops
from tokenpress_plugins.scope.method import Scope, ScopeConfig

# --- the reference: the released greedy, brute force ----------------------------------------------------


def reference(attention: torch.Tensor, features: torch.Tensor, steps: int, alpha: float = 1.0,
              combine: str = "multiply") -> list[int]:
    """The patches picked, in order, from one image of N patches: ``attention`` (N,) (summed over heads),
    ``features`` (N, C). At every step the coverage of each patch k by the chosen set is recomputed,
    ``max(0, max over chosen s of S[s][k])``, then every unchosen patch's gain
    ``sum over all k of max(0, S[k][j] - coverage[k])``, weighted by ``attention[j] ** alpha``; the first
    maximum wins."""
    n = attention.shape[0]
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = (unit @ unit.T).tolist()
    weight = [float(a) ** alpha for a in attention]
    chosen: list[int] = []
    for _ in range(steps):
        coverage = [max([0.0] + [similarity[s][k] for s in chosen]) for k in range(n)]
        best, best_patch = -math.inf, -1
        for j in range(n):
            if j in chosen:
                continue
            gain = sum(max(0.0, similarity[k][j] - coverage[k]) for k in range(n))
            score = gain * weight[j] if combine == "multiply" else gain + weight[j]
            if score > best:  # strictly: the first maximum stays
                best, best_patch = score, j
        chosen.append(best_patch)
    return chosen


def synthetic(n: int, seed: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token attention (summed over 4 heads) and features of one image of ``n`` patches (float64)."""
    generator = torch.Generator().manual_seed(seed)
    attention = 4 * torch.softmax(torch.randn(n, generator=generator, dtype=torch.float64), 0)
    return attention, torch.randn(n, width, generator=generator, dtype=torch.float64)


def kept_set(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


# --- (1) the greedy against the brute force -------------------------------------------------------------


@pytest.mark.parametrize("combine", ["multiply", "add"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize(("n", "seed"), [(12, 0), (25, 1), (40, 2), (33, 3)])
def test_the_greedy_picks_what_the_brute_force_picks_at_every_step(n, seed, alpha, combine):
    """The whole order (every step up to N, hence every K): the same patch at every step."""
    attention, features = synthetic(n, seed)
    weight = attention.unsqueeze(0) ** alpha
    picks = greedy_group(features.unsqueeze(0), weight, n, combine)[0].tolist()
    assert picks == reference(attention, features, n, alpha, combine)


@pytest.mark.parametrize("kept", [1, 2, 7, 16, 35, 36])
def test_select_rows_keeps_the_first_k_picks(kept):
    attention, features = synthetic(36, 7)
    mask = select_rows(attention.unsqueeze(0), features.unsqueeze(0), [36], [kept])[0]
    assert kept_set(mask) == sorted(reference(attention, features, min(kept, 36)))


def test_ties_go_to_the_lower_patch_and_a_copy_adds_no_coverage():
    """Four patches, two exact copies of two directions, equal attention: the first pick is the lower of
    the tie, the second the other direction (a copy adds nothing), then the remaining copies in order."""
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    attention = torch.full((4,), 0.25, dtype=torch.float64)
    picks = greedy_group(features.unsqueeze(0), attention.unsqueeze(0), 4)[0].tolist()
    assert picks == reference(attention, features, 4) == [0, 2, 1, 3]


def test_negative_similarities_never_count():
    """Coverage starts at 0: a patch opposite to all the others gains only its own 1 (times its weight)."""
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.2], [-1.0, 0.0]], dtype=torch.float64)
    attention = torch.tensor([1.0, 1.0, 1.0, 2.5], dtype=torch.float64)
    picks = greedy_group(features.unsqueeze(0), attention.unsqueeze(0), 4)[0].tolist()
    assert picks == reference(attention, features, 4)
    assert picks[0] != 3  # its gain is 1 (x 2.5); patch 0's is about 3 (x 1)


@pytest.mark.parametrize("seed", range(3))
def test_a_padded_batch_selects_in_each_row_what_that_row_selects_alone(seed):
    """Rows of different lengths (two of the same length, chosen together) and garbage padding: each row
    keeps the brute force's patches for that row alone."""
    rows = [synthetic(30, 10 + seed), synthetic(21, 20 + seed), synthetic(30, 30 + seed), synthetic(9, 40 + seed)]
    width = 30
    attention = torch.full((4, width), 9.0, dtype=torch.float64)
    features = torch.full((4, width, 12), 3.0, dtype=torch.float64)
    for r, (score, feature) in enumerate(rows):
        attention[r, :score.shape[0]], features[r, :score.shape[0]] = score, feature
    kept = [8, 5, 11, 12]
    mask = select_rows(attention, features, [30, 21, 30, 9], kept, alpha=0.7)
    assert mask.sum(-1).tolist() == [8, 5, 11, 9]
    for r, (score, feature) in enumerate(rows):
        assert kept_set(mask[r]) == sorted(reference(score, feature, min(kept[r], score.shape[0]), 0.7))


# --- memory and FLOPs -----------------------------------------------------------------------------------


def test_one_similarity_matrix_per_row_and_nothing_else_quadratic():
    """The declared N x N (float32) per row is the only quadratic memory: what is held beyond it stays a
    few copies of the features (the released code makes two more N x N temporaries at every step)."""
    beyond = []
    for patches in (128, 512):
        attention, features = synthetic(patches, 5, width=16)
        with FloatAllocationTracker() as tracker:
            select_rows(attention.float().unsqueeze(0), features.float().unsqueeze(0), [patches], [patches // 8])
        declared = Scope(ScopeConfig(keep_ratio=1 / 8)).pairwise_scores(patches)
        assert declared == patches * patches
        assert tracker.largest[0][2] == (1, patches, patches) and tracker.largest[1][0] < 4 * patches * patches / 4
        beyond.append(tracker.float_bytes - 4 * declared)
    assert 0 < beyond[1] <= 4 * 512 * 16 * 6 and beyond[1] / beyond[0] < 6  # linear: x4, not x16


@pytest.mark.parametrize(("patches", "kept"), [(36, 9), (64, 1), (20, 19), (36, 36)])
def test_declared_flops_equal_the_counter(patches, kept):
    attention, features = synthetic(patches, 8, width=24)
    with FlopCounterMode(display=False) as counter:
        select_rows(attention.unsqueeze(0), features.unsqueeze(0), [patches], [kept])
    assert compat.counted_flops(counter) == selection_flops(patches, kept, 24)
    shape = StageShape(patches, kept, encoder_width=24, llm_width=8, projector_hidden=None)
    assert Scope(ScopeConfig(tokens=kept)).stage_flops(shape) == selection_flops(patches, kept, 24)
    assert selection_flops(576, 64, 1024) / 1e9 == pytest.approx(0.68, abs=0.01)  # LLaVA-1.5


# --- the stage's parameters -----------------------------------------------------------------------------


def test_budgets_and_promises():
    by_ratio = Scope(ScopeConfig(**Scope.params_for_keep(64 / 576)))
    assert by_ratio.kept(576) == 64 and by_ratio.promised_count(torch.tensor([576, 36])).tolist() == [64, 4]
    fixed = Scope(ScopeConfig(tokens=64))
    assert fixed.promised_count(torch.tensor([576, 36])).tolist() == [64, 36]
    assert fixed.pairwise_scores(576) == 576 * 576 and fixed.pairwise_scores(36) == 0  # a whole row: nothing held


@pytest.mark.parametrize(("params", "message"), [
    ({}, "exactly one"), ({"tokens": 64, "keep_ratio": 0.5}, "exactly one"), ({"tokens": 0}, "greater than or equal"),
    ({"keep_ratio": 0}, "greater than 0"), ({"keep_ratio": 0.5, "alpha": -1}, "greater than or equal"),
    ({"keep_ratio": 0.5, "combine": "max"}, "'multiply' or 'add'"), ({"keep_ratio": True}, "boolean"),
])
def test_a_bad_parameter_is_refused_in_one_sentence(params, message):
    with pytest.raises(tokenpress.StackError, match=message) as error:
        tokenpress.load_stack({"name": "s", "stages": [{"method": "scope", "params": params}]})
    assert "\n" not in str(error.value)


def test_encoders_without_a_class_token_give_the_attention_each_patch_receives():
    (request,) = Scope(ScopeConfig(keep_ratio=0.25)).required_signals()
    assert request == ClsAttention(layer=-2, heads="mean", class_free="received")
    assert served_request(request, has_class_token=False) == AttentionReceived(layer=-2, heads="mean")


def test_the_hook_weighs_by_the_attention_summed_over_heads():
    """The signal is averaged over heads; the hook multiplies by the encoder's heads (the released sum),
    which matters in the additive combination."""
    attention, features = synthetic(30, 11)
    tokens = TokenState.from_dense(features.unsqueeze(0), grid=(1, 5, 6))
    stage = Scope(ScopeConfig(tokens=6, combine="add", alpha=1.0))
    context = SimpleNamespace(signals={stage.required_signals()[0]: (attention / 4).unsqueeze(0)}, stage=None,
                              adapter=SimpleNamespace(encoder_heads=lambda: 4))
    out = stage.post_encoder(tokens=tokens, context=context)
    assert out.grid_index[0, :6].tolist() == sorted(reference(attention, features, 6, combine="add"))


# --- (2) through a tiny model of every family -----------------------------------------------------------


class ReturnedStates:
    """Observer: the token state every scope stage receives and returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[TokenState, TokenState]] = []

    @tokenpress.hookimpl(wrapper=True)
    def tokenpress_run_stage(self, method, payload):
        result = yield
        if method.name == "scope":
            self.calls.append((payload, result))
        return result


STACK = {"name": "s", "stages": [{"method": "scope", "params": {"keep_ratio": 0.3, "alpha": 1.0}}]}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_every_family_keeps_what_it_promises_and_what_the_reference_keeps(family, monkeypatch):
    """Each family either refuses in one sentence (no attention signal for its encoder) or keeps, per image
    row, its promised count: exactly the brute force's patches from the stage's own inputs."""
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
    seen: list[tuple] = []

    def recording(attention, features, patches, kept, alpha, combine):
        seen.append((attention.clone(), list(patches), list(kept)))
        return select_rows(attention, features, patches, kept, alpha, combine)

    monkeypatch.setattr(method_module, "select_rows", recording)
    with observing(ReturnedStates()) as observer, handle:
        model(**batch)
    ((received, returned),) = observer.calls
    ((attention, lengths, kept),) = seen
    assert lengths == received.counts_on_host()
    assert kept == Scope(ScopeConfig(**STACK["stages"][0]["params"])).promised_count(torch.tensor(lengths)).tolist()
    assert returned.counts().tolist() == kept
    features = received.embeddings.double()
    for row, count in enumerate(lengths):
        expected = sorted(reference(attention[row, :count].double(), features[row, :count], kept[row]))
        assert returned.grid_index[row, :kept[row]].tolist() == expected
        assert torch.equal(returned.embeddings[row, :kept[row]], received.embeddings[row, expected])


@pytest.mark.parametrize("params", [{"tokens": 12}, {"keep_ratio": 0.4, "alpha": 2.0}, {"tokens": 9, "combine": "add"}])
@torch.no_grad()
def test_on_llava_the_reference_reads_the_models_own_layers(params):
    """The reference reads what the released code reads: the class token's row of the attention weights of
    the encoder's second-to-last layer (``output_attentions``), summed over heads, and that layer's output
    (LLaVA's features), class token removed."""
    model = tiny_model("llava", "eager")
    batch = FAMILIES["llava"].batch(model, prompts(2), "left", 1)
    stack = {"name": "s", "stages": [{"method": "scope", "params": params}]}
    with observing(ReturnedStates()) as observer, tokenpress.compress(model, stack):
        model(**batch)
    ((_, returned),) = observer.calls
    out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    cls_attention = out.attentions[-2].sum(1)[:, 0, 1:]
    features = out.hidden_states[-2][:, 1:]
    stage = Scope(ScopeConfig(**params))
    kept = stage.kept(features.shape[1])
    for image in range(2):
        expected = sorted(reference(cls_attention[image].double(), features[image].double(), kept, stage.config.alpha,
                                    stage.config.combine))
        assert returned.grid_index[image, :kept].tolist() == expected
        torch.testing.assert_close(returned.embeddings[image, :kept], features[image, expected])


def test_scope_after_a_selection_is_refused_in_one_sentence():
    stack = {"name": "s", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "scope", "params": {"keep_ratio": 0.25}}]}
    with pytest.raises(tokenpress.StackError, match=r"stages\[1\] \(scope\) cannot run after stages\[0\] "
                                                   r"\(random\)") as error:
        tokenpress.load_stack(stack)
    assert "\n" not in str(error.value)
