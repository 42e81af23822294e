"""Bad input that used to hurt: every case is exit code 2 and one line on stderr, never a traceback,
and the model (where there is one) is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenpress
from tokenpress.data import shapes
from tokenpress.measure import evaluate
from tokenpress.testing import Prompt, llava_batch, tiny_qwen2_5_vl
from tokenpress.tools.cli import main

FASTV = "name: fastv\nstages:\n  - method: fastv\n    layers: [1]\n    params: {keep_ratio: 0.5}\n"
CLS = "name: cls\nstages:\n  - method: test-cls-keep\n"
MAX_LINE = 300


def one_line(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and len(lines[0]) <= MAX_LINE, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stacks") / "fastv.yaml"
    path.write_text(FASTV, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    good = folder / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    files = {"empty": folder / "empty.png", "text": folder / "notes.png", "truncated": folder / "truncated.png",
             "wide": folder / "wide.png", "good": good}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a picture", encoding="utf-8")
    files["truncated"].write_bytes(good.read_bytes()[:60])
    Image.new("RGB", (1000, 2), (30, 30, 200)).save(files["wide"])  # aspect ratio 500
    return files


@pytest.fixture(scope="module")
def text_only_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_viz_and_run_refuse_an_unreadable_image_in_one_line(kind: str, stack: Path, checkpoint: Path,
                                                             pictures: dict[str, Path], capsys, tmp_path) -> None:
    image = str(pictures[kind])
    assert main(["viz", str(stack), "--image", image, "--model", str(checkpoint), "-o", str(tmp_path / "v.png")]) == 2
    one_line(capsys, image, "not a readable image")
    assert not (tmp_path / "v.png").exists()
    assert main(["run", str(stack), "--model", str(checkpoint), "--image", image, "--prompt", "w5"]) == 2
    one_line(capsys, image, "not a readable image")


@pytest.mark.parametrize("command", ["run", "viz"])
def test_a_processor_refusing_the_image_is_one_sentence(command: str, stack: Path, pictures: dict[str, Path],
                                                        capsys, tmp_path) -> None:
    """Qwen2.5-VL's processor refuses aspect ratios above 200."""
    image = str(pictures["wide"])
    argv = {"run": ["run", str(stack), "--model", "zoo:qwen2.5-vl-shapes", "--image", image, "--prompt", "describe"],
            "viz": ["viz", str(stack), "--model", "zoo:qwen2.5-vl-shapes", "--image", image,
                    "-o", str(tmp_path / "v.png")]}[command]
    assert main(argv) == 2
    one_line(capsys, image, "the model's processor refuses it", "aspect ratio")


@pytest.mark.parametrize("command", ["eval", "viz", "run", "validate"])
def test_a_text_only_model_is_one_sentence(command: str, stack: Path, text_only_model: Path,
                                           pictures: dict[str, Path], capsys, tmp_path) -> None:
    model = str(text_only_model)
    argv = {"eval": ["eval", str(stack), "--model", model, "--n", "2", "--quiet"],
            "viz": ["viz", str(stack), "--model", model, "--image", str(pictures["good"]), "-o", str(tmp_path / "v")],
            "run": ["run", str(stack), "--model", model, "--image", str(pictures["good"]), "--prompt", "x"],
            "validate": ["validate", str(stack), "--model", model]}[command]
    assert main(argv) == 2
    one_line(capsys, model, "'llama'")


@pytest.mark.parametrize("n, fragment", [("0", "must be at least 1"), ("-3", "must be at least 1"),
                                         ("many", "whole number"), ("100000000", "the test split has 1000")])
def test_eval_refuses_a_question_count_outside_the_split(n: str, fragment: str, stack: Path, capsys) -> None:
    assert main(["eval", str(stack), "--n", n, "--quiet"]) == 2
    one_line(capsys, fragment)


def test_evaluate_makes_the_questions_batch_by_batch(checkpoint: Path, monkeypatch) -> None:
    """A large --n must not build every sample (images included) before the first batch runs."""
    made: list[int] = []
    seen_at_batch: list[int] = []
    real_make = shapes.make_sample
    real_process = evaluate.process

    def make(split, index, seed=0, family=None):
        made.append(index)
        return real_make(split, index, seed, family)

    def process(processor, images, text, **kwargs):
        seen_at_batch.append(len(made))
        return real_process(processor, images, text, **kwargs)

    monkeypatch.setattr(shapes, "make_sample", make)
    monkeypatch.setattr(evaluate, "process", process)
    rows = evaluate.evaluate([FASTV_STACK], model=str(checkpoint), n=6, batch_size=2, progress=False)
    assert seen_at_batch == [2, 4, 6] and made == list(range(6))
    assert [row.stack for row in rows] == ["baseline", "fastv"]


FASTV_STACK = {"name": "fastv", "stages": [{"method": "fastv", "layers": [1], "params": {"keep_ratio": 0.5}}]}


def test_run_refuses_zero_new_tokens(stack: Path, checkpoint: Path, pictures: dict[str, Path], capsys) -> None:
    argv = ["run", str(stack), "--model", str(checkpoint), "--image", str(pictures["good"]), "--prompt", "w5",
            "--max-new-tokens", "0"]
    assert main(argv) == 2
    one_line(capsys, "--max-new-tokens", "must be at least 1")


@torch.no_grad()
def test_compress_names_what_a_stack_can_be(llava_eager) -> None:
    batch = llava_batch(llava_eager, [Prompt([1, 5], [6, 7])])
    before = llava_eager(**batch).logits
    for bad in (42, 1.5, ["fastv"], None):
        with pytest.raises(tokenpress.StackError) as info:
            tokenpress.compress(llava_eager, bad)
        message = str(info.value)
        assert message.startswith("a stack is a path to a YAML file, a mapping or a tokenpress.Stack, not a ")
        assert "\n" not in message
    assert "forward" not in llava_eager.model.__dict__ and "generate" not in llava_eager.__dict__
    assert tokenpress.attached_handle(llava_eager) is None
    assert torch.equal(llava_eager(**batch).logits, before)


class ClsKeep(tokenpress.Method):
    """Test method: asks for the CLS attention of the penultimate encoder layer, changes nothing."""

    name = "test-cls-keep"
    Config = tokenpress.MethodConfig
    points = ("post_encoder",)

    def required_signals(self) -> dict:
        return {"cls_attention": -2}

    @tokenpress.hookimpl
    def post_encoder(self, tokens, context):
        return tokens


@pytest.fixture
def cls_plugin():
    class Plugin:
        @tokenpress.hookimpl
        def tokenpress_register_methods(self):
            return [ClsKeep]

    tokenpress.get_registry().register_plugin(Plugin(), name="test-cls-plugin")
    yield
    tokenpress.get_registry(reload=True)


def test_validate_checks_what_attaching_checks(cls_plugin, tmp_path: Path, capsys) -> None:
    """A signal the family cannot give: validate --model says so, as compress() does, in the same words."""
    stack = tmp_path / "cls.yaml"
    stack.write_text(CLS, encoding="utf-8")
    model = tiny_qwen2_5_vl()
    model.config.save_pretrained(tmp_path / "qwen")
    assert main(["validate", str(stack), "--model", str(tmp_path / "qwen")]) == 2
    line = one_line(capsys, f"{stack}: stages[0] (test-cls-keep)", "'cls_attention'")
    with pytest.raises(tokenpress.UnsupportedModelError) as info:
        tokenpress.compress(model, stack)
    assert line == f"tokenpress: error: {info.value}"
    assert tokenpress.attached_handle(model) is None and "forward" not in model.model.__dict__
