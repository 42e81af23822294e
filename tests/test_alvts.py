"""ALVTS against an independent reference: the score from the layer's exact eager attention, routing
written with the model's own modules, the selector file and its calibration."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tokenpress
from reference import llava_patch_features, merged_embeddings
from tokenpress.core import weights
from tokenpress.core.errors import InputError
from tokenpress.core.tokens import pack_index
from tokenpress.runtime.scorer import layer_query_key
from tokenpress.testing import llava_batch, sample_prompts, select_rows
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress.testing.models import tiny_llava
from tokenpress.tools.cli import main
from tokenpress_plugins.alvts.calibrate import calibrate
from tokenpress_plugins.alvts.method import adaptive_budgets
from tokenpress_plugins.alvts.selector import coverage_curve, low_rank

FULL_RANK = 4096  # clamped to each projection's own width: the SVD then reproduces the weights


def alvts_stack(**params) -> dict:
    return {"name": "alvts", "stages": [{"method": "alvts", "params": params}]}


def image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


def reference_scores(attention: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """S = S_V2V * S_T2V from one layer's exact attention probabilities (B, H, N, N), head-averaged."""
    probs = attention.double().mean(1)
    v2v = (probs * visual[:, :, None]).sum(1) / visual.sum(-1, keepdim=True)
    t2v = (probs * text[:, :, None]).sum(1) / text.sum(-1, keepdim=True)
    return (v2v * t2v * visual).float()


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@torch.no_grad()
def test_full_rank_score_equals_the_score_of_the_layers_eager_attention(family, padding_side):
    spec = FAMILIES[family]
    model = spec.build("eager")
    batch = spec.batch(model, prompts(3), padding_side, 0)
    attentions = model(**batch, output_attentions=True).attentions
    real = batch["attention_mask"].bool()
    visual = (batch["input_ids"] == image_token_id(model.config)) & real
    text = real & ~visual
    with tokenpress.compress(model, alvts_stack(keep_ratio=0.5, rank=FULL_RANK)) as handle:
        method = handle.entries[0].method
        method.recording = []
        model(**batch)
        recorded = method.recording
        assert [layer for layer, _ in recorded] == list(range(len(attentions)))
        for layer, sequence in recorded:
            columns = sequence.column.clamp_min(0)  # the engine's slots -> the input's columns
            assert torch.equal(sequence.is_visual & sequence.valid, visual.gather(1, columns) & sequence.valid)
            expected = reference_scores(attentions[layer], visual, text).gather(1, columns) * sequence.valid
            torch.testing.assert_close(method.scores(sequence, layer), expected, rtol=2e-4, atol=1e-9)
            torch.testing.assert_close(method.exact_scores(sequence, layer), expected, rtol=2e-4, atol=1e-9)


