"""VisionZip against an independent reference written from the published algorithm (the VisionZip
reference code's steps, one image and one patch at a time), on fixed tensors and on a tiny LLaVA-1.5
through the stage itself, the reference reading the model's own layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tokenpress
from tokenpress.core.signals import ClsAttention, EncoderKeys
from tokenpress.core.tokens import TokenState
from tokenpress.measure.profiling import observing
from tokenpress.testing import llava_batch, sample_prompts
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.visionzip import merge
from tokenpress_plugins.visionzip.merge import zip_rows
from tokenpress_plugins.visionzip.method import VisionZip, VisionZipConfig


def reference(cls_attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int,
              contextual: int) -> tuple[list[int], list[int], dict[int, int], dict[int, torch.Tensor]]:
    """One image of N patches (no CLS token): (dominant patches, targets, merged patch -> its target,
    target -> its contextual feature). ``cls_attn`` (N,) ranks the patches, ``keys`` (N, C) are the
    layer's keys averaged over heads, ``features`` (N, D) the patches' features."""
    n = cls_attn.shape[0]
    ranked = sorted(range(n), key=lambda p: (-float(cls_attn[p]), p))
    dominant_patches = sorted(ranked[:dominant])
    remaining = [p for p in range(n) if p not in dominant_patches]
    if not contextual:  # the reference divides by zero; ours drops the patches left (documented)
        return dominant_patches, [], {}, {}
    step = max(1, len(remaining) // contextual)
    targets = [remaining[i] for i in range(0, len(remaining), step)][:contextual]
    others = [p for p in remaining if p not in targets]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joined = {}
    for p in others:
        similarities = [float(unit[p] @ unit[t]) for t in targets]
        joined[p] = targets[similarities.index(max(similarities))]
    merged = {}
    for t in targets:
        members = [features[p] for p in others if joined[p] == t]
        mean = torch.stack(members).mean(0) if members else torch.zeros_like(features[t])
        merged[t] = features[t] + mean
    return dominant_patches, targets, joined, merged


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLS attention, head-averaged keys and features of one image of ``n`` patches (float64)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=generator, dtype=torch.float64)
    return (torch.softmax(logits, 0), torch.randn(n, 8, generator=generator, dtype=torch.float64),
            torch.randn(n, 12, generator=generator, dtype=torch.float64))


def padded(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The rows' CLS attention, keys and features padded to the longest row, and the valid mask."""
    width = max(row[0].shape[0] for row in rows)
    scores = torch.zeros(len(rows), width, dtype=torch.float64)
    keys = torch.zeros(len(rows), width, rows[0][1].shape[1], dtype=torch.float64)
    features = torch.zeros(len(rows), width, rows[0][2].shape[1], dtype=torch.float64)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (cls_attn, key, feature) in enumerate(rows):
        n = cls_attn.shape[0]
        scores[r, :n], keys[r, :n], features[r, :n], valid[r, :n] = cls_attn, key, feature, True
    return scores, keys, features, valid


def run_stage(params: dict, scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
              valid: torch.Tensor) -> TokenState:
    """The stage's hook on the padded rows as an encoder's token state (one-row grids of their lengths)."""
    method = VisionZip(VisionZipConfig(**params))
    grids = [(1, 1, int(n)) for n in valid.sum(-1).tolist()]
    tokens = TokenState.from_dense(features, grids)
    signals = {ClsAttention(layer=-2, heads="mean", class_free="received"): scores,
               EncoderKeys(layer=-2, heads="mean"): keys}
    return method.post_encoder(tokens, SimpleNamespace(signals=signals, stage=None))


