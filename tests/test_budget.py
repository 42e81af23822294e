"""Comparisons at equal cost: a method's keep knob solved for a FLOPs ratio on the model at hand
(tokenpress.measure.budget), the mean visual tokens per decoder layer beside the last layer's count, and the
one-command sweep of `tokenpress eval --methods ... --ratios ... --match-flops ...`."""

from __future__ import annotations

import pytest
import torch

import tokenpress
from tokenpress.core import flops
from tokenpress.measure import budget, evaluate
from tokenpress.testing.contract import tiny_model
from tokenpress.testing.families import FAMILIES, prompts
from tokenpress.tools.cli import main


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, FAMILIES["llava"].batch(model, prompts(3), "left", 0)


KNOBBED = sorted(name for name, method in tokenpress.get_registry().methods.items()
                 if method.params_for_keep(0.5) is not None)


@pytest.mark.parametrize("keep_ratio", [1e-4, 0.01, 0.11, 0.5, 1.0])
@pytest.mark.parametrize("method", KNOBBED)
def test_every_keep_ratio_the_search_may_try_gives_valid_params(method, keep_ratio) -> None:
    """The bisection asks a knob for keep ratios down to 1e-4: every answer is a valid config (a knob with
    a largest setting stops there)."""
    method_class = tokenpress.get_registry().methods[method]
    for num_layers in (4, 32):
        method_class.Config(**budget.keep_params(method_class, keep_ratio, num_layers))


@pytest.mark.parametrize("target", [0.6, 0.4])
@pytest.mark.parametrize("method", KNOBBED)
def test_a_matched_budget_is_within_the_tolerance_or_said_to_be_out_of_reach(llava, method, target) -> None:
    """Every registered method with a keep knob: its FLOPs ratio within the tolerance of the budget, or the
    result says it is out of reach (and is then the closest setting the search met)."""
    model, inputs = llava
    matched = budget.match_flops(model, inputs, method, target)
    assert matched.matched == (abs(matched.flops_ratio - target) <= budget.TOLERANCE)
    # the ratio reported is the stack's own, measured again independently of the search
    assert budget.flops_ratio(model, inputs, matched.stack) == pytest.approx(matched.flops_ratio)
    if method in ("random", "divprune", "cdpruner", "vispruner", "scope"):  # continuous pre-LLM knobs
        assert matched.matched, matched
    if method in ("fastv", "dart"):  # one decoder layer: 0.6 is reachable on this 4-layer decoder, 0.4 is not
        assert matched.matched == (target == 0.6), matched


def test_the_flops_ratio_is_the_analytical_model_on_a_real_prefill(llava) -> None:
    model, inputs = llava
    stack = {"name": "r", "stages": [{"method": "random", "params": {"keep_ratio": 0.3}}]}
    with torch.no_grad(), tokenpress.compress(model, stack) as handle:
        model(**inputs, use_cache=False, logits_to_keep=1)
        expected = flops.measured(model, inputs, handle.prefill_stats, handle.stack, handle.report().records).total
    assert budget.flops_ratio(model, inputs, stack) == pytest.approx(expected / flops.measured(model, inputs).total)


def test_fastv_moves_its_layer_earlier_only_when_its_keep_ratio_cannot_reach_the_budget(llava) -> None:
    model, inputs = llava
    reachable = budget.match_flops(model, inputs, "fastv", 0.75, layer=2)
    assert reachable.matched and reachable.stack["stages"][0]["layers"] == [2]
    low = budget.match_flops(model, inputs, "fastv", 0.45, layer=2)
    assert low.stack["stages"][0]["layers"][0] < 2 and "layers" in low.knob


def test_without_a_layer_fastv_starts_from_the_papers_k_scaled_to_the_depth(llava) -> None:
    """K = 2 of 32 is layer 1 of the tiny model's 4 (at least 1), and 2 of 28, 3 of 40."""
    model, inputs = llava
    fastv = tokenpress.get_registry().methods["fastv"]
    config = fastv.Config(keep_ratio=0.5)
    assert [fastv.default_layers(config, depth) for depth in (4, 12, 28, 32, 40)] == [(1,), (1,), (2,), (2,), (3,)]
    assert budget.match_flops(model, inputs, "fastv", 0.75).stack["stages"][0]["layers"] == [1]


def test_eval_sweeps_methods_at_ratios_and_budgets_in_one_run(checkpoint, capsys) -> None:
    assert main(["eval", "--model", str(checkpoint), "--methods", "random,fastv", "--ratios", "0.5",
                 "--match-flops", "0.7", "-n", "4", "--batch-size", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("random 50%", "fastv 50%", "random @ FLOPs 0.7", "fastv @ FLOPs 0.7"):
        assert f"| {name} |" in out
    assert "tokens per layer (mean)" in out
    assert "- random @ FLOPs 0.7: keep_ratio=" in out and "FLOPs ratio 0.7" in out


def test_mean_tokens_per_layer_tells_a_decoder_method_from_a_pre_llm_one(checkpoint) -> None:
    """FastV keeps every token in its first layers: the last layer's count understates what it spends."""
    rows = evaluate.evaluate([{"name": "fastv", "stages": [{"method": "fastv", "layers": [2],
                                                           "params": {"keep_ratio": 0.25}}]},
                              {"name": "random", "stages": [{"method": "random", "params": {"keep_ratio": 0.25}}]}],
                             model=str(checkpoint), n=4, batch_size=4, progress=False)
    baseline, fastv, random = rows
    assert baseline.mean_tokens_per_layer == 1.0
    assert fastv.tokens_kept == pytest.approx(0.25) and fastv.mean_tokens_per_layer == pytest.approx(0.625)
    assert random.tokens_kept == pytest.approx(0.25) and random.mean_tokens_per_layer == pytest.approx(0.25)


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "random"], "--methods needs --ratios"),
    (["--match-flops", "0.4"], "sweep the methods named by --methods"),
    (["--methods", "nope", "--ratios", "0.5"], "unknown method 'nope'"),
    (["--methods", "random", "--match-flops", "1.5"], "is not in (0, 1]"),
    ([], "give stack files"),
])
def test_sweep_mistakes_are_one_line(argv, message, capsys) -> None:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