def manual_alvts(model, batch: dict, keep_ratio: float) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits of one unpadded LLaVA sample with ALVTS routing at every layer, from the model's own
    modules: each layer's exact attention gives S, its top floor(r*N) visual tokens and every text
    token go through the layer, the rest keep their hidden state."""
    language_model = model.model.language_model
    ids = batch["input_ids"][0]
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    text = torch.nonzero(ids != model.config.image_token_id).flatten()
    hidden = merged_embeddings(model, batch["input_ids"], model.model.multi_modal_projector(
        llava_patch_features(model, batch["pixel_values"]))[0])
    positions = torch.arange(ids.numel()).unsqueeze(0)
    count = math.floor(keep_ratio * visual.numel())
    routed_per_layer = []
    for layer in language_model.layers:
        length = hidden.shape[1]
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos_sin = language_model.rotary_emb(hidden, positions)
        _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=cos_sin, attention_mask=mask)
        probs = weights.mean(1)[0]
        score = probs[visual].mean(0) * probs[text].mean(0)
        chosen = visual[torch.topk(score[visual], count).indices]
        routed = torch.sort(torch.cat([text, chosen])).values
        routed_per_layer.append(sorted(chosen.tolist()))
        sub_mask = torch.full((len(routed), len(routed)), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        out = layer(hidden[:, routed], attention_mask=sub_mask, position_ids=positions[:, routed],
                    position_embeddings=language_model.rotary_emb(hidden, positions[:, routed]))
        hidden = hidden.clone()
        hidden[:, routed] = out[0] if isinstance(out, tuple) else out
    return model.lm_head(language_model.norm(hidden)), routed_per_layer


@pytest.mark.parametrize("keep_ratio", [0.11, 0.25, 0.5])
@torch.no_grad()
def test_routing_equals_the_reference_top_k_at_every_layer(llava_eager, keep_ratio):
    batch = select_rows(llava_batch(llava_eager, sample_prompts(2)), 1)
    expected, routed = manual_alvts(llava_eager, batch, keep_ratio)
    with tokenpress.compress(llava_eager, alvts_stack(keep_ratio=keep_ratio, rank=FULL_RANK)) as handle:
        logits = llava_eager(**batch).logits
        records = handle.report().records
    count = max(1, math.floor(keep_ratio * 36))
    assert [(r.layer, r.tokens_in, r.tokens_out) for r in records] == [(layer, [36], [count]) for layer in range(4)]
    assert all(len(chosen) == count for chosen in routed)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
@torch.no_grad()
def test_keep_ratio_one_leaves_the_logits_unchanged(family):
    spec = FAMILIES[family]
    model = spec.build("sdpa")
    batch = spec.batch(model, prompts(2), "left", 1)
    expected = model(**batch).logits
    real = batch["attention_mask"].bool()
    with tokenpress.compress(model, alvts_stack(keep_ratio=1.0)) as handle:
        logits = model(**batch).logits
        assert handle.report().records == []  # nothing scored, nothing routed
    # the engine's own layer loop (packed rows) against transformers': equal up to float32 rounding
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-6)


def test_full_rank_svd_reproduces_the_weights_and_default_rank_follows_the_paper():
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    x = torch.randn(5, 16)
    torch.testing.assert_close(low_rank(weight, bias, 99)(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    factors = low_rank(weight, None, 4)
    assert factors.rank == 4 and factors.down.shape == (4, 16) and factors.up.shape == (24, 4)
    # the even split: both factors carry sqrt of the singular values
    torch.testing.assert_close(factors.down.norm(dim=1), factors.up.norm(dim=0))
    model = tiny_llava()
    with tokenpress.compress(model, alvts_stack(keep_ratio=0.5)) as handle:
        assert handle.entries[0].method.factors[0][0].rank == 64 // 16


def test_coverage_curve_and_adaptive_budgets():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    curve = coverage_curve(scores, torch.tensor([[True, True, True, True, False]]), points=5)
    torch.testing.assert_close(curve[0], torch.tensor([0.0, 0.4, 0.7, 0.9, 1.0]))
    points = torch.linspace(0, 1, 101)
    concentrated, diffuse = 1 - (1 - points) ** 8, points
    ratios = adaptive_budgets({0: concentrated, 1: diffuse}, 0.25)
    assert ratios[0] < 0.25 < ratios[1]
    assert sum(ratios.values()) / 2 == pytest.approx(0.25, abs=1e-9)  # the uniform budget's token work
    assert adaptive_budgets({0: diffuse, 1: diffuse}, 0.3) == pytest.approx({0: 0.3, 1: 0.3}, abs=0.011)


# --- calibration and the selector file --------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = tiny_llava("sdpa")
    train = [llava_batch(model, sample_prompts(3, seed=s), seed=s) for s in (1, 2)]
    held_out = [llava_batch(model, sample_prompts(3, seed=9), seed=9)]
    stage = {"method": "alvts", "params": {"keep_ratio": 0.25, "rank": 4}}
    reports = [calibrate(model, stage, train, held_out, epochs=3, lr=1e-2, seed=0, progress=False) for _ in range(2)]
    path = reports[0].save(tmp_path_factory.mktemp("selector") / "selector.safetensors")
    return model, reports, path, held_out


def test_calibration_is_reproducible_and_lowers_the_consistency_loss(calibrated):
    model, (first, second), _, _ = calibrated
    assert first.losses == second.losses
    for name, value in first.parts.state_dict().items():
        assert torch.equal(value, second.parts.state_dict()[name]), name
    assert first.losses[-2] < first.losses[0]  # the same training batch, two epochs later
    assert sum(r.loss_calibrated for r in first.fidelity) < sum(r.loss_svd for r in first.fidelity)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the model is not trained
    assert "| layer |" in first.table()


@torch.no_grad()
def test_a_selector_file_round_trips(calibrated):
    model, (report, _), path, held_out = calibrated
    header = weights.read_header(path)
    assert header["method"] == "alvts" and header["format"] == weights.FORMAT  # one case of method weights
    info = header["calibration"]
    assert info["rank"] == 4 and info["layers"] == [0, 1, 2, 3] and info["samples"] == 6
    keys = dict(model.state_dict())
    with tokenpress.compress(model, alvts_stack(keep_ratio=0.25, weights=str(path))) as handle:
        method = handle.entries[0].method
        for layer in range(4):
            q, k = method.factors[layer]
            stored = report.parts[layer]
            assert torch.equal(q.down, stored.q_down) and torch.equal(k.up, stored.k_up)
        assert method.weights.coverage(2).shape == (101,)
        assert list(model.state_dict()) == list(keys)  # never part of the model
    # a stage that routes some layers loads those of a file calibrated for all of them
    stack = alvts_stack(keep_ratio=0.25, weights=str(path))
    stack["stages"][0]["layers"] = [1, 3]
    with tokenpress.compress(model, stack) as handle:
        method = handle.entries[0].method
        assert method.weights.indices == [1, 3] and torch.equal(method.factors[3][0].up, report.parts[3].q_up)
    with tokenpress.compress(model, alvts_stack(keep_ratio=0.25, weights=str(path), budget="adaptive")) as handle:
        ratios = handle.entries[0].method.ratios
        assert sum(ratios.values()) / len(ratios) == pytest.approx(0.25, abs=0.011)


@pytest.mark.parametrize("other", ["other weights", "other shape", "missing", "not a selector"])
def test_a_selector_for_another_model_is_refused_in_one_sentence(calibrated, other, tmp_path):
    _, _, path, held_out = calibrated
    model = tiny_llava("sdpa", seed=5) if other == "other weights" else tiny_llava("sdpa", num_layers=3)
    if other == "missing":
        path, model = tmp_path / "nothing.safetensors", tiny_llava("sdpa")
    elif other == "not a selector":
        path, model = tmp_path / "notes.safetensors", tiny_llava("sdpa")
        path.write_text("hello", encoding="utf-8")
    before = model(**held_out[0]).logits
    with pytest.raises(InputError) as error:
        tokenpress.compress(model, alvts_stack(keep_ratio=0.25, weights=str(path)))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "stages[0] (alvts)" in message
    expected = {"other weights": "other weights", "other shape": "another model", "missing": "no such weights",
                "not a selector": "not a safetensors"}[other]
    assert other in ("missing", "not a selector") or "tokenpress calibrate" in message
    assert expected in message
    assert "forward" not in model.model.__dict__
    assert torch.equal(model(**held_out[0]).logits, before)


def test_adaptive_budget_without_a_selector_file_is_one_sentence():
    with pytest.raises(InputError, match="adaptive budgets come from calibration statistics"):
        tokenpress.compress(tiny_llava(), alvts_stack(keep_ratio=0.25, budget="adaptive"))


def test_cli_calibrates_a_users_model_from_a_folder(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(5):
        pixels = torch.randint(0, 255, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"picture{index}.png")
        (data / f"picture{index}.txt").write_text(f"w{5 + index} w{9 + index}", encoding="utf-8")
    stack = tmp_path / "alvts.yaml"
    stack.write_text("name: a\nstages:\n  - method: alvts\n    params: {keep_ratio: 0.25, rank: 4}\n", encoding="utf-8")
    out = tmp_path / "selector.safetensors"
    argv = ["calibrate", str(stack), "--model", str(checkpoint), "--data", str(data), "--samples", "4",
            "--epochs", "1", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 calibration samples, 1 held out" in printed and f"wrote {out}" in printed
    assert json.loads(json.dumps(weights.read_header(out)))["calibration"]["samples"] == 4
    # mistakes: one line, exit 2
    pool = tmp_path / "pool.yaml"
    pool.write_text("name: p\nstages:\n  - method: pool\n    params: {kernel: 2}\n", encoding="utf-8")
    for wrong in (["calibrate", str(stack), "--model", str(checkpoint)],
                  ["calibrate", str(pool), "--model", str(checkpoint), "--data", str(data)],
                  ["calibrate", str(stack), "--model", str(checkpoint), "--data", str(tmp_path / "none")]):
        assert main(wrong) == 2
        error = capsys.readouterr().err
        assert error.startswith("tokenpress: error: ") and error.count("\n") == 1, error


def test_the_old_selector_parameter_is_named_in_one_sentence():
    with pytest.raises(tokenpress.StackError, match="`selector` is now `weights`"):
        tokenpress.load_stack(alvts_stack(keep_ratio=0.25, selector="zoo:llava-shapes"))


def test_tokenpress_fit_leaves_a_calibrated_method_to_calibrate(tmp_path):
    """ALVTS's weights decide a top-k (no gradient reaches them): fit refuses it, naming calibrate."""
    stack = tmp_path / "alvts.yaml"
    stack.write_text("name: a\nstages:\n  - method: alvts\n    params: {keep_ratio: 0.25}\n", encoding="utf-8")
    assert main(["fit", str(stack), "--model", "zoo:llava-shapes", "--steps", "1", "--quiet"]) == 2


