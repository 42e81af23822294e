"""Analytical prefill FLOPs (tokenpress.core.flops) against torch's FlopCounterMode and FastV's published number.

* every tiny family x {empty, fastv K=2 R=50%, pool 2x2, random 25%, alvts, and the projector
  replacements pixel_unshuffle, ldp and qformer (their own modules, no model projector)}: the FLOPs
  counted during the real (compressed) prefill equal the analytical number from the measured token
  counts and from the config alone (LLaVA-NeXT: up to the projector work on padding slots, checked to the FLOP);
* the full-size LLaVA-1.5-7B parts, built on the meta device, match the formulas exactly;
* FastV's "45% fewer FLOPs" at K=2, R=50% is reproduced from the 7B config alone;
* ``tokenpress flops`` prints the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

import tokenpress
from tokenpress.core import flops
from tokenpress.core.errors import StackError, UnsupportedModelError
from tokenpress.core.method import Method, MethodConfig
from tokenpress.core.stack import Stack, Stage, load_stack
from tokenpress.families.llava.costs import llava_shapes
from tokenpress.runtime import compat
from tokenpress.runtime.loading import config_from_file
from tokenpress.testing.families import FAMILIES
from tokenpress.testing.models import IMAGE_TOKEN_ID, QWEN_IMAGE_TOKEN_ID, Prompt
from tokenpress.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_7B = ROOT / "configs" / "llava-1.5-7b.json"

STACKS = {
    "empty": [],
    "fastv": [{"method": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}],
    "pool": [{"method": "pool", "params": {"kernel": 2}}],
    "random": [{"method": "random", "params": {"keep_ratio": 0.25}}],
    "alvts": [{"method": "alvts", "params": {"keep_ratio": 0.25}}],  # routes at every layer, scoring included
    "alvts-full-rank": [{"method": "alvts", "params": {"keep_ratio": 0.25, "rank": 4096}}],  # rank clamped per q/k
    # replace the projector (not charged) with their own modules (counted)
    "pixel_unshuffle": [{"method": "pixel_unshuffle", "params": {"ratio": 2}}],
    "ldp": [{"method": "ldp", "params": {"stride": 2}}],
    "qformer": [{"method": "qformer", "params": {"queries": 6, "heads": 2}}],
    # inside the encoder: fewer tokens through its later blocks, the matching's similarities counted
    "tome": [{"method": "tome", "params": {"r": 5}}],
    "tome-keep": [{"method": "tome", "params": {"keep_ratio": 0.5}}],
    "folder": [{"method": "folder", "params": {"keep_ratio": 0.2}}],  # 16 -> 3 per tile: folded matchings
}
INSIDE_ENCODER = ("tome", "tome-keep", "folder")
PROMPT = Prompt([1, 5, 6, 7], [8, 9, 10, 11, 12])
#: Text tokens of a LLaVA-1.5 prompt: the vicuna_v1 chat template (system prompt, "USER:", "ASSISTANT:",
#: BOS: about 40 tokens) plus a short question (about 10).
LLAVA_PROMPT_TEXT_TOKENS = 50


def llava_1_5_config(size: str = "7b") -> LlavaConfig:
    """LLaVA-1.5 built by hand: CLIP ViT-L/14-336 + Vicuna (Llama) + 2-layer MLP projector (llava-hf's ids)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    hidden, layers, heads, intermediate = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def write_llava_1_5_config(path: Path, size: str = "7b") -> Path:
    """Save the hand-built LLaVA-1.5 config as one config.json file (what ``--config`` takes)."""
    llava_1_5_config(size).to_json_file(path)
    return path


# --- the tiny families against the flop counter ----------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: family.build("eager") for name, family in FAMILIES.items() if name in ("llava", "llava-next",
                                                                                         "qwen2.5-vl")}


def _image_size(family: str, batch: dict) -> tuple[int, int] | None:
    if family == "llava-next":
        return tuple(int(v) for v in batch["image_sizes"][0])
    if family == "qwen2.5-vl":
        return tuple(int(v) * 14 for v in batch["image_grid_thw"][0, 1:])
    return None


def _counted(model, batch: dict, stack: dict) -> tuple[int, flops.Costs]:
    """FLOPs counted by torch during the prefill (lm_head on the last position), and the measured-mode costs."""
    with torch.no_grad(), tokenpress.compress(model, stack) as handle:
        with FlopCounterMode(display=False) as counter:
            model(**batch, logits_to_keep=1, use_cache=False)
        costs = flops.measured_from_handle(handle, batch)
    return compat.counted_flops(counter), costs


