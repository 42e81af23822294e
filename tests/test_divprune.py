"""DivPrune against an independent reference written from the released code's steps (the full cosine
distance matrix, the second smallest entry of each column for the first pick, then at every step the
minimum over all picked rows and the first maximum), on fixed random tensors, on padded batches, and
through the stage on a tiny model of every family, at both of its points, fed with the tokens the
model itself gives there."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from tokenpress.core.flops import StageShape
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.testing.contract import FloatAllocationTracker, tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress_plugins.divprune.diversity import (
    farthest_points,
    nearest_other_distance,
    select_mask,
    selection_flops,
    unit_tokens,
)
from tokenpress_plugins.divprune.method import DivPrune, DivPruneConfig

# --- the reference: the released code's steps, on the full distance matrix, one token at a time ---------


def reference_picks(tokens: torch.Tensor, kept: int) -> list[int]:
    """The picks of the released code, in order, for one image's tokens (N, D): ``1 - U Uᵀ`` in full; the
    first pick maximises the second smallest entry of its column; every next pick maximises the minimum of
    its column over the picked rows, picked tokens not excluded (the released code does not mask them)."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    distance = (1 - unit @ unit.T).tolist()
    n = len(distance)

    def first_maximum(values: list[float]) -> int:
        best = 0
        for j in range(1, len(values)):
            if values[j] > values[best]:
                best = j
        return best

    nearest = [sorted(distance[i][j] for i in range(n))[1] for j in range(n)]
    picks = [first_maximum(nearest)]
    while len(picks) < kept:
        picks.append(first_maximum([min(distance[s][j] for s in picks) for j in range(n)]))
    return picks


def synthetic(n: int, seed: int, width: int = 12, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=torch.float64).to(dtype)


def run_rows(rows: list[torch.Tensor], keep_ratio: float, at: str = "post_encoder", chunk: int = 16):
    """The stage's hook on ``rows`` (each (N_r, D)) as one padded token state (a one-row grid each)."""
    width = max(row.shape[0] for row in rows)
    features = torch.full((len(rows), width, rows[0].shape[1]), 1e3, dtype=rows[0].dtype)  # padding: garbage
    for r, row in enumerate(rows):
        features[r, :row.shape[0]] = row
    tokens = tokenpress.TokenState.from_dense(features, [(1, 1, row.shape[0]) for row in rows])
    stage = DivPrune(DivPruneConfig(keep_ratio=keep_ratio, chunk=chunk))
    return stage.post_encoder(tokens=tokens, context=None)


# --- (a) the pure algorithm picks what the released steps pick, in the same order ---------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_picks_and_their_order_are_the_released_codes(seed):
    n = 7 + 5 * seed  # 7 to 32 tokens, every k up to n
    tokens = synthetic(n, seed)
    order = farthest_points(unit_tokens(tokens.unsqueeze(0)), torch.ones(1, n, dtype=torch.bool), n, chunk=4)[0]
    assert order.tolist() == reference_picks(tokens, n)
    for kept in range(1, n + 1):
        mask = select_mask(tokens.unsqueeze(0), torch.ones(1, n, dtype=torch.bool), torch.tensor([kept]), kept)[0]
        assert torch.nonzero(mask).flatten().tolist() == sorted(reference_picks(tokens, kept))


def test_the_first_pick_is_the_token_whose_nearest_other_token_is_farthest():
    tokens = synthetic(20, 3)
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    nearest = nearest_other_distance(unit_tokens(tokens.unsqueeze(0)), torch.ones(1, 20, dtype=torch.bool), chunk=3)
    for j in range(20):
        others = [float(1 - unit[i] @ unit[j]) for i in range(20) if i != j]
        assert float(nearest[0, j]) == pytest.approx(min(others), abs=1e-12)
    assert int(nearest[0].argmax()) == reference_picks(tokens, 1)[0]


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 64])
def test_the_chunk_changes_nothing(chunk):
    tokens = synthetic(37, 11, dtype=torch.float32)
    valid = torch.ones(1, 37, dtype=torch.bool)
    expected = farthest_points(unit_tokens(tokens.unsqueeze(0)), valid, 37, chunk=37)
    assert torch.equal(farthest_points(unit_tokens(tokens.unsqueeze(0)), valid, 37, chunk=chunk), expected)


# --- the fp16 re-pick pitfall: picked tokens are masked ------------------------------------------------