def previous_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    scaling: float,
    chunk: int = 64,
    combine: Any = None,
) -> torch.Tensor:
    """The score as tokenpress computed it before its block-causal rewrite (the packed visual and text rows,
    every key computed and masked, a chunk of rows at a time): what the faster path must equal."""
    batch, heads, length, width = query.shape
    visual, text = visual & valid, text & valid & ~visual
    rows, picked = pack_index(visual | text, width=length)  # the rows whose attention counts, left-packed
    index = rows[:, None, :, None].expand(-1, heads, -1, width)
    scaled_rows = torch.gather(query.float(), 2, index) * scaling  # (B, H, R, d)
    weights = torch.stack([torch.gather(visual, 1, rows) & picked, torch.gather(text, 1, rows) & picked], 1).float()
    key_t = key.float().transpose(-1, -2)  # (B, H, d, N)
    key_slot = torch.arange(length, device=query.device)
    totals = torch.zeros(batch, 2, length, dtype=torch.float32, device=query.device)  # (S_V2V, S_T2V) sums
    for start in range(0, rows.shape[1], chunk):
        stop = start + chunk
        logits = torch.matmul(scaled_rows[:, :, start:stop], key_t)  # (B, H, c, N): the largest temporary
        allowed = valid[:, None, :] & (key_slot[None, None, :] <= rows[:, start:stop, None])  # causal, real keys
        allowed |= ~picked[:, start:stop, None]  # padding rows (weight 0) see every key: no all -inf row
        bias = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~allowed, -torch.inf)
        probs = torch.softmax(logits.add_(bias[:, None]), dim=-1)  # an additive mask: far faster than masked_fill
        totals = totals + torch.bmm(weights[:, :, start:stop], probs.sum(1)) / heads
    v2v, t2v = totals[:, 0], totals[:, 1]
    v2v = v2v / visual.sum(-1, keepdim=True).clamp_min(1)
    t2v = t2v / text.sum(-1, keepdim=True).clamp_min(1)
    score = combine(v2v, t2v) if combine is not None else v2v * t2v
    return score * visual