#: LLaVA-NeXT's compressed path projects its two token rows (base tile, 4x4, and unpadded high-res
#: grid, 8x8 for a 64x64 image) padded to the wider row: these slots cost projector FLOPs that the
#: analytical model (valid tokens only) leaves out. Per stack: rows x widest row - real tokens.
NEXT_PADDING_SLOTS = {"empty": 0, "fastv": 2 * 64 - (16 + 64), "pool": 2 * 16 - (4 + 16), "random": 2 * 16 - (4 + 16),
                     "alvts": 2 * 64 - (16 + 64), "alvts-full-rank": 2 * 64 - (16 + 64),
                     "pixel_unshuffle": 0, "ldp": 0, "qformer": 0,
                     # a tile of 16 patches keeps 11 / 8 / 3: the base row that many, the 2x2 crops four times it
                     "tome": 2 * 44 - (11 + 44), "tome-keep": 2 * 32 - (8 + 32), "folder": 2 * 12 - (3 + 12)}


@pytest.mark.parametrize("stack_name", list(STACKS))
@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
def test_analytical_matches_flop_counter(models: dict, family: str, stack_name: str) -> None:
    model = models[family]
    batch = FAMILIES[family].batch(model, [PROMPT], "left", 0)
    stack = {"name": stack_name, "stages": STACKS[stack_name]}
    counted, costs = _counted(model, batch, stack)  # on Qwen2.5-VL, ToMe and FOLDER run after the encoder
    placeholders = torch.tensor([IMAGE_TOKEN_ID, QWEN_IMAGE_TOKEN_ID])
    text = int((~torch.isin(batch["input_ids"], placeholders)).sum())

    padding = 0.0
    if family == "llava-next":
        padding = NEXT_PADDING_SLOTS[stack_name] * llava_shapes(model.config)[0].projector_flops(1)
        if stack_name == "qformer":  # its queries also read the base row's padding slots (4x4 padded to 8x8)
            widths = flops.family_costs(model.config).widths()
            stage = load_stack(stack).stages[0]
            method = stage.method_class(stage.config, stage.layers)
            padded, real = (flops.stage_flops(method, [count], [6], widths)[0] for count in (64, 16))
            padding += padded - real
    assert costs.total == pytest.approx(counted - padding, rel=1e-9)  # mode (a): measured counts
    assert abs(costs.total / counted - 1) < 0.05

    if family == "llava-next" and stack_name == "random":  # which rows keep their newline is data-dependent
        with pytest.raises(flops.FlopsError, match=r"stage 0:random\(post_encoder\).*newline"):
            flops.simulate(model.config, stack, text, _image_size(family, batch))
        return
    if family == "llava-next" and stack_name in INSIDE_ENCODER:  # which merged tokens survive unpadding
        with pytest.raises(flops.FlopsError, match="unpadding"):
            flops.simulate(model.config, stack, text, _image_size(family, batch))
        return
    if family == "qwen2.5-vl" and stack_name == "tome":  # r per encoder block: the depth of a model, not a config
        with pytest.raises(flops.FlopsError, match="makes no promise"):
            flops.simulate(model.config, stack, text, _image_size(family, batch))
        return
    breakdown = flops.simulate(model.config, stack, text, _image_size(family, batch))  # mode (b): config only
    assert breakdown.compressed_flops == pytest.approx(counted - padding, rel=1e-9)
    assert abs(breakdown.compressed_flops / counted - 1) < 0.05
    assert breakdown.compressed == costs
    if stack_name == "empty":
        assert breakdown.baseline_flops == counted


