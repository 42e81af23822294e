"""Malformed stacks: every mistake gives one clear sentence naming the file, the stage and the field.

Each case is checked twice: through the Python API (``load_stack``, or ``compress`` where the mistake
needs a model) and through ``tokenpress validate`` (exit code 2, one line on stderr, no traceback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tokenpress
from tokenpress.testing.models import llava_batch, sample_prompts, tiny_llava
from tokenpress.tools.cli import main

# A valid first stage, so that the broken stage is stages[1] and the index in the message means something.
HEAD = "name: bad\nstages:\n  - method: pool\n    params: {kernel: 2}\n"


#: The "billion laughs": nine levels of nine aliases each, about 10**9 values once expanded.
ALIAS_BOMB = "".join(
    ["a0: &a0 ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']\n"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)]
    + ["name: bomb\nstages:\n  - method: pool\n    params: {kernel: *a8}\n"]
)
#: No error line is longer than this (values are quoted in part).
MAX_LINE = 300


@dataclass(frozen=True)
class Bad:
    """A malformed stack: its text, the fragments its error must contain, whether it needs a model."""

    id: str
    text: str
    fragments: tuple[str, ...]
    needs_model: bool = False
    error: type[tokenpress.TokenpressError] = tokenpress.StackError


CASES = [
    Bad("unknown_method", HEAD + "  - method: fastvv\n    layers: [1]\n",
        ("stages[1].method", "'fastvv'", "did you mean 'fastv'")),
    Bad("unknown_method_no_close_match", HEAD + "  - method: gridzap\n",
        ("stages[1].method", "'gridzap'", "fastv", "more (see tokenpress plugins)")),
    Bad("misspelled_top_level_field", "name: bad\nstage:\n  - method: pool\n",
        ("stage:", "unknown field", "did you mean 'stages'")),
    Bad("misspelled_stage_field", HEAD + "  - method: fastv\n    layers: [1]\n    param: {keep_ratio: 0.5}\n",
        ("stages[1].param:", "unknown field", "did you mean 'params'")),
    Bad("misspelled_param", HEAD + "  - method: fastv\n    layers: [1]\n    params: {keep_ration: 0.5}\n",
        ("stages[1]", "params.keep_ration", "unknown field", "did you mean 'keep_ratio'")),
    Bad("param_of_another_method", HEAD + "  - method: pool\n    at: projector\n    params: {keep_ratio: 0.5}\n",
        ("stages[1]", "params.keep_ratio", "unknown field", "kernel", "mode")),
    Bad("keep_ratio_wrong_type", HEAD + "  - method: fastv\n    layers: [1]\n    params: {keep_ratio: half}\n",
        ("stages[1]", "params.keep_ratio", "valid number", "'half'")),
    Bad("keep_ratio_zero", HEAD + "  - method: fastv\n    layers: [1]\n    params: {keep_ratio: 0}\n",
        ("stages[1]", "params.keep_ratio", "greater than 0")),
    Bad("keep_ratio_above_one", HEAD + "  - method: random\n    params: {keep_ratio: 1.5}\n",
        ("stages[1]", "params.keep_ratio", "less than or equal to 1", "1.5")),
    Bad("negative_layer", HEAD + "  - method: fastv\n    layers: [-1]\n",
        ("stages[1].layers", "start at 0", "-1")),
    Bad("layer_out_of_range", HEAD + "  - method: fastv\n    layers: [1, 4]\n",
        ("stages[1].layers", "layer 4", "out of range", "4 decoder layers"), needs_model=True),
    Bad("layer_out_of_range_multi_point_method", HEAD + "  - method: random\n    at: decoder_layer\n    layers: [9]\n",
        ("stages[1].layers", "layer 9", "out of range"), needs_model=True),
    Bad("layer_listed_twice", HEAD + "  - method: fastv\n    layers: [1, 1]\n",
        ("stages[1].layers", "twice")),
    Bad("layer_not_an_integer", HEAD + "  - method: fastv\n    layers: [1.5]\n",
        ("stages[1].layers[0]", "integer", "1.5")),
    Bad("decoder_method_at_post_encoder", HEAD + "  - method: fastv\n    at: post_encoder\n",
        ("stages[1].at", "'fastv'", "'post_encoder'", "decoder_layer")),
    Bad("unknown_point", HEAD + "  - method: pool\n    at: post_encode\n",
        ("stages[1].at", "'post_encode'", "post_encoder")),
    Bad("post_encoder_method_given_layers", HEAD + "  - method: pool\n    at: post_encoder\n    layers: [1]\n",
        ("stages[1].layers", "only decoder_layer stages and in-encoder methods take layers")),
    Bad("layers_without_at_on_multi_point_method", HEAD + "  - method: random\n    layers: [1]\n",
        ("stages[1].layers", "add `at: decoder_layer`")),
    Bad("decoder_stage_without_layers",
        HEAD + "  - method: random\n    at: decoder_layer\n    params: {keep_ratio: 0.5}\n",
        ("stages[1].layers", "must list the layer")),
    Bad("decoder_stage_with_empty_layers", HEAD + "  - method: fastv\n    layers: []\n",
        ("stages[1].layers", "must list the layer")),
    Bad("stage_without_method", HEAD + "  - layers: [1]\n",
        ("stages[1].method", "required field is missing")),
    Bad("stage_not_a_mapping", HEAD + "  - fastv\n",
        ("stages[1]", "'fastv'")),
    Bad("params_not_a_mapping", HEAD + "  - method: fastv\n    layers: [1]\n    params: 0.5\n",
        ("stages[1].params", "dictionary")),
    Bad("empty_file", "", ("empty",)),
    Bad("comments_only", "# a stack, some day\n", ("mapping", "found nothing")),
    Bad("not_yaml", "name: bad\nstages: [ {method: pool\n", ("not valid YAML", "line 3")),
    Bad("duplicate_key", HEAD + "  - method: fastv\n    layers: [1]\n    layers: [2]\n",
        ("duplicate key 'layers'", "line 7")),
    Bad("top_level_list", "- name: bad\n- stages: []\n", ("mapping", "found list")),
    Bad("unknown_positions", "name: bad\npositions: compacted\nstages: []\n",
        ("positions", "'original' or 'compact'", "'compacted'")),
    Bad("stages_not_a_list", "name: bad\nstages:\n  method: pool\n", ("stages:", "valid list")),
    Bad("missing_name", "stages:\n  - method: pool\n", ("name:", "required field is missing")),
    Bad("no_stages_key", "name: bad\npositions: original\n",
        ("stages:", "required field is missing", "`stages: []`")),
    Bad("alias_bomb", ALIAS_BOMB, ("more than 10000 values", "anchors and aliases")),
    Bad("huge_unknown_method", HEAD + f"  - method: {'x' * 20000}\n",
        ("stages[1].method", "unknown method 'xxxx", "...")),
    Bad("huge_number", HEAD + f"  - method: fastv\n    layers: [1]\n    params:\n      keep_ratio: {'9' * 5000}\n",
        ("cannot read a value", "4300 digits")),
    Bad("huge_bad_value", HEAD + f"  - method: fastv\n    layers: [1]\n    params:\n      keep_ratio: '{'9' * 5000}'\n",
        ("stages[1]", "params.keep_ratio", "...")),
    Bad("layer_given_as_a_boolean", HEAD + "  - method: fastv\n    layers: [true]\n",
        ("stages[1].layers[0]", "integer", "True")),
    Bad("keep_ratio_given_as_a_string", HEAD + "  - method: fastv\n    layers: [1]\n    params: {keep_ratio: '0.5'}\n",
        ("stages[1]", "params.keep_ratio", "number", "'0.5'")),
    Bad("kernel_given_as_a_string", HEAD + "  - method: pool\n    at: projector\n    params: {kernel: '2'}\n",
        ("stages[1]", "params.kernel", "integer", "'2'")),
    Bad("fastv_scoring_before_layer_0", HEAD + "  - method: fastv\n    layers: [0, 2]\n",
        ("stages[1].layers", "layer 0 has no previous layer", "score_layer: current")),
    Bad("regrid_after_selection", "name: bad\nstages:\n  - method: random\n  - method: pool\n",
        ("stages[1] (pool) cannot run after stages[0] (random)", "full patch grid")),
    Bad("regrid_at_projector_after_selection", "name: bad\nstages:\n  - method: random\n  - method: pool\n"
        "    at: projector\n", ("stages[1] (pool) cannot run after stages[0] (random)", "full patch grid")),
    Bad("regrid_after_merges_inside_the_encoder", "name: bad\nstages:\n  - method: tome\n    layers: [0]\n"
        "    params: {r: 2}\n  - method: pool\n",
        ("stages[1] (pool) cannot run after stages[0] (tome)", "full patch grid")),
    Bad("signals_after_a_regrid", "name: bad\nstages:\n  - method: pool\n  - method: prumerge\n",
        ("stages[1] (prumerge) cannot run after stages[0] (pool)", "encoder signals")),
    Bad("signals_after_later_selection", "name: bad\nstages:\n  - method: visionzip\n"
        "    params: {keep_ratio: 0.5}\n  - method: random\n  - method: prumerge\n",
        ("stages[2] (prumerge) cannot run after stages[0] (visionzip)", "encoder signals")),
    Bad("projector_replaced_twice", "name: bad\nstages:\n  - method: pixel_unshuffle\n  - method: ldp\n",
        ("stages[1] (ldp) cannot run after stages[0] (pixel_unshuffle)", "encoder space")),
    Bad("projector_replaced_after_projection", "name: bad\nstages:\n  - method: pool\n    at: projector\n"
        "  - method: qformer\n", ("stages[1] (qformer) cannot run after stages[0] (pool)", "encoder space")),
    Bad("huge_unknown_param", HEAD + f"  - method: fastv\n    layers: [1]\n    params:\n      {'k' * 1000}: 1\n",
        ("stages[1]", "params.kkkk", "...", "unknown field", "keep_ratio")),
]



@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llava()


def write(tmp_path: Path, case: Bad) -> Path:
    path = tmp_path / f"{case.id}.yaml"
    path.write_text(case.text, encoding="utf-8")
    return path


def test_there_are_enough_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 14


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_error_names_file_stage_and_field(case: Bad, tmp_path: Path, model: torch.nn.Module) -> None:
    path = write(tmp_path, case)
    with pytest.raises(case.error) as info:
        if case.needs_model:
            tokenpress.compress(model, path)
        else:
            tokenpress.load_stack(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) <= MAX_LINE, message
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert tokenpress.attached_handle(model) is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_validate_prints_one_line_and_exits_2(case: Bad, tmp_path: Path, checkpoint: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, case)
    argv = ["validate", str(path)] + (["--model", str(checkpoint)] if case.needs_model else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert len(lines[0]) <= MAX_LINE, lines[0]
    assert lines[0].startswith(f"tokenpress: error: {path}: ")
    assert "Traceback" not in err
    for fragment in case.fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_a_long_stack_without_aliases_is_not_an_alias_bomb(tmp_path: Path) -> None:
    """2,000 stages written out (no anchors) stand for more than MAX_VALUES values, but only as many as the
    file holds: read, not refused as an alias bomb."""
    path = tmp_path / "long.yaml"
    path.write_text("name: long\nstages:\n" + "  - method: fastv\n    layers: [1]\n    params: {keep_ratio: 0.9}\n"
                    * 2000, encoding="utf-8")
    assert len(tokenpress.load_stack(path).stages) == 2000


def test_stages_in_an_order_that_runs_still_load() -> None:
    """The order check refuses only what cannot run: re-grids before selections, a re-grid after another,
    signals read first, a selection that keeps everything before a re-grid, decoder stages listed first."""
    for stages in (["pool", "random"], ["pool", "pool"], ["prumerge", "random"], [("visionzip", {"keep_ratio": 0.5}),
                                                                                  "fastv"],
                   [("random", {"keep_ratio": 1.0}), "pool"], ["fastv", "pool", "random"], ["pool", "qformer"]):
        spec = [{"method": s, "layers": [1]} if s == "fastv" else
                {"method": s[0], "params": s[1]} if isinstance(s, tuple) else {"method": s} for s in stages]
        tokenpress.load_stack({"name": "ok", "stages": spec})


def test_flops_refuses_an_impossible_order_in_the_same_sentence(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    case = next(c for c in CASES if c.id == "regrid_after_selection")
    path = write(tmp_path, case)
    assert main(["flops", str(path), "--config", "configs/llava-1.5-7b.json", "--text-tokens", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tokenpress: error: {path}: stages[1] (pool) cannot run after stages[0] (random)")


def test_layer_range_is_only_checked_against_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --model a stack cannot know the decoder depth: the out-of-range stack validates."""
    case = next(c for c in CASES if c.id == "layer_out_of_range")
    path = write(tmp_path, case)
    assert tokenpress.load_stack(path).stages[1].layers == (1, 4)
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_missing_and_directory_stack_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path, fragment in ((tmp_path / "nope.yaml", "no such stack file"), (tmp_path, "not a file")):
        with pytest.raises(tokenpress.StackError, match=fragment):
            tokenpress.load_stack(path)
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