@pytest.mark.parametrize("seed", range(3))
def test_the_block_causal_score_equals_the_previous_computation(seed) -> None:
    """The block-causal score (every slot a weighted row, each block of rows against the keys up to it)
    equals the previous packed-rows computation on a left-packed batch of different lengths, whatever
    the chunk sizes, and so routes the same sets."""
    from tokenpress.core.select import topk_mask
    from tokenpress_plugins.alvts.selector import importance

    generator = torch.Generator().manual_seed(seed)
    batch, heads, length, width = 3, 4, 97, 16
    query = torch.randn(batch, heads, length, width, generator=generator)
    key = torch.randn(batch, heads, length, width, generator=generator)
    lengths = torch.tensor([97, 80, 61])
    valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 5:50] = True
    text = valid & ~visual
    reference = previous_importance(query, key, valid, visual, text, 0.25, chunk=13)
    counts = torch.tensor([20, 11, 33])
    for chunk in (7, 64, 200):
        ours = importance(query, key, valid, visual, text, 0.25, chunk=chunk)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-10)
        assert torch.equal(topk_mask(ours, visual & valid, counts), topk_mask(reference, visual & valid, counts))


@contextlib.contextmanager
def recorded_prefill(family: str) -> Iterator[tuple[Any, Any, list]]:
    """A family's tiny model with ALVTS at 50% attached, after one prefill of three prompts: the handle,
    the method, and the (layer, sequence) pairs it scored."""
    spec = FAMILIES[family]
    model = spec.build("sdpa")
    batch = spec.batch(model, prompts(3), "left", 0)
    with tokenpress.compress(model, alvts_stack(keep_ratio=0.5)) as handle:
        method = handle.entries[0].method
        method.recording = []
        model(**batch)
        recorded, method.recording = method.recording, None
        assert recorded
        yield handle, method, recorded


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_the_folded_selector_scores_and_routes_as_the_unfolded_one(family) -> None:
    """The selector's rotation folded into its up-projections (a plain and a turned product per stream,
    rotated in place, no rotate pass) gives the scores and routed sets of the unfolded path, which runs
    the layer's own norm, projections and ``rotate``; a layer with per-head norms between projection and
    rotation keeps the unfolded path."""
    from tokenpress.core.select import topk_mask

    with recorded_prefill(family) as (handle, method, recorded):
        per_head_norms = handle.adapter.attention_parts(0).q_norm is not None
        for layer, sequence in recorded:
            folded = method.folded(layer, sequence.hidden)
            assert (folded is None) == per_head_norms
            ours = method.scores(sequence, layer)
            unfolded = method.scores(sequence, layer, method.projections(layer, sequence.hidden))
            torch.testing.assert_close(ours, unfolded, rtol=1e-4, atol=1e-9)
            candidates = sequence.is_visual & sequence.valid
            counts = method.counts(candidates.sum(-1), layer)
            assert torch.equal(topk_mask(ours, candidates, counts), topk_mask(unfolded, candidates, counts))