def expected_tokens(dominant_patches: list[int], targets: list[int], joined: dict[int, int],
                    merged: dict[int, torch.Tensor], features: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """The reference's tokens as (patches they stand for, feature), in the raster order of their first patch."""
    tokens = [([p], features[p]) for p in dominant_patches]
    tokens += [(sorted([t] + [p for p, chosen in joined.items() if chosen == t]), merged[t]) for t in targets]
    return sorted(tokens, key=lambda token: token[0][0])


def our_tokens(state: TokenState, row: int) -> list[tuple[list[int], torch.Tensor]]:
    """Row ``row``'s tokens as (patches they stand for, embedding), in slot order."""
    source = state.source[row]
    return [(torch.nonzero(source[slot]).flatten().tolist(), state.embeddings[row, slot])
            for slot in range(int(state.counts()[row]))]


BUDGETS = [{"dominant": 10, "contextual": 6}, {"dominant": 20, "contextual": 7}, {"dominant": 3, "contextual": 40},
           {"dominant": 30, "contextual": 0}, {"dominant": 0, "contextual": 5}, {"dominant": 54, "contextual": 10},
           {"keep_ratio": 0.25}, {"keep_ratio": 1.0}]


@pytest.mark.parametrize("params", BUDGETS, ids=lambda p: "+".join(f"{k}={v}" for k, v in p.items()))
def test_the_same_tokens_as_the_reference_in_a_padded_batch(params):
    """Two rows of different lengths in one batch, each against the reference run alone: the same
    dominant patches, targets, assignment of every other patch and contextual features; each token
    at its first patch's cell, in raster order, its size the patches it stands for."""
    rows = [synthetic(64, 0), synthetic(49, 1)]
    state = run_stage(params, *padded(rows))
    method = VisionZip(VisionZipConfig(**params))
    for r, (cls_attn, keys, features) in enumerate(rows):
        dominant, contextual = method.split(cls_attn.shape[0])
        dominant_patches, targets, joined, merged = reference(cls_attn, keys, features, dominant, contextual)
        assert len(dominant_patches) == dominant and len(targets) == contextual
        expected, ours = expected_tokens(dominant_patches, targets, joined, merged, features), our_tokens(state, r)
        assert [patches for patches, _ in ours] == [patches for patches, _ in expected]
        for (_, embedding), (_, feature) in zip(ours, expected, strict=True):
            torch.testing.assert_close(embedding, feature)
        count = int(state.counts()[r])
        assert state.known_counts[r] == count == dominant + contextual
        assert state.grid_index[r, :count].tolist() == [patches[0] for patches, _ in expected]
        assert state.size[r, :count].tolist() == [len(patches) for patches, _ in expected]


@pytest.mark.parametrize("chunk", [merge.CHUNK, 5])
@pytest.mark.parametrize("params", BUDGETS[:5], ids=lambda p: "+".join(f"{k}={v}" for k, v in p.items()))
def test_dominant_set_targets_and_assignment_are_the_reference_s(params, chunk, monkeypatch):
    """The algorithm's own output (``zip_rows``) on the padded batch: the dominant set, the targets in
    raster order, every other patch's target, and the contextual features, row by row (the similarity
    searched in chunks of ``chunk`` patches)."""
    monkeypatch.setattr(merge, "CHUNK", chunk)
    rows = [synthetic(64, 2), synthetic(40, 3)]
    scores, keys, features, valid = padded(rows)
    method = VisionZip(VisionZipConfig(**params))
    budgets = [method.split(row[0].shape[0]) for row in rows]
    zipped = zip_rows(scores, keys, features, valid, [row[0].shape[0] for row in rows],
                      [kept for kept, _ in budgets], [merged for _, merged in budgets])
    for r, ((cls_attn, key, feature), (dominant, contextual)) in enumerate(zip(rows, budgets, strict=True)):
        dominant_patches, targets, joined, merged = reference(cls_attn, key, feature, dominant, contextual)
        assert torch.nonzero(zipped.dominant[r]).flatten().tolist() == dominant_patches
        assert zipped.targets[r, zipped.target_valid[r]].tolist() == targets
        chosen = {p: targets[c] for p, c in enumerate(zipped.choice[r].tolist()) if c >= 0}
        assert chosen == joined
        for place, target in enumerate(targets):
            torch.testing.assert_close(zipped.contextual[r, place], merged[target])


def test_keep_ratio_gives_the_published_budgets():
    """On LLaVA-1.5's 576 patches, 64, 128 and 192 tokens split as the paper's 54+10, 108+20, 162+30."""
    for kept, budget in ((64, (54, 10)), (128, (108, 20)), (192, (162, 30))):
        assert VisionZip(VisionZipConfig(keep_ratio=kept / 576)).split(576) == budget
    method = VisionZip(VisionZipConfig(**VisionZip.params_for_keep(0.11)))
    assert method.split(576) == (53, 10) and method.promised_count(torch.tensor([576, 36])).tolist() == [63, 4]


def test_counts_larger_than_a_row_keep_what_it_holds():
    fixed = VisionZip(VisionZipConfig(dominant=54, contextual=10))
    assert [fixed.split(n) for n in (576, 60, 36)] == [(54, 10), (54, 6), (36, 0)]
    assert fixed.promised_count(torch.tensor([576, 60, 36])).tolist() == [64, 60, 36]
    cls_attn, keys, features = synthetic(36, 4)
    state = run_stage({"dominant": 54, "contextual": 10}, *padded([(cls_attn, keys, features)]))
    assert state.grid_index[0].tolist() == list(range(36)) and torch.equal(state.embeddings[0], features)


@pytest.mark.parametrize("params, message", [
    ({}, "give dominant and contextual"), ({"dominant": 54}, "give dominant and contextual"),
    ({"dominant": 54, "contextual": 10, "keep_ratio": 0.5}, "not both"),
    ({"dominant": 0, "contextual": 0}, "at least one token"), ({"keep_ratio": 0}, "greater than 0"),
    ({"dominant": -1, "contextual": 2}, "greater than or equal to 0"), ({"keep_ratio": True}, "boolean"),
])
def test_a_bad_budget_is_refused_in_one_sentence(params, message):
    with pytest.raises(tokenpress.StackError, match=message) as error:
        tokenpress.load_stack({"name": "v", "stages": [{"method": "visionzip", "params": params}]})
    assert "\n" not in str(error.value)


class ReturnedStates:
    """Observer: the token state every visionzip stage returns."""

    def __init__(self) -> None:
        self.states: list[TokenState] = []

    @tokenpress.hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage, method, point, payload, call):
        result = yield
        if stage.method == "visionzip":
            self.states.append(result)
        return result


