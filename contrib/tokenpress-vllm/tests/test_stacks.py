"""What vLLM can serve, decided before any engine starts: refusals in one sentence, placeholder counts, the
folder vLLM loads, and the command line (no engine here: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reference import POOL, stack

import tokenpress_vllm
from tokenpress.core.stack import load_stack
from tokenpress.runtime.loading import load_config, resolve_model_path
from tokenpress_vllm.__main__ import main
from tokenpress_vllm.stacks import NotServable, check_servable, image_layout

LLAVA = "zoo:llava-shapes"
QWEN = "zoo:qwen2.5-vl-shapes"
STACK_FILES = Path(__file__).resolve().parents[3] / "stacks"


@pytest.mark.parametrize(("stages", "positions", "why"), [
    ([{"method": "fastv", "layers": [2]}], "original", "stage 0:fastv(decoder_layer@2): vLLM runs its own decoder "
     "layers, so tokenpress can serve only stages that act before the LLM (post_encoder, projector)"),
    ([{"method": "random", "at": "query_conditioned"}], "compact", "stage 0:random(query_conditioned): random reads "
     "the prompt, and vLLM encodes (and caches) each image apart from its prompt"),
    ([{"method": "prumerge"}], "compact", "stage 0:prumerge(post_encoder): prumerge keeps a number of tokens that "
     "depends on the image's content, and vLLM fixes each image's placeholder count before the image is encoded"),
    ([{"method": "random", "params": {"keep_ratio": 0.5}}], "original", "vLLM numbers an image's placeholders one "
     "after another, so a stack whose stages drop or merge tokens of the grid must say `positions: compact`"),
])
def test_a_stack_vllm_cannot_serve_is_refused_in_one_sentence(stages, positions, why):
    with pytest.raises(NotServable) as refused:
        tokenpress_vllm.hf_overrides(LLAVA, stack("refused", *stages, positions=positions))
    message = str(refused.value)
    assert message.startswith("stack 'refused': ") and why in message and "\n" not in message


def test_a_class_token_method_is_served_on_qwen_by_the_attention_each_patch_receives():
    """Qwen2.5-VL's ViT has no class token: VisionZip asks for the class token's attention with its authors'
    fallback, the attention each patch receives, which the family serves (checked against the model)."""
    zipped = stack("zip", {"method": "visionzip", "params": {"keep_ratio": 0.25}}, positions="compact")
    assert tokenpress_vllm.hf_overrides(QWEN, zipped)


def test_llava_next_selection_is_refused_because_its_newlines_depend_on_the_survivors():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                                            num_attention_heads=4, num_hidden_layers=2),
                             text_config=LlamaConfig(num_hidden_layers=2), vision_feature_layer=-2,
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    chosen = load_stack(stack("keep", {"method": "random", "params": {"keep_ratio": 0.5}}, positions="compact"))
    with pytest.raises(NotServable, match="image-newline tokens depends on which tokens survive"):
        check_servable(chosen, config)
    pooled = check_servable(load_stack(POOL), config)
    # base tile 4x4 -> 2x2, high resolution 4x8 -> 2x4 with a newline after each of its 2 rows
    assert image_layout(pooled, config, (32, 64)).count == 4 + 2 * 5


@pytest.mark.parametrize(("name", "count", "kind"), [
    ("pool.yaml", 36, "grid"), ("ldp.yaml", 36, "grid"), ("pixel-unshuffle.yaml", 36, "grid"),
    ("qformer.yaml", 32, "summary"),
])
def test_placeholder_counts_come_from_the_stack(name, count, kind):
    config = load_config(LLAVA)
    layout = image_layout(check_servable(load_stack(STACK_FILES / name), config), config, None)
    assert (layout.count, layout.kind) == (count, kind)


def test_each_request_may_choose_another_of_the_servers_stacks():
    overrides = tokenpress_vllm.hf_overrides(LLAVA, {"pool": POOL, "none": stack("none")}, default="none")
    assert overrides["architectures"] == ["TokenpressLlavaForConditionalGeneration"]
    assert list(overrides["tokenpress"]["stacks"]) == ["pool", "none"] and overrides["tokenpress"]["default"] == "none"


def test_the_served_folder_is_a_copy_where_vllm_needs_one_and_the_zoo_is_untouched():
    zoo = resolve_model_path(QWEN)
    before = sorted(path.name for path in zoo.iterdir())
    served = Path(tokenpress_vllm.serving_checkpoint(QWEN))
    assert served != zoo and (served / "video_preprocessor_config.json").is_file()
    assert sorted(path.name for path in zoo.iterdir()) == before
    # the methods' weight files beside the model would be read by vLLM as model weights
    assert [path.name for path in served.glob("*.safetensors")] == ["model.safetensors"]
    assert json.loads((served / "video_preprocessor_config.json").read_text())["merge_size"] == 2


def test_the_command_line_prints_the_serve_command_or_refuses(capsys):
    assert main([LLAVA, str(STACK_FILES / "pool.yaml"), "--json"]) == 0
    overrides = json.loads(capsys.readouterr().out)
    assert list(overrides["tokenpress"]["stacks"]) == ["pool-2x2"]
    assert main([LLAVA, str(STACK_FILES / "fastv.yaml")]) == 2
    assert "fastv.yaml: stage 0:fastv(decoder_layer@2): vLLM runs its own decoder layers" in capsys.readouterr().err