def test_a_picked_token_is_never_picked_again():
    """Three directions, three copies each, and six picks: once the three directions are in, every token
    is at distance 0 from a picked one, the picked ones included (their self-distance). The released
    steps then take the first maximum - slot 0, already picked - again and again (fp16 rounding of the
    self-distance does the same on near-duplicates); the plugin picks six distinct tokens."""
    directions = torch.eye(3, 5, dtype=torch.float64)
    tokens = directions.repeat_interleave(3, dim=0)  # slots 0-2, 3-5, 6-8: one direction each
    released = reference_picks(tokens, 6)
    assert len(set(released)) < 6  # the released code's duplicate indices
    for dtype in (torch.float64, torch.float16):
        mask = select_mask(tokens.to(dtype).unsqueeze(0), torch.ones(1, 9, dtype=torch.bool), torch.tensor([6]), 6)
        assert int(mask.sum()) == 6
        kept = torch.nonzero(mask[0]).flatten().tolist()
        assert {slot // 3 for slot in kept} == {0, 1, 2}  # every direction, then copies (lower slots first)
        assert set(released) <= set(kept)


def test_half_precision_tokens_are_selected_in_float32():
    tokens = synthetic(40, 5, dtype=torch.float16)
    valid = torch.ones(1, 40, dtype=torch.bool)
    half = select_mask(tokens.unsqueeze(0), valid, torch.tensor([10]), 10)
    single = select_mask(tokens.float().unsqueeze(0), valid, torch.tensor([10]), 10)
    assert torch.equal(half, single)


# --- batches: padding and holes never picked, each row as alone --------------------------------------


def test_a_padded_batch_selects_in_each_row_what_that_row_selects_alone():
    lengths, width, slots = [12, 7, 10], 16, 12
    rows = [synthetic(n, 20 + r, width) for r, n in enumerate(lengths)]
    tokens = torch.randn(3, slots, width, dtype=torch.float64) * 50  # padding holds large garbage
    valid = torch.zeros(3, slots, dtype=torch.bool)
    for r, (features, n) in enumerate(zip(rows, lengths, strict=True)):
        tokens[r, :n], valid[r, :n] = features, True
    valid[2, 3] = False  # an already-dropped slot inside row 2 (its real tokens are then 9)
    counts = [5, 7, 4]  # row 1 keeps all its tokens
    mask = select_mask(tokens, valid, torch.tensor(counts), max(counts), chunk=5)
    assert mask.sum(-1).tolist() == counts
    assert not (mask & ~valid).any()
    for r in range(3):
        real = torch.nonzero(valid[r]).flatten()
        expected = real[sorted(reference_picks(tokens[r, real], counts[r]))]
        assert torch.nonzero(mask[r]).flatten().tolist() == expected.tolist()


def test_the_hook_keeps_round_keep_ratio_of_every_row_in_raster_order():
    rows = [synthetic(n, 40 + n) for n in (36, 20, 36, 9)]
    out = run_rows(rows, 0.25, chunk=7)
    assert out.counts().tolist() == [9, 5, 9, 2]
    for r, row in enumerate(rows):
        picks = sorted(reference_picks(row, out.counts_on_host()[r]))
        count = out.counts_on_host()[r]
        assert out.grid_index[r, :count].tolist() == picks
        assert torch.equal(out.embeddings[r, :count], row[picks])


def test_identity_returns_the_tokens_unchanged():
    tokens = tokenpress.TokenState.from_dense(torch.randn(2, 36, 8), grid=(1, 6, 6))
    stage = DivPrune(DivPruneConfig(keep_ratio=1.0))
    assert stage.post_encoder(tokens=tokens, context=None) is tokens
    assert stage.projector(tokens=tokens, context=None) is tokens  # nothing to drop: not even projected here


def test_defaults_are_the_released_setting():
    config = DivPruneConfig()
    assert config.keep_ratio == 0.098 and DivPrune.default_point() == "projector"
    assert DivPrune(config).promised_count(torch.tensor([576, 2880, 10])).tolist() == [56, 282, 1]
    assert DivPrune.params_for_keep(0.111) == {"keep_ratio": 0.111}
    for bad in ({"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"chunk": 0}):
        with pytest.raises(ValueError):
            DivPruneConfig(**bad)


# --- cost: FLOPs as torch counts them, memory linear in the tokens ------------------------------------


@pytest.mark.parametrize(("tokens", "kept"), [(36, 9), (36, 1), (20, 19), (64, 16), (20, 20)])
def test_declared_flops_equal_the_counter(tokens, kept):
    features = synthetic(tokens, 7, width=24)
    with FlopCounterMode(display=False) as counter:
        run_rows([features], kept / tokens)
    assert compat.counted_flops(counter) == selection_flops(tokens, kept, 24)
    for point, space, width in (("post_encoder", "encoder", 24), ("projector", "encoder", 40)):
        shape = StageShape(tokens, kept, encoder_width=24, llm_width=40, projector_hidden=None, point=point,
                           space=space)
        assert DivPrune(DivPruneConfig(keep_ratio=kept / tokens)).stage_flops(shape) == \
            selection_flops(tokens, kept, width)


def test_the_first_pick_never_holds_an_n_by_n_matrix():
    """The nearest-neighbour pass holds chunk x N distances at a time: its peak float memory at N = 512
    is a small fraction of one N x N float32 matrix, and the whole selection stays linear in N."""
    n, chunk = 512, 16
    tokens = synthetic(n, 1, width=8, dtype=torch.float32).unsqueeze(0)
    with FloatAllocationTracker() as tracker:
        select_mask(tokens, torch.ones(1, n, dtype=torch.bool), torch.tensor([64]), 64, chunk=chunk)
    assert tracker.float_bytes < n * n * 4 / 8, tracker.largest


# --- through the stage on a tiny model of every family, at both points --------------------------------


class Observed:
    """Observer: the token state each stage of ``method`` receives and returns."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.calls: list[tuple[tokenpress.TokenState, tokenpress.TokenState]] = []

    @tokenpress.hookimpl(wrapper=True)
    def tokenpress_run_stage(self, method, payload):
        result = yield
        if method.name == self.method:
            self.calls.append((payload, result))
        return result


def observed(model, batch, method: str, stage: dict):
    with observing(Observed(method)) as seen, tokenpress.compress(model, {"name": "t", "stages": [stage]}) as handle:
        model(**batch)
        records = handle.report().records
    (call,) = seen.calls
    return call, records


@pytest.mark.parametrize("inputs", ["padded", "mixed"])
@pytest.mark.parametrize("at", ["projector", "post_encoder"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_the_stage_on_every_family_keeps_what_the_reference_keeps(family, at, inputs):
    """Float64 model, a left-padded batch of three (or three images of different sizes, where the family
    takes them): each image row keeps its promise, and exactly the cells and embeddings the reference
    picks from the tokens the model gives at that point - its encoder's features at ``post_encoder``, its
    projector's output at ``projector`` (observed, independently of the stage, as the tokens an identity
    stage receives at ``query_conditioned``)."""
    model = tiny_model(family, dtype=torch.float64)
    spec = FAMILIES[family]
    if inputs == "mixed" and spec.mixed_batch is None:
        pytest.skip(f"{family} takes one image size")
    made = spec.mixed_batch(model, prompts(3)) if inputs == "mixed" else spec.batch(model, prompts(3), "left", 0)
    batch = {key: value.double() if value.is_floating_point() else value for key, value in made.items()}
    (received, kept), records = observed(model, batch, "divprune",
                                         {"method": "divprune", "at": at, "params": {"keep_ratio": 0.3}})
    if at == "projector":
        (given, _), _ = observed(model, batch, "random", {"method": "random", "at": "query_conditioned",
                                                          "params": {"keep_ratio": 1.0}})
        assert given.space == "llm" and kept.space == "llm"
    else:
        given = received
        assert kept.space == "encoder"
    promised = DivPrune(DivPruneConfig(keep_ratio=0.3)).promised_count(torch.tensor(received.counts_on_host()))
    # what the promise keeps of the tokens given (fewer only where the projector resizes a grid: LLaVA-OneVision)
    counts = [min(keep, count) for keep, count in zip(promised.tolist(), given.counts_on_host(), strict=True)]
    assert kept.counts_on_host() == counts
    assert sum(records[0].tokens_out) == sum(counts)
    assert any(k < n for k, n in zip(counts, given.counts_on_host(), strict=True))
    for row in range(given.num_images):
        real = torch.nonzero(given.valid[row]).flatten()
        picks = real[sorted(reference_picks(given.embeddings[row, real], counts[row]))]
        assert kept.grid_index[row, :counts[row]].tolist() == given.grid_index[row, picks].tolist()
        torch.testing.assert_close(kept.embeddings[row, :counts[row]], given.embeddings[row, picks],
                                   rtol=0, atol=0)