@pytest.mark.parametrize("params", [{"dominant": 10, "contextual": 6}, {"keep_ratio": 0.5}])
@torch.no_grad()
def test_the_stage_on_a_model_equals_the_reference_from_its_own_layers(params):
    """The reference reads what the published code reads: the attention weights of the encoder's
    second-to-last layer (``output_attentions``, summed over heads), that layer's keys (``k_proj`` on its
    normed input) averaged over heads, and its output (LLaVA's features), CLS removed."""
    model = tiny_llava("eager", image_size=64)  # 8 x 8 patches; eager: the tower returns its attention weights
    batch = llava_batch(model, sample_prompts(2))
    stack = {"name": "v", "stages": [{"method": "visionzip", "params": params}]}
    with observing(ReturnedStates()) as observer, tokenpress.compress(model, stack):
        model(**batch)
    (tokens,) = observer.states
    tower = model.model.vision_tower
    out = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    block = getattr(tower, "vision_model", tower).encoder.layers[-2]
    heads = block.self_attn.num_heads
    key = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[-3]))
    metric = key.unflatten(-1, (heads, -1)).mean(-2)
    cls_attn = out.attentions[-2].sum(1)[:, 0, 1:]
    features = out.hidden_states[-2][:, 1:]
    method = VisionZip(VisionZipConfig(**params))
    for image in range(batch["pixel_values"].shape[0]):
        dominant, contextual = method.split(64)
        expected = expected_tokens(*reference(cls_attn[image], metric[image, 1:], features[image], dominant,
                                              contextual), features[image])
        ours = our_tokens(tokens, image)
        assert [patches for patches, _ in ours] == [patches for patches, _ in expected]
        assert tokens.grid_index[image, : len(ours)].tolist() == [patches[0] for patches, _ in expected]
        for (_, embedding), (_, feature) in zip(ours, expected, strict=True):
            torch.testing.assert_close(embedding, feature, rtol=1e-4, atol=1e-5)


def test_visionzip_after_a_selection_is_refused_in_one_sentence():
    model = tiny_llava("sdpa")
    stack = {"name": "v", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "visionzip", "params": {"keep_ratio": 0.25}}]}
    with pytest.raises(tokenpress.StackError, match=r"stages\[1\] \(visionzip\) cannot run after stages\[0\] "
                                                   r"\(random\): visionzip reads encoder signals"):
        tokenpress.compress(model, stack)
    assert tokenpress.attached_handle(model) is None and "forward" not in model.model.__dict__