def test_the_score_kernel_is_compiled_where_a_c_compiler_is() -> None:
    """On a machine with a C compiler and torch on GNU OpenMP (CI's), ALVTS scores with its compiled
    kernel: the equality tests below then compare two different computations, not torch with itself."""
    from tokenpress_plugins.alvts.selector import _score_kernel

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the torch path is the only one")
    if os.environ.get("TOKENPRESS_NATIVE") == "0":
        pytest.skip("TOKENPRESS_NATIVE=0 turns the kernel off")
    assert _score_kernel("folded_totals") is not None
    assert _score_kernel("block_causal_totals") is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_the_compiled_score_equals_the_torch_loop(family) -> None:
    """On every family's recorded prefill, the compiled kernel's scores (folded: queries and keys made in
    the kernel; unfolded: the layer's own projections) equal the torch loop's, and route the same sets."""
    from tokenpress.core.select import topk_mask
    from tokenpress_plugins.alvts.selector import importance

    with recorded_prefill(family) as (handle, method, recorded):
        for layer, sequence in recorded:
            parts = handle.adapter.attention_parts(layer)
            text = sequence.is_prompt & ~sequence.is_visual
            rows = (sequence.valid, sequence.is_visual, text)
            pairs = []
            folded = method.folded(layer, sequence.hidden)
            if folded is not None:
                normed = parts.input_norm(sequence.hidden)
                cos, sin = handle.adapter.rotary_tables(normed, sequence.positions, layer)
                pairs.append([folded.importance(normed, cos, sin, *rows, native=native) for native in (True, False)])
            query, key = layer_query_key(handle.adapter, layer, sequence,
                                         projections=method.projections(layer, sequence.hidden))
            pairs.append([importance(query, key, *rows, parts.scaling, native=native) for native in (True, False)])
            candidates = sequence.is_visual & sequence.valid
            counts = method.counts(candidates.sum(-1), layer)
            for compiled, loop in pairs:
                torch.testing.assert_close(compiled, loop, rtol=1e-5, atol=1e-10)
                assert torch.equal(topk_mask(compiled, candidates, counts), topk_mask(loop, candidates, counts))


def test_a_rotation_of_another_form_is_not_folded() -> None:
    """The fold assumes ``rotate(x) = x * cos + T(x) * sin``; a rotation that is not of that form (here
    one that squares its input) is detected, so its adapter keeps the unfolded path."""
    from tokenpress_plugins.alvts.selector import rotation_is_linear

    def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos.unsqueeze(2) + torch.cat((-x[..., half:], x[..., :half]), -1) * sin.unsqueeze(2)

    def turn(x: torch.Tensor) -> torch.Tensor:
        return rotate_half(x, torch.zeros(1, 1, x.shape[-1]).to(x), torch.ones(1, 1, x.shape[-1]).to(x))

    def squaring(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate_half(x * x, cos, sin)

    assert rotation_is_linear(rotate_half, turn, 4, 8)
    assert not rotation_is_linear(squaring, turn, 4, 8)