VALID = """\
name: ordered
description: several stages at several points, in a deliberate order
positions: compact
stages:
  - method: pool
    params: {kernel: 2, mode: max}
  - method: random
    at: post_encoder
    params: {keep_ratio: 0.5, seed: 3}
  - method: fastv
    layers: [1]
    params: {keep_ratio: 0.5}
  - method: random
    at: query_conditioned
    params: {keep_ratio: 1.0}
  - method: random
    at: decoder_layer
    layers: [3, 1]
    params: {keep_ratio: 0.5}
"""


def test_valid_stack_keeps_yaml_order(tmp_path: Path) -> None:
    path = tmp_path / "ordered.yaml"
    path.write_text(VALID, encoding="utf-8")
    stack = tokenpress.load_stack(path)
    assert (stack.name, stack.positions, stack.source) == ("ordered", "compact", str(path))
    assert [(s.index, s.method, s.point, s.layers) for s in stack.stages] == [
        (0, "pool", "post_encoder", ()),
        (1, "random", "post_encoder", ()),
        (2, "fastv", "decoder_layer", (1,)),
        (3, "random", "query_conditioned", ()),
        (4, "random", "decoder_layer", (3, 1)),
    ]
    assert stack.stages[0].config.mode == "max" and stack.stages[1].config.seed == 3
    assert [s.index for s in stack.at("post_encoder")] == [0, 1]
    assert [s.index for s in stack.decoder_stages(1)] == [2, 4]
    assert [s.index for s in stack.decoder_stages(3)] == [4]


