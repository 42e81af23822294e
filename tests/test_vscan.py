"""VScan against an independent reference of the released code's steps, written as plain loops: the local scan
(the released LLaVA code's top-k of every window, or the released Qwen code's quota walk where the windows do
not divide the count), the global scan (the top of the rest, the local picks zeroed), and the merge (each
other token to its most cosine-similar kept one, means with the kept token) - on fixed tensors, through a tiny
model of every family (fed the stage's own signals and projected patches), and on LLaVA-1.5 from the encoder's
own attention weights; the decoder stage against the top-k of the layer's own attention."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_pyramiddrop import DecoderCalls, attention_row, check_top
from torch.utils.flop_counter import FlopCounterMode

import tokenpress
from tokenpress.core import flops
from tokenpress.core.errors import StackError
from tokenpress.core.hookspecs import hookimpl
from tokenpress.core.tokens import TokenState
from tokenpress.measure.profiling import observing
from tokenpress.runtime import compat
from tokenpress.testing import MethodContract, llava_batch, sample_prompts
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.vscan import scan
from tokenpress_plugins.vscan.method import VScan, VScanConfig
from tokenpress_plugins.vscan.scan import local_scan, window_count, window_ids, window_rank

#: The published budgets as shares (96 of 576 into the LLM, 32 of those from the middle layer).
PROJECTOR_SHARE, DECODER_SHARE = 0.167, 0.333


# --- the released steps, one image and one patch at a time --------------------------------------------------


def windows_of(height: int, width: int, window: int) -> tuple[list[int], int]:
    """Each patch's window (raster order of whole windows, edge cells in the last one) and the window count."""
    rows, cols = max(height // window, 1), max(width // window, 1)
    return [min(p // width // window, rows - 1) * cols + min(p % width // window, cols - 1)
            for p in range(height * width)], rows * cols


def best_first(scores: Any, among: Any) -> list[int]:
    return sorted(among, key=lambda p: (-float(scores[p]), p))


def reference_scan(local_attn: torch.Tensor, global_attn: torch.Tensor, height: int, width: int, window: int,
                   keep: int, walk: bool | None = None) -> tuple[list[int], list[int]]:
    """(local picks, global picks) of one image of height x width patches keeping ``keep``: int(keep * 0.5)
    local - the top int(keep/2) / W of every window (the released LLaVA code) when the W windows divide it,
    else the released Qwen code's walk (best patch first, each window up to ceil(int(keep/2) / W)) - then the
    top keep - int(keep/2) of the global scores with the local picks zeroed."""
    patches = height * width
    local_count = int(keep * 0.5)
    window_of, windows = windows_of(height, width, window)
    if walk is None:
        walk = local_count % windows != 0
    local: set[int] = set()
    if not walk:
        for w in range(windows):
            local |= set(best_first(local_attn, [p for p in range(patches) if window_of[p] == w])[
                :local_count // windows])
    else:
        quota, taken = -(-local_count // windows), [0] * windows
        for p in best_first(local_attn, range(patches)):
            if len(local) == local_count:
                break
            if taken[window_of[p]] < quota:
                local.add(p)
                taken[window_of[p]] += 1
    zeroed = [0.0 if p in local else float(global_attn[p]) for p in range(patches)]
    global_picks = set(best_first(zeroed, range(patches))[:keep - local_count])
    assert not global_picks & local
    return sorted(local), sorted(global_picks)


def reference_merge(projected: torch.Tensor, kept: list[int]) -> tuple[dict[int, int], list[list[float]]]:
    """Each patch not kept -> its most cosine-similar kept patch (ties: the first kept), and every patch's
    similarities to the kept ones (float64)."""
    unit = projected.double() / projected.double().norm(dim=-1, keepdim=True)
    similarities = [[float(unit[p] @ unit[s]) for s in kept] for p in range(projected.shape[0])]
    chosen = {p: kept[row.index(max(row))] for p, row in enumerate(similarities) if p not in kept}
    return chosen, similarities


def our_tokens(state: TokenState, row: int) -> list[tuple[list[int], torch.Tensor]]:
    """Row ``row``'s tokens as (patches they stand for, embedding), in slot order."""
    source = state.source[row]
    return [(torch.nonzero(source[slot]).flatten().tolist(), state.embeddings[row, slot])
            for slot in range(int(state.counts()[row]))]


def check_row(state: TokenState, row: int, local_attn: torch.Tensor, global_attn: torch.Tensor,
              projected: torch.Tensor, grid: tuple[int, int], window: int, keep: int, exact: bool = True) -> None:
    """Row ``row`` of the stage's output against the reference: the kept patches (one token each, in their
    raster order), every other patch merged into its most similar kept one (``exact``: the very one; else
    one within float noise of the best), each token the mean of its patches' projections, at its first
    patch's cell, its size its patch count."""
    height, width = grid
    local, global_picks = reference_scan(local_attn, global_attn, height, width, window, keep)
    kept = sorted(local + global_picks)
    chosen, similarities = reference_merge(projected, kept)
    tokens = our_tokens(state, row)
    assert len(tokens) == keep == state.known_counts[row]
    groups = {}
    for slot, (patches, _) in enumerate(tokens):
        anchors = [p for p in patches if p in kept]
        assert len(anchors) == 1, f"token {slot} stands for {patches}, kept patches {anchors}"
        groups[anchors[0]] = patches
    assert list(groups) == kept  # one token per kept patch, in raster order
    for anchor, patches in groups.items():
        for p in patches:
            if p == anchor:
                continue
            if exact:
                assert chosen[p] == anchor, f"patch {p} joined {anchor}, the reference says {chosen[p]}"
            else:
                best = max(similarities[p])
                assert similarities[p][kept.index(anchor)] >= best - 1e-5, (p, anchor, chosen[p])
    assert sorted(p for patches in groups.values() for p in patches) == list(range(height * width))
    for slot, (patches, embedding) in enumerate(tokens):
        expected = projected[patches].double().mean(0)
        torch.testing.assert_close(embedding.double(), expected, rtol=1e-5, atol=1e-6)
        assert int(state.grid_index[row, slot]) == min(patches)
        assert float(state.size[row, slot]) == len(patches)


# --- the pure steps on fixed tensors ---------------------------------------------------------------------


def synthetic(height: int, width: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, ...]:
    """Shallow- and feature-layer CLS attention (float32, as the signals are) and features of one image."""
    generator = torch.Generator().manual_seed(seed)
    patches = height * width
    local_attn = torch.softmax(torch.randn(patches, generator=generator), 0)
    global_attn = torch.softmax(torch.randn(patches, generator=generator) * 2, 0)
    return local_attn, global_attn, torch.randn(patches, dim, generator=generator, dtype=torch.float64)


def run_stage(params: dict, rows: list[tuple[torch.Tensor, ...]], grids: list[tuple[int, int]],
              weight: torch.Tensor) -> tuple[TokenState, torch.Tensor]:
    """The stage's hook on the rows as one padded batch of encoder states, a linear map as the projector;
    returns the output state and the projected rows."""
    method = VScan(VScanConfig(**params))
    width = max(h * w for h, w in grids)
    features = torch.zeros(len(rows), width, rows[0][2].shape[1], dtype=torch.float64)
    local_attn = torch.zeros(len(rows), width)
    global_attn = torch.zeros(len(rows), width)
    for r, (local, glob, feature) in enumerate(rows):
        n = feature.shape[0]
        features[r, :n], local_attn[r, :n], global_attn[r, :n] = feature, local, glob
    tokens = TokenState.from_dense(features, [(1, h, w) for h, w in grids])
    local_request, global_request = method._requests()
    context = SimpleNamespace(signals={local_request: local_attn, global_request: global_attn},
                              project=lambda state: state.replace(state.embeddings @ weight, space="llm"),
                              stage=SimpleNamespace(label=lambda: "0:vscan(projector)"))
    return method.projector(tokens, context), features @ weight


GRIDS = [(24, 24), (7, 9), (5, 4)]
SETTINGS = [
    {"keep_ratio": 96 / 576},  # the published 96 of 576: 48 local, 3 in each of 16 windows (the LLaVA path)
    {"keep_ratio": 100 / 576},  # 50 local in 16 windows: the quota walk, 4 at most per window
    {"keep_ratio": 0.3, "window": 3},  # 7 x 9 by 3: 2 x 3 windows, the last row of cells folded in
    {"keep_ratio": 0.05, "window": 2},
    {"keep_ratio": 1 / 576},  # one token: no local pick, one global
    {"keep_ratio": 0.5, "window": 4, "local_layer": 3, "global_layer": -1},
]


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: ",".join(f"{k}={v:.3g}" for k, v in p.items()))
def test_the_same_tokens_as_the_reference_in_a_padded_batch(params):
    """Three images of different grids in one batch, each against the reference run alone."""
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = [synthetic(h, w, seed) for seed, (h, w) in enumerate(GRIDS)]
    state, projected = run_stage(params, rows, GRIDS, weight)
    method = VScan(VScanConfig(**params))
    window = params.get("window", 6)
    for r, ((local_attn, global_attn, _), grid) in enumerate(zip(rows, GRIDS, strict=True)):
        patches = grid[0] * grid[1]
        keep = int(method.promised_count(torch.tensor([patches]))[0])
        check_row(state, r, local_attn, global_attn, projected[r, :patches], grid, window, keep)
    assert state.space == "llm"


def test_the_published_budget_is_the_released_llava_path():
    """96 of 576 at 0.167: 48 local picks, exactly 3 in each of the 16 windows of 6 x 6 (the released code's
    per-window top 3), and 48 global picks."""
    local_attn, global_attn, features = synthetic(24, 24, 3)
    keep = int(VScan(VScanConfig(keep_ratio=PROJECTOR_SHARE)).promised_count(torch.tensor([576]))[0])
    assert keep == 96
    local, global_picks = reference_scan(local_attn, global_attn, 24, 24, 6, keep, walk=False)
    assert (local, global_picks) == reference_scan(local_attn, global_attn, 24, 24, 6, keep, walk=True)
    window_of, _ = windows_of(24, 24, 6)
    assert sorted(window_of[p] for p in local) == sorted(list(range(16)) * 3) and len(global_picks) == 48
    weight = torch.eye(8, dtype=torch.float64)
    state, projected = run_stage({"keep_ratio": PROJECTOR_SHARE}, [(local_attn, global_attn, features)],
                                 [(24, 24)], weight)
    check_row(state, 0, local_attn, global_attn, projected[0], (24, 24), 6, 96)


def test_the_released_llava_path_keeps_fewer_where_the_windows_do_not_divide():
    """K = 100: the released LLaVA code takes 50 // 16 = 3 per window, 48 + 50 = 98 tokens; the walk takes 50
    local (at most 4 per window), 100 in all - the stage promises and keeps 100."""
    local_attn, global_attn, _ = synthetic(24, 24, 4)
    per_window = reference_scan(local_attn, global_attn, 24, 24, 6, 100, walk=False)
    walked = reference_scan(local_attn, global_attn, 24, 24, 6, 100, walk=True)
    assert (len(per_window[0]), len(walked[0])) == (48, 50)
    window_of, _ = windows_of(24, 24, 6)
    assert max(sum(window_of[p] == w for p in walked[0]) for w in range(16)) <= 4  # ceil(50 / 16) per window
    method = VScan(VScanConfig(keep_ratio=100 / 576))
    assert method.promised_count(torch.tensor([576])).tolist() == [100]


def test_window_layout_and_ranks_equal_plain_loops():
    generator = torch.Generator().manual_seed(5)
    grids = [(1, 24, 24), (1, 7, 9), (1, 5, 4), (1, 13, 6)]
    width = max(t * h * w for t, h, w in grids)
    for window in (1, 2, 3, 4, 6, 10):
        tokens = TokenState.from_dense(torch.zeros(len(grids), width, 1), grids)
        ids = window_ids(tokens.grid_index, tokens.grid, window)
        counts = [window_count(grid, window) for grid in grids]
        scores = torch.rand(len(grids), width, generator=generator)
        rank = window_rank(scores, tokens.valid, ids, max(counts))
        for r, (_, h, w) in enumerate(grids):
            window_of, number = windows_of(h, w, window)
            assert ids[r, :h * w].tolist() == window_of and counts[r] == number
            for p in range(h * w):
                same = [q for q in range(h * w) if window_of[q] == window_of[p]]
                assert int(rank[r, p]) == best_first(scores[r], same).index(p)
    assert windows_of(24, 24, 6)[1] == 16 and windows_of(7, 9, 3)[1] == 6 and windows_of(5, 4, 6)[1] == 1


def test_local_scan_takes_exactly_its_count_on_any_grid():
    generator = torch.Generator().manual_seed(6)
    for h, w, window in ((24, 24, 6), (7, 9, 3), (13, 6, 4), (5, 4, 6), (3, 3, 1)):
        tokens = TokenState.from_dense(torch.zeros(1, h * w, 1), (1, h, w))
        ids = window_ids(tokens.grid_index, tokens.grid, window)
        scores = torch.rand(1, h * w, generator=generator)
        windows = window_count((1, h, w), window)
        for count in range(0, h * w // 2 + 1):
            picked = local_scan(scores, tokens.valid, ids, [windows], [count])
            expected, _ = reference_scan(scores[0], scores[0], h, w, window, 2 * count, walk=True)
            assert torch.nonzero(picked[0]).flatten().tolist() == expected


@pytest.mark.parametrize("chunk", [scan.CHUNK, 5])
def test_the_merge_in_chunks_equals_the_reference(chunk, monkeypatch):
    """The nearest kept token of every other token, searched a chunk at a time, on rows of different lengths."""
    monkeypatch.setattr(scan, "CHUNK", chunk)
    generator = torch.Generator().manual_seed(8)
    embeddings = torch.randn(2, 40, 6, generator=generator, dtype=torch.float64)
    valid = torch.arange(40).unsqueeze(0) < torch.tensor([[40], [27]])
    kept = valid & (torch.rand(2, 40, generator=generator) < 0.3)
    counts = kept.sum(-1).tolist()
    choice = scan.nearest_kept(embeddings, kept, valid & ~kept, max(counts), max(40 - counts[0], 27 - counts[1]))
    for r, n in enumerate((40, 27)):
        kept_patches = torch.nonzero(kept[r]).flatten().tolist()
        chosen, _ = reference_merge(embeddings[r, :n], kept_patches)
        assert {p: kept_patches[c] for p, c in enumerate(choice[r, :n].tolist()) if c >= 0} == chosen
        assert (choice[r, n:] == -1).all() and (choice[r][kept[r]] == -1).all()


def test_keeping_everything_only_projects():
    local_attn, global_attn, features = synthetic(7, 9, 9)
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state, projected = run_stage({"keep_ratio": 1.0}, [(local_attn, global_attn, features)], [(7, 9)], weight)
    assert torch.equal(state.embeddings, projected) and state.grid_index[0].tolist() == list(range(63))
    assert VScan(VScanConfig(keep_ratio=1.0)).required_signals() == []


# --- stage 1 through a tiny model of every family ----------------------------------------------------------


SEEN: list[tuple[TokenState, dict, torch.Tensor, TokenState]] = []


def every_projection(tokens: TokenState, context: Any) -> torch.Tensor:
    """(I, N, D): each token's projection, as the model's projector maps it on its own: the even and the odd
    slots projected as two selections (a row projected whole may be re-gridded by its family: LLaVA-OneVision's
    anyres_max resize), put back in their slots."""
    slots = torch.arange(tokens.num_slots).expand_as(tokens.valid)
    out = None
    for mask in (tokens.valid & (slots % 2 == 0), tokens.valid & (slots % 2 == 1)):
        part = context.project(tokens.keep(mask))
        for row in range(tokens.num_images):
            picked = torch.nonzero(mask[row]).flatten()
            if out is None:
                out = part.embeddings.new_zeros(*tokens.valid.shape, part.embeddings.shape[-1])
            out[row, picked] = part.embeddings[row, :picked.numel()]
    return out


class RecordingVScan(VScan):
    """vscan, recording what its projector stage receives (tokens, signals), the projection of every token,
    and what it returns."""

    name = "test-vscan-recording"

    @hookimpl
    def projector(self, tokens: TokenState, context: Any) -> TokenState:
        result = super().projector(tokens, context)
        if self.required_signals():
            SEEN.append((tokens, {request: context.signals[request] for request in self._requests()},
                         every_projection(tokens, context), result))
        return result


STAGE_1 = {"keep_ratio": 0.3, "local_layer": 0, "global_layer": -1, "window": 2}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_stage_one_equals_the_reference_fed_its_own_inputs(family, register_methods):
    """Every image row of a padded batch against the reference fed the row's signals (the class token's, or on
    an encoder without one the received, attention in the two layers) and every patch's projection. A family
    that cannot serve the signals refuses the stage in one sentence, before anything is touched."""
    register_methods(RecordingVScan)
    SEEN.clear()
    model = tiny_model(family)
    batch = FAMILIES[family].batch(model, prompts(3), "left", 0)
    stack = {"name": "r", "stages": [{"method": "test-vscan-recording", "at": "projector", "params": STAGE_1}]}
    try:
        handle = tokenpress.compress(model, stack)
    except tokenpress.UnsupportedModelError as error:
        assert "\n" not in str(error) and "cannot provide the encoder signal" in str(error)
        assert tokenpress.attached_handle(model) is None
        pytest.skip(f"refused, in one sentence: {error}")
    with handle:
        model(**batch)
    (tokens, signals, projected, result), = SEEN
    method = VScan(VScanConfig(**STAGE_1))
    local_request, global_request = method._requests()
    assert not torch.equal(signals[local_request], signals[global_request])  # two layers, two rankings
    for row, ((frames, height, width), patches) in enumerate(zip(tokens.grid_sizes(), tokens.counts_on_host(),
                                                                 strict=True)):
        assert frames == 1 and patches == height * width
        keep = int(method.promised_count(torch.tensor([patches]))[0])
        check_row(result, row, signals[local_request][row, :patches], signals[global_request][row, :patches],
                  projected[row, :patches], (height, width), STAGE_1["window"], keep, exact=False)


class ReturnedStates:
    """Observer: the token state every vscan projector stage returns."""

    def __init__(self) -> None:
        self.states: list[TokenState] = []

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage, method, point, payload, call):
        result = yield
        if stage.method == "vscan" and point == "projector":
            self.states.append(result)
        return result


@torch.no_grad()
def test_stage_one_on_llava_reads_the_released_layers_from_the_encoder():
    """At the published defaults (local layer 5 of CLIP-L's 24, global layer -2, 6 x 6 windows), on a LLaVA-1.5
    whose CLIP has 24 layers and a 12 x 12 grid, keeping 32 (16 local: 4 in each window): the reference reads
    what the released code reads - the encoder's own attention weights (``output_attentions``: the class
    token's row, heads averaged, in layers 5 and 22) and the projector applied to LLaVA's features - and gives
    the same tokens."""
    model = tiny_llava("eager", image_size=96, encoder_layers=24)  # 12 x 12 patches: 2 x 2 windows of 6 x 6
    batch = llava_batch(model, sample_prompts(2))
    stack = {"name": "v", "stages": [{"method": "vscan", "params": {"keep_ratio": 32 / 144}}]}
    with observing(ReturnedStates()) as observer, tokenpress.compress(model, stack):
        model(**batch)
    (state,) = observer.states
    out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    local_attn = out.attentions[5][:, :, 0, 1:].mean(1)
    global_attn = out.attentions[-2][:, :, 0, 1:].mean(1)
    projected = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])
    for image in range(2):
        check_row(state, image, local_attn[image], global_attn[image], projected[image], (12, 12), 6, 32,
                  exact=False)


# --- stage 2 through a tiny model of every family ----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_stage_two_keeps_the_top_of_the_middle_layers_own_attention(family):
    """Before the middle layer, each sample of a padded batch keeps round(n / 3) of its n visual tokens: the top
    of the last prompt token's attention inside that layer, from the layer's own eager attention module."""
    model = tiny_model(family, "eager")
    batch = FAMILIES[family].batch(model, prompts(3), "right", 0)
    stack = {"name": "v", "stages": [{"method": "vscan", "at": "decoder_layer", "params": {"keep_ratio": 0.333}}]}
    with observing(DecoderCalls("vscan")) as recorder, tokenpress.compress(model, stack):
        model(**batch)
    middle = tokenpress.find_adapter(model).num_layers // 2
    assert [layer for layer, _, _ in recorder.calls] == [middle]
    ((layer, sequence, decision),) = recorder.calls
    scores = attention_row(model, layer, sequence)
    for sample in range(sequence.hidden.shape[0]):
        visual = torch.nonzero(sequence.is_visual[sample] & sequence.valid[sample]).flatten().tolist()
        chosen = set(torch.nonzero(decision.mask[sample] & sequence.is_visual[sample]
                                   & sequence.valid[sample]).flatten().tolist())
        check_top(scores[sample], visual, chosen, max(1, round(len(visual) * 0.333)), f"{family} sample {sample}")


# --- the two stages together --------------------------------------------------------------------------------


def published(local_layer: int = 0) -> dict:
    return {"name": "vscan", "stages": [
        {"method": "vscan", "at": "projector", "params": {"keep_ratio": PROJECTOR_SHARE, "local_layer": local_layer}},
        {"method": "vscan", "at": "decoder_layer", "params": {"keep_ratio": DECODER_SHARE}}]}


def test_the_published_budgets_as_shares():
    first, second = VScan(VScanConfig(keep_ratio=PROJECTOR_SHARE)), VScan(VScanConfig(keep_ratio=DECODER_SHARE))
    assert first.promised_count(torch.tensor([576])).tolist() == [96]
    assert second.promised_count(torch.tensor([96])).tolist() == [32]
    assert VScan.default_layers(VScanConfig(keep_ratio=DECODER_SHARE), 32) == (16,)  # LLaVA-1.5
    assert VScan.default_layers(VScanConfig(keep_ratio=DECODER_SHARE), 28) == (14,)  # Qwen2.5-VL-7B
    assert VScan.params_for_keep(0.25) == {"keep_ratio": 0.25}
    example = tokenpress.load_stack(Path(__file__).resolve().parents[1] / "stacks" / "vscan.yaml")
    assert [(s.point, s.config.keep_ratio) for s in example.stages] == [("projector", PROJECTOR_SHARE),
                                                                         ("decoder_layer", DECODER_SHARE)]


@torch.no_grad()
def test_the_stack_on_llava_keeps_its_budgets_and_generates_alike_with_and_without_cache():
    model = tiny_llava("sdpa")
    batch = llava_batch(model, sample_prompts(3), "left")
    with tokenpress.compress(model, published()) as handle:
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        records = handle.report().records
    assert [(r.stage, r.tokens_in, r.tokens_out) for r in records] == [
        ("0:vscan(projector)", [36] * 3, [6] * 3), ("1:vscan(decoder_layer@2)", [6] * 3, [2] * 3)]
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_declared_flops_of_the_stack_match_the_counter(family):
    """The merge's similarity (stage 1), the two signals (the family's cost model) and the scorer row (stage 2)
    against torch's FLOP counter (a family that works on padding slots within its tolerance)."""
    model = tiny_model(family, "eager")
    if getattr(model.config, "model_type", None) not in flops.SIMULATED_FAMILIES:
        pytest.skip(f"the FLOPs model does not cover {family}")
    batch = FAMILIES[family].batch(model, prompts(1), "left", 0)
    try:
        handle = tokenpress.compress(model, published())
    except tokenpress.UnsupportedModelError as error:
        pytest.skip(f"refused: {error}")
    with handle:
        with FlopCounterMode(display=False) as counter:
            model(**batch, logits_to_keep=1, use_cache=False)
        declared = flops.measured_from_handle(handle, batch)
    counted = compat.counted_flops(counter)
    assert declared.stages > 0 and declared.scoring > 0
    tolerance = FAMILIES[family].flops_tolerance
    if tolerance == 0:
        assert declared.total == pytest.approx(counted, rel=1e-9)
    else:  # each of the two stages may count padding slots (LLaVA-NeXT's padded rows through the projector)
        assert counted * (1 - 2 * tolerance) <= declared.total <= counted * (1 + 1e-9)


def test_a_stage_one_after_a_selection_is_refused_in_one_sentence():
    model = tiny_llava("sdpa")
    stack = {"name": "v", "stages": [{"method": "random", "params": {"keep_ratio": 0.5}},
                                     {"method": "vscan", "at": "projector", "params": {"keep_ratio": 0.25,
                                                                                      "local_layer": 0}}]}
    with pytest.raises(StackError, match=r"stages\[1\] \(vscan\) cannot run after stages\[0\] \(random\)") as error:
        tokenpress.compress(model, stack)
    assert "\n" not in str(error.value) and tokenpress.attached_handle(model) is None


@pytest.mark.parametrize(("encoder_layers", "local"), [(24, 5), (32, 7), (8, 2), (4, 1), (2, 0), (None, 5)])
def test_the_default_local_layer_is_the_released_ones_relative_depth(encoder_layers, local):
    """5 of CLIP-L's 24 is 7 of Qwen2.5-VL's 32 (its released scripts' setting) and 1 of a 4-layer encoder;
    with the depth unknown, the released 5. A layer given is kept as given."""
    stack = tokenpress.load_stack({"name": "v", "stages": [{"method": "vscan", "params": {"keep_ratio": 0.25}}]})
    assert stack.resolved(4, None, encoder_layers).stages[0].config.local_layer == local
    given = tokenpress.load_stack({"name": "v", "stages": [{"method": "vscan", "params": {"keep_ratio": 0.25,
                                                                                         "local_layer": 3}}]})
    assert given.resolved(4, None, encoder_layers).stages[0].config.local_layer == 3


def test_a_local_layer_deeper_than_the_encoder_is_refused_in_one_sentence():
    model = tiny_llava("sdpa")
    stack = {"name": "v", "stages": [{"method": "vscan", "params": {"keep_ratio": 0.25, "local_layer": 5}}]}
    with pytest.raises(tokenpress.UnsupportedModelError, match="layer 5 is out of range for a 2-layer") as error:
        tokenpress.compress(model, stack)
    assert "\n" not in str(error.value) and tokenpress.attached_handle(model) is None


def test_parameters_are_checked():
    for params, message in (({}, "keep_ratio: required field is missing"), ({"keep_ratio": 0}, "greater than 0"),
                            ({"keep_ratio": 0.5, "window": 0}, "greater than or equal to 1"),
                            ({"keep_ratio": True}, "boolean")):
        with pytest.raises(StackError, match=message):
            tokenpress.load_stack({"name": "v", "stages": [{"method": "vscan", "params": params}]})


# --- the contract kit, beyond the shared suite's default settings ------------------------------------------


class TestVScanWindows(MethodContract):
    """Stage 1 with several windows on the test grids and two different encoder layers."""

    method = "vscan"
    params = STAGE_1


class TestVScanStageTwo(MethodContract):
    """Stage 2 at the published share, at its default layer (the middle one). (Stage 2 after stage 1 is
    checked above: the kit observes a method's calls by name, and both stages are vscan's.)"""

    method = "vscan"
    point = "decoder_layer"
    params = {"keep_ratio": DECODER_SHARE}