def test_fastv_scoring_variants_and_batches(models: dict) -> None:
    """The scorer's own cost for query=text / score_layer=current at layers 0 and 2, on a batch of two."""
    model = models["llava"]
    prompts = [Prompt([1, 5, 6, 7], [8, 9, 10, 11, 12]), Prompt([1, 15, 16, 17], [18, 19, 20, 21, 22])]
    batch = FAMILIES["llava"].batch(model, prompts, "left", 0)  # equal lengths: no padding to count
    stack = {"name": "fastv-text", "stages": [{"method": "fastv", "layers": [0, 2],
                                               "params": {"keep_ratio": 0.5, "query": "text",
                                                          "score_layer": "current"}}]}
    counted, costs = _counted(model, batch, stack)
    assert costs.total == pytest.approx(counted, rel=1e-9)
    assert costs.scoring > 0
    text = int((batch["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    assert 2 * flops.simulate(model.config, stack, text).compressed_flops == pytest.approx(counted, rel=1e-9)


def test_stage_savings_add_up(models: dict) -> None:
    stack = {"name": "pool-then-fastv", "stages": [STACKS["pool"][0], STACKS["fastv"][0]]}
    breakdown = flops.simulate(models["llava"].config, stack, 9)
    assert [(s.label, s.layer, s.tokens_in, s.tokens_out) for s in breakdown.stages] == [
        ("0:pool(post_encoder)", None, 36, 9), ("1:fastv(decoder_layer@2)", 2, 9, 4)]
    assert sum(s.flops_saved for s in breakdown.stages) == pytest.approx(
        breakdown.baseline_flops - breakdown.compressed_flops)
    assert breakdown.stages[1].scoring_flops > 0
    assert breakdown.layer_tokens == [18, 18, 13, 13] and breakdown.baseline_layer_tokens == [45] * 4


# --- full size: LLaVA-1.5-7B from its config ----------------------------------------------------------------


def test_full_size_parts_match_flop_counter_on_meta() -> None:
    """Each part of the 7B model, built without weights on the meta device, costs what the formulas say."""
    from transformers import CLIPVisionModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = llava_1_5_config("7b")
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    encoder, decoder = llava_shapes(config)
    tokens = LLAVA_PROMPT_TEXT_TOKENS + 576
    with torch.device("meta"):
        tower, projector = CLIPVisionModel(config.vision_config), LlavaMultiModalProjector(config)
        layer, rotary = LlamaDecoderLayer(config.text_config, 0), LlamaRotaryEmbedding(config.text_config)
        hidden, positions = torch.zeros(1, tokens, 4096), torch.arange(tokens).unsqueeze(0)
        parts = [
            (lambda: tower(torch.zeros(1, 3, 336, 336), output_hidden_states=True), encoder.encoder_flops(576)),
            (lambda: projector(torch.zeros(1, 576, 1024)), encoder.projector_flops(576)),
            (lambda: layer(hidden, attention_mask=None, position_ids=positions,
                           position_embeddings=rotary(hidden, positions)), decoder.layer_flops(tokens)),
        ]
        for run, expected in parts:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                run()
            assert compat.counted_flops(counter) == expected


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_fastv_published_reduction_from_config_alone(size: str) -> None:
    """FastV (K=2, R=50%) reports ~45% fewer prefill FLOPs, counting decoder layers only (its Sec. 4.2)."""
    breakdown = flops.simulate(llava_1_5_config(size), ROOT / "stacks" / "fastv.yaml", LLAVA_PROMPT_TEXT_TOKENS)
    assert breakdown.visual_tokens == 576
    assert breakdown.layer_tokens[:2] == [626, 626] and set(breakdown.layer_tokens[2:]) == {338}
    decoder = breakdown.decoder_only
    assert abs((1 - decoder["ratio"]) - 0.45) <= 0.02
    assert abs((1 - decoder["paper_formula_ratio"]) - 0.45) <= 0.02
    # the whole model saves less: the encoder (~0.38 TFLOPs) and projector still see all 576 tokens
    full = 1 - breakdown.ratio
    assert 0.38 < full < 1 - decoder["ratio"]
    assert breakdown.compressed.encoder == breakdown.baseline.encoder == pytest.approx(381_918_216_192)
    if size == "7b":
        assert round(1 - decoder["ratio"], 3) == 0.437 and round(full, 3) == 0.414


def test_shipped_7b_config_is_the_hand_built_one(tmp_path: Path) -> None:
    written = write_llava_1_5_config(tmp_path / "config.json")
    stack = ROOT / "stacks" / "pool-then-fastv.yaml"
    ours = flops.simulate(config_from_file(written), stack, 58).as_dict()
    shipped = flops.simulate(config_from_file(SHIPPED_7B), stack, 58).as_dict()
    assert ours == shipped


# --- errors -------------------------------------------------------------------------------------------------


class _AdaptiveConfig(MethodConfig):
    threshold: float = Field(0.5)


class _Adaptive(Method):
    """A method that keeps however many tokens pass a threshold: no promise."""

    name = "adaptive"
    Config = _AdaptiveConfig
    points = ("post_encoder",)


def test_errors(models: dict) -> None:
    config = models["llava"].config
    adaptive = Stack("adaptive", "original", (Stage(0, "adaptive", _Adaptive, "post_encoder", (), _AdaptiveConfig()),))
    with pytest.raises(flops.FlopsError, match=r"stage 0:adaptive\(post_encoder\).*no promise"):
        flops.simulate(config, adaptive, 10)
    with pytest.raises(StackError, match="layer 7 is out of range.*4 decoder layers"):
        flops.simulate(config, {"name": "x", "stages": [{"method": "fastv", "layers": [7]}]}, 10)
    with pytest.raises(StackError, match=r"stages\[1\] \(pool\) cannot run after stages\[0\] \(random\)"):
        flops.simulate(config, {"name": "x", "stages": [STACKS["random"][0], STACKS["pool"][0]]}, 10)
    with pytest.raises(flops.FlopsError, match="LLaVA-NeXT.*image"):
        flops.simulate(models["llava-next"].config, {"name": "x", "stages": []}, 10)
    with pytest.raises(flops.FlopsError, match="multiples of 28"):
        flops.simulate(models["qwen2.5-vl"].config, {"name": "x", "stages": []}, 10, (100, 112))
    with pytest.raises(UnsupportedModelError, match="llava.*llava_next.*qwen2_5_vl.*'llama'"):
        flops.simulate(config.text_config, {"name": "x", "stages": []}, 10)


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_flops_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_llava_1_5_config(tmp_path / "llava-7b.json")
    stack = str(ROOT / "stacks" / "fastv.yaml")
    assert main(["flops", stack, "--config", str(path), "--text-tokens", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = flops.simulate(llava_1_5_config(), stack, 50)
    assert data["baseline_flops"] == expected.baseline_flops
    assert data["compressed_flops"] == expected.compressed_flops
    assert data["ratio"] == pytest.approx(expected.ratio)
    assert data["decoder_only"]["ratio"] == pytest.approx(0.563, abs=5e-4)
    assert [(s["label"], s["layer"], s["tokens_in"], s["tokens_out"]) for s in data["stages"]] == [
        ("0:fastv(decoder_layer@2)", 2, 576, 288)]
    assert data["stages"][0]["flops_saved"] == pytest.approx(expected.baseline_flops - expected.compressed_flops)


def test_cli_flops_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", str(ROOT / "stacks" / "pool-then-fastv.yaml"), "--config", str(SHIPPED_7B),
                 "--text-tokens", "50"]) == 0
    out = capsys.readouterr().out
    assert "0:pool(post_encoder)" in out and "1:fastv(decoder_layer@2) layer 2" in out
    assert "576" in out and "144" in out and "72" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "missing.json", "--text-tokens", "5"], "missing.json: no such config file"),
    (["--config", "{shipped}", "--text-tokens", "-1"], "--text-tokens must be >= 0"),
    (["--config", "{shipped}", "--text-tokens", "5", "--image-size", "big"], "expected HEIGHTxWIDTH"),
    (["--config", "{bad}", "--text-tokens", "5"], "not a readable JSON config"),
])
def test_cli_flops_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    args = [arg.format(shipped=SHIPPED_7B, bad=bad) for arg in args]
    assert main(["flops", str(ROOT / "stacks" / "fastv.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("layers", [[1], [1, 2, 3]])
def test_a_route_is_counted_at_its_own_layer_only(models: dict, layers: list[int]) -> None:
    """A routed layer processes its routed tokens; the next layer gets every token back."""
    model = models["llava"]
    batch = FAMILIES["llava"].batch(model, [PROMPT], "left", 0)
    stack = {"name": "route", "stages": [{"method": "alvts", "layers": layers, "params": {"keep_ratio": 0.5}}]}
    counted, costs = _counted(model, batch, stack)
    with torch.no_grad(), tokenpress.compress(model, stack) as handle:
        model(**batch, use_cache=False)
        measured_tokens = [per_layer[0] for per_layer in handle.prefill_stats.layer_tokens]
    text = len(PROMPT.before) + len(PROMPT.after)
    expected = [text + (18 if layer in layers else 36) for layer in range(4)]
    assert measured_tokens == expected
    breakdown = flops.simulate(model.config, stack, text)
    assert breakdown.layer_tokens == expected
    assert breakdown.compressed_flops == pytest.approx(counted, rel=1e-9)
    assert breakdown.compressed == costs
