"""SparseVLM against an independent reference: the published algorithm written with the model's own
modules (eager attention, its rotary embedding, explicit positions), the density-peaks clustering as
plain loops, and the counts and rater rule as plain Python."""

from __future__ import annotations

import math
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
from tokenpress.testing import Prompt, llava_batch, sample_prompts, select_rows
from tokenpress.testing.models import tiny_llava
from tokenpress_plugins.sparsevlm.cluster import density_peaks
from tokenpress_plugins.sparsevlm.method import SparseVLM, SparseVLMConfig
from tokenpress_plugins.sparsevlm.select import (
    choose_raters,
    cluster_count,
    rank_keep_counts,
    recycled_count,
    recycled_count_on_host,
    relation_rank,
)

LAYERS = 8  # default layers on 8: after layers 1, 2 and 4 -> stages before 2, 3 and 5


def stack(**params: Any) -> dict:
    return {"name": "sparsevlm", "stages": [{"method": "sparsevlm", "params": params}]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", num_layers=LAYERS)


# --- the clustering, against plain loops -------------------------------------------------------------


def plain_density_peaks(points: list[list[float]], clusters: int) -> list[int]:
    """The reference's cluster_and_merge steps, one pair and one token at a time, ties broken by position."""
    count, channels = len(points), len(points[0])
    distance = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(points[i], points[j], strict=True))) / math.sqrt(channels)
                 for j in range(count)] for i in range(count)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in distance]
    largest = max(max(row) for row in distance)

    def denser(j: int, i: int) -> bool:
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    peak = [min([distance[i][j] for j in range(count) if denser(j, i)], default=largest) for i in range(count)]
    score = [peak[i] * density[i] for i in range(count)]
    centres = sorted(range(count), key=lambda i: -score[i])[:clusters]  # stable: the earlier first on ties
    assignment = []
    for j in range(count):
        nearest = min(range(clusters), key=lambda c: (distance[centres[c]][j], c))
        assignment.append(nearest)
    for index, centre in enumerate(centres):
        assignment[centre] = index
    return assignment


def batched_clusters(rows: list[torch.Tensor], clusters: list[int]) -> list[list[int]]:
    """:func:`density_peaks` on the rows padded into one batch, each row's assignment unpadded."""
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        tokens[index, :len(row)] = row
        valid[index, :len(row)] = True
    out = density_peaks(tokens, valid, torch.tensor(clusters), max(clusters))
    assert (out[~valid] == -1).all()
    return [out[index, :len(row)].tolist() for index, row in enumerate(rows)]