def test_valid_stack_runs_stages_of_one_point_in_yaml_order(tmp_path: Path, model: torch.nn.Module) -> None:
    """pool must run before random at post_encoder (pooling needs the full grid), fastv before random at layer 1."""
    path = tmp_path / "ordered.yaml"
    path.write_text(VALID, encoding="utf-8")
    batch = llava_batch(model, sample_prompts(1))
    with torch.no_grad(), tokenpress.compress(model, path) as handle:
        model(**batch)
        records = handle.report().as_dicts()
    seen = [(r["stage"].split(":")[0], r["layer"]) for r in records]
    assert seen == [("0", None), ("1", None), ("3", None), ("2", 1), ("4", 1), ("4", 3)]
    counts = [(r["tokens_in"][0], r["tokens_out"][0]) for r in records]
    assert counts[:2] == [(36, 9), (9, 4)]  # 6x6 patches -> 3x3 pooled -> round(4.5) = 4 kept
    for before, after in zip(counts, counts[1:], strict=False):
        assert after[0] == before[1]  # each stage sees what the previous one left


BAD_FOR_MODEL = [c for c in CASES if c.id in ("keep_ratio_zero", "layer_out_of_range", "unknown_method",
                                               "regrid_after_selection", "signals_after_a_regrid",
                                               "projector_replaced_twice", "layer_given_as_a_boolean")]


@pytest.mark.parametrize("case", BAD_FOR_MODEL, ids=lambda c: c.id)
def test_bad_stack_leaves_model_untouched(case: Bad, tmp_path: Path) -> None:
    model = tiny_llava()
    batch = llava_batch(model, sample_prompts(2))
    with torch.no_grad():
        before = model(**batch).logits
    model_attributes = set(model.__dict__)
    inner_attributes = set(model.model.__dict__)
    with pytest.raises(tokenpress.StackError):
        tokenpress.compress(model, write(tmp_path, case))
    assert "forward" not in model.model.__dict__
    assert "generate" not in model.__dict__
    assert set(model.__dict__) == model_attributes and set(model.model.__dict__) == inner_attributes
    assert tokenpress.attached_handle(model) is None
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    # and the failed attempt does not block a valid stack afterwards
    with tokenpress.compress(model, {"name": "ok", "stages": [{"method": "fastv", "layers": [2]}]}) as handle:
        assert "forward" in model.model.__dict__ and handle.attached
    assert "forward" not in model.model.__dict__