def test_density_peaks_equals_the_plain_steps_on_random_rows():
    generator = torch.Generator().manual_seed(0)
    rows, clusters = [], []
    for size in (1, 2, 5, 11, 23, 40):
        rows.append(torch.randn(size, 6, generator=generator, dtype=torch.float64) * 3)
        clusters.append(size // 10 + 1 if size > 3 else size)  # the reference's count, and k = M (every token)
    expected = [plain_density_peaks(row.tolist(), count) for row, count in zip(rows, clusters, strict=True)]
    assert batched_clusters(rows, clusters) == expected  # batched and padded: each row as alone
    for row, count, want in zip(rows, clusters, expected, strict=True):
        assert batched_clusters([row], [count]) == [want]
        assert sorted(set(want)) == list(range(count))  # every cluster holds at least its centre


def test_density_peaks_breaks_ties_by_position_as_documented():
    # points on a line (as 4-wide vectors: every distance exact), duplicates and mirror images give
    # equal densities, scores and distances; the earlier token wins each tie
    values = [0, 0, 1, 3, 3, 4, 7, 7, 8, 10, 10, 11]
    row = torch.tensor(values, dtype=torch.float64).unsqueeze(-1).expand(-1, 4).contiguous()
    for clusters in (1, 2, 3, 4):
        expected = plain_density_peaks(row.tolist(), clusters)
        assert batched_clusters([row], [clusters]) == [expected]
        assert batched_clusters([row.float()], [clusters]) == [expected]
    groups = batched_clusters([row], [4])[0]
    assert [set(groups[i:i + 3]) for i in range(0, 12, 3)] == [{groups[i]} for i in range(0, 12, 3)]  # the triplets
    # a mirror-symmetric row: mirrored tokens tie on density and score, the earlier one wins
    mirrored = torch.tensor([0, 1, 3, 4, 6, 7], dtype=torch.float64).unsqueeze(-1).expand(-1, 4).contiguous()
    assert batched_clusters([mirrored], [3]) == [plain_density_peaks(mirrored.tolist(), 3)] == [[0, 0, 1, 1, 2, 2]]


# --- counts and raters, against plain Python ------------------------------------------------------


def test_counts_follow_the_reference_arithmetic():
    pruned = torch.arange(0, 700)
    assert recycled_count(pruned).tolist() == [int(n * 0.3) + 1 if n else 0 for n in range(700)]
    assert [recycled_count_on_host(n) for n in range(700)] == recycled_count(pruned).tolist()
    recycled = recycled_count(pruned)
    assert cluster_count(recycled).tolist() == [int(m / 10) + 1 if m else 0 for m in recycled.tolist()]
    rank = torch.tensor([3, 3, 36, 0, 5, 2, 1])
    visual = torch.tensor([36, 36, 36, 36, 36, 3, 1])
    # int(rank * scale + bias), at most N - 1; full rank (and no rater) prunes nothing
    assert rank_keep_counts(rank, visual, 2.5, 0.6).tolist() == [8, 8, 36, 36, 13, 2, 1]
    assert rank_keep_counts(rank, visual, 13.5, 0.0).tolist() == [35, 35, 36, 36, 35, 2, 1]
    assert rank_keep_counts(rank, visual, 0.8, -1.0).tolist() == [1, 1, 36, 36, 3, 0, 1]


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    generator = torch.Generator().manual_seed(1)
    visual = [torch.randn(n, 8, generator=generator) for n in (5, 9)]
    text = [torch.randn(n, 8, generator=generator) for n in (7, 4)]
    after = [[False, False, True, True, True, True, True], [True, True, True, True]]
    expected = []
    for v, t, candidates in zip(visual, text, after, strict=True):
        columns = [i for i, c in enumerate(candidates) if c]
        relevance = torch.softmax(v @ t[columns].T, dim=1).mean(0)
        expected.append([columns[i] for i in range(len(columns)) if relevance[i] > relevance.mean()])
    pad = torch.zeros(2, 9, 8), torch.zeros(2, 7, 8)
    valid = torch.zeros(2, 9, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    for index in range(2):
        pad[0][index, :len(visual[index])] = visual[index]
        pad[1][index, :len(text[index])] = text[index]
        valid[0][index, :len(visual[index])] = True
        valid[1][index, :len(after[index])] = torch.tensor(after[index])
    chosen = choose_raters(pad[0], valid[0], pad[1], valid[1])
    assert [torch.nonzero(row).flatten().tolist() for row in chosen] == expected
    single = torch.zeros(1, 7, dtype=torch.bool)
    single[0, 3] = True  # one candidate: nothing is above the mean, the candidate rates
    assert choose_raters(pad[0][:1], valid[0][:1], pad[1][:1], single).tolist() == single.tolist()


def test_relation_rank_is_the_rank_of_each_samples_own_matrix():
    generator = torch.Generator().manual_seed(2)
    full = torch.rand(3, 10, generator=generator)
    deficient = torch.cat([full[:2], full[:2].sum(0, keepdim=True)])  # rank 2
    wide = torch.rand(4, 6, generator=generator)
    matrices = [full, deficient, wide, torch.zeros(2, 5)]
    padded = torch.zeros(len(matrices), 5, 12)
    for index, matrix in enumerate(matrices):
        padded[index, :matrix.shape[0], :matrix.shape[1]] = matrix
    rows = torch.tensor([m.shape[0] for m in matrices])
    columns = torch.tensor([m.shape[1] for m in matrices])
    expected = [int(torch.linalg.matrix_rank(matrix)) for matrix in matrices]
    assert relation_rank(padded, rows, columns).tolist() == expected == [3, 2, 4, 0]


# --- the published algorithm through a tiny LLaVA-1.5, written with the model's own modules -------------


def reference_sparsevlm(model, batch: dict, rule: dict, locations: list[int]) -> dict:
    """One unpadded sample through the decoder layer by layer with SparseVLM after ``locations``.

    Returns the raters (input columns), per location the kept / recycled clusters / deleted tokens (as
    the input column that stands for each: a merged token is its first member's), and the logits at the
    text columns.
    """
    language_model = model.model.language_model
    ids = batch["input_ids"][0]
    features = model.model.multi_modal_projector(llava_patch_features(model, batch["pixel_values"]))
    hidden = merged_embeddings(model, batch["input_ids"], features[0])
    count = ids.numel()
    identity = list(range(count))  # input column each token stands for
    visual_columns = set(torch.nonzero(ids == model.config.image_token_id).flatten().tolist())
    after = list(range(max(visual_columns) + 1, count))

    # raters, once, from the LLM input embeddings
    embeddings = hidden[0].float()
    relevance = torch.softmax(embeddings[sorted(visual_columns)] @ embeddings[after].T, dim=1).mean(0)
    raters = {after[i] for i in range(len(after)) if relevance[i] > relevance.mean()} or set(after)

    positions = torch.arange(count).unsqueeze(0)
    steps = []
    for index, layer in enumerate(language_model.layers):
        length = hidden.shape[1]
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos_sin = language_model.rotary_emb(hidden, positions)
        _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask)
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
        if index not in locations:
            continue
        probs = weights[0].mean(0)  # (N, N): this layer's attention, averaged over heads
        visual = [i for i, column in enumerate(identity) if column in visual_columns]
        rows = [i for i, column in enumerate(identity) if column in raters]
        matrix = probs[rows][:, visual]  # raters x visual tokens
        relation = matrix.mean(0).tolist()
        if "schedule" in rule:
            keep = min(rule["schedule"][locations.index(index)], len(visual) - 1)
        else:
            rank = int(torch.linalg.matrix_rank(matrix.float()))
            if rank == len(visual):
                steps.append(None)
                continue
            keep = min(int(rank * rule["scale"] + rule["bias"]), len(visual) - 1)
        by_relation = sorted(range(len(visual)), key=lambda i: -relation[i])  # stable: ties to the earlier
        kept = {visual[i] for i in by_relation[:keep]}
        pruned = [visual[i] for i in by_relation[keep:]]  # by relation, descending
        recycled = sorted(pruned[:int(len(pruned) * 0.3) + 1])
        clusters = int(len(recycled) / 10) + 1
        members = hidden[0, recycled]
        assignment = plain_density_peaks(members.double().tolist(), clusters)
        groups = [[recycled[j] for j in range(len(recycled)) if assignment[j] == g] for g in range(clusters)]
        first = {group[0]: group for group in groups}
        order, rows_out = [], []
        for i in range(hidden.shape[1]):
            if identity[i] not in visual_columns or i in kept:
                order.append(i)
                rows_out.append(hidden[0, i])
            elif i in first:  # a cluster's equal-weight mean at its first member's slot and position
                order.append(i)
                rows_out.append(hidden[0, first[i]].mean(0))
        steps.append({"kept": {identity[i] for i in kept},
                      "clusters": {frozenset(identity[i] for i in group) for group in groups},
                      "deleted": {identity[i] for i in pruned if i not in recycled}})
        hidden = torch.stack(rows_out).unsqueeze(0)
        positions = positions[:, order]
        identity = [identity[i] for i in order]
    logits = model.lm_head(language_model.norm(hidden))[0]
    text = [i for i, column in enumerate(identity) if column not in visual_columns]
    return {"raters": raters, "steps": steps, "text_columns": [identity[i] for i in text], "logits": logits[text]}


class Decisions:
    """Records every sparsevlm call: its sequence, its decision and the state after it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, dict]] = []

    @hookimpl(wrapper=True)
    def tokenpress_run_stage(self, stage, method, point, payload, call, layer):
        result = yield
        if stage.method == "sparsevlm":
            self.calls.append((payload.sequence, result, dict(payload.state)))
        return result


def framework_steps(decisions: Decisions, sample: int) -> tuple[set[int], list[dict | None]]:
    """The raters and, per call, the kept / recycled clusters / deleted tokens of one sample, as layer-0
    slots (the input columns of an unpadded sample)."""
    raters = decisions.calls[0][2]["raters@0"][sample]
    steps = []
    for sequence, merge, _ in decisions.calls:
        slots = sequence.slot_id[sample]
        visual = (sequence.is_visual & sequence.valid)[sample]
        group = merge.group[sample]
        if bool((group[visual] == -1).all()):
            steps.append(None)
            continue
        clusters: dict[int, set[int]] = {}
        for slot, value in zip(slots[visual].tolist(), group[visual].tolist(), strict=True):
            if value >= 0:
                clusters.setdefault(value, set()).add(slot)
        steps.append({"kept": set(slots[visual & (group == -1)].tolist()),
                      "clusters": {frozenset(members) for members in clusters.values()},
                      "deleted": set(slots[visual & (group == -2)].tolist())})
    return set(torch.nonzero(raters[:-1]).flatten().tolist()), steps


RULES = {
    "rank": {"scale": 2.5, "bias": 1.0},
    "rank-published-128": {"scale": 9.0, "bias": 6.0},
    "schedule": {"schedule": [20, 12, 6]},
}


@pytest.mark.parametrize("rule", list(RULES))
@torch.no_grad()
def test_equals_the_reference_built_from_the_models_modules(model, rule):
    """Raters, kept / recycled / deleted tokens at every location and the logits, for each sample of a
    left-padded batch against the reference run on that sample alone."""
    params = RULES[rule]
    locations = [layer - 1 for layer in SparseVLM.default_layers(SparseVLMConfig(), LAYERS)]
    assert locations == [1, 2, 4]
    prompts = sample_prompts(3) + [Prompt([1, 9, 8], [40])]  # the last: a single token after the image
    batch = llava_batch(model, prompts, "left")
    with observing(Decisions()) as decisions, tokenpress.compress(model, stack(**params)):
        logits = model(**batch).logits
    assert [type(merge).__name__ for _, merge, _ in decisions.calls] == ["Merge"] * 3
    pruned_somewhere = 0
    for sample in range(len(prompts)):
        alone = select_rows(batch, sample)
        expected = reference_sparsevlm(model, alone, params, locations)
        raters, steps = framework_steps(decisions, sample)
        assert raters == expected["raters"]
        assert steps == expected["steps"], f"sample {sample}"
        pruned_somewhere += sum(step is not None for step in steps)
        real = batch["attention_mask"][sample].bool()
        offset = int((~real).sum())  # left padding: input column c of the sample is batch column offset + c
        columns = [offset + column for column in expected["text_columns"]]
        torch.testing.assert_close(logits[sample, columns], expected["logits"], rtol=1e-5, atol=1e-5)
    assert pruned_somewhere >= 6


@torch.no_grad()
def test_keep_ratio_keeps_its_geometric_share_and_its_promise(model):
    batch = llava_batch(model, sample_prompts(3), "right")
    for params in ({"keep_ratio": 0.25}, {"keep_ratio": 0.5, "recycle": False}, {"schedule": [30, 9, 2]}):
        with tokenpress.compress(model, stack(**params)) as handle:
            model(**batch)
            records = handle.report().records
            method = handle.entries[0].method
        share = params.get("keep_ratio", 1.0) ** (1 / 3)
        for record in records:
            promised = method.promised_count_at(torch.tensor(record.tokens_in), record.layer).tolist()
            assert record.tokens_out == promised
            if "keep_ratio" in params:
                assert method.promised_count(torch.tensor(record.tokens_in)).tolist() == promised
                kept = max(1, round(record.tokens_in[0] * share))
                recycled = int((record.tokens_in[0] - kept) * 0.3) + 1
                extra = recycled // 10 + 1 if params.get("recycle", True) else 0
                assert promised == [kept + extra] * 3
        assert [r.layer for r in records] == [2, 3, 5]
    assert records[-1].tokens_out == [3, 3, 3]  # 2 kept + one cluster of the int(0.3 * 8) + 1 = 3 recycled


@torch.no_grad()
def test_declared_flops_match_the_counter_at_every_layer(model):
    """The scorer's rows, the raters' product (first layer only) and the clustering, for every rule."""
    batch = llava_batch(model, sample_prompts(1))
    for params in ({}, {"scale": 2.0}, {"keep_ratio": 0.3}, {"schedule": [25, 10, 4]}, {"keep_ratio": 0.3,
                                                                                         "recycle": False}):
        with tokenpress.compress(model, stack(**params)) as handle:
            with FlopCounterMode(display=False) as counter:
                model(**batch, logits_to_keep=1, use_cache=False)
            declared = flops.measured_from_handle(handle, batch)
        assert declared.scoring > 0
        assert declared.total == pytest.approx(compat.counted_flops(counter), rel=1e-9), params


@torch.no_grad()
def test_generation_with_and_without_cache_agree_at_the_default_layers(model):
    batch = llava_batch(model, sample_prompts(3), "left")
    with tokenpress.compress(model, stack(scale=2.0)) as handle:
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        assert [r.layer for r in handle.report().records] == [2, 3, 5]
    assert torch.equal(cached, uncached)


def test_default_layers_scale_the_published_locations():
    default = SparseVLM.default_layers
    config = SparseVLMConfig()
    assert default(config, 32) == (3, 7, 16)  # after 2, 6 and 15, as published for LLaVA-1.5
    assert default(config, 28) == (3, 6, 14)
    assert default(config, 40) == (4, 9, 20)
    assert default(config, 4) == (1, 2, 3)
    assert default(config, 2) == (1,)
    assert default(config, 1) == ()


def test_parameters_are_checked_and_round_trip(model):
    with pytest.raises(StackError, match="keep_ratio or schedule, not both"):
        tokenpress.load_stack(stack(keep_ratio=0.5, schedule=[3, 2, 1]))
    with pytest.raises(StackError, match="scale and bias shape the rank rule"):
        tokenpress.load_stack(stack(keep_ratio=0.5, scale=2.0))
    with pytest.raises(StackError, match="lists 2 counts for 3 listed layers"):
        tokenpress.compress(model, stack(schedule=[3, 2]))
    assert "forward" not in model.model.__dict__
    loaded = tokenpress.load_stack(stack(keep_ratio=0.25))
    assert tokenpress.load_stack(loaded.as_dict()).stages[0].config == loaded.stages[0].config
    assert SparseVLM.params_for_keep(0.11) == {"keep_ratio": 0.11}
    assert SparseVLM(SparseVLMConfig()).rank_rule() == (13.5, 0.0)
