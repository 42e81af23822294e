"""The shipped zoo checkpoints: plain offline loading, their processors, and model cards that
``tokenpress eval`` reproduces."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

import tokenpress  # noqa: E402
from tokenpress.core.errors import InputError  # noqa: E402
from tokenpress.data import shapes  # noqa: E402
from tokenpress.runtime import compat  # noqa: E402
from tokenpress.tools import zoo_card as card  # noqa: E402
from tokenpress.tools.zoo_train import Encoder, greedy_answers, train  # noqa: E402
from tokenpress.zoo import ZOO_DIR, ZOO_NAMES, zoo_path  # noqa: E402

#: name -> (model class, visual tokens per image, the training recipe's architecture)
MODELS = {
    "llava-shapes": (LlavaForConditionalGeneration, 144, "llava"),
    "qwen2.5-vl-shapes": (Qwen2_5_VLForConditionalGeneration, 36, "qwen"),
    "llava-shapes-deep": (LlavaForConditionalGeneration, 144, "llava"),
}
N_QUESTIONS = 50


@pytest.fixture(scope="module", params=sorted(MODELS))
def loaded(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, object]:
    name = request.param
    cls = MODELS[name][0]
    path = zoo_path(name)
    model = cls.from_pretrained(path, **compat.PRETRAINED_OPTIONS).eval()
    processor = AutoProcessor.from_pretrained(path)
    return name, model, processor


def _texts(processor: object, samples: list[shapes.Sample]) -> list[str]:
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for s in samples
    ]


def test_zoo_path_resolves_names() -> None:
    assert set(ZOO_NAMES) == set(MODELS)
    assert zoo_path("zoo:llava-shapes") == zoo_path("llava-shapes") == ZOO_DIR / "llava-shapes"
    with pytest.raises(ValueError, match="llava-shapes"):
        zoo_path("zoo:nonexistent")


def test_checkpoint_files_and_size() -> None:
    total = 0
    for name in MODELS:
        folder = zoo_path(name)
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
            "generation_config.json",
            card.CARD_FILE,
            card.EVAL_FILE,
            card.TRAINING_FILE,
        ):
            assert (folder / f).is_file(), f"{name}: missing {f}"
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        assert size <= 20 * 1024 * 1024, f"{name} takes {size / 1e6:.1f} MB"
        total += size
        text = (folder / card.CARD_FILE).read_text()
        assert f"Visual tokens per image: **{MODELS[name][1]}**" in text
        assert f"tokenpress zoo train {name} --out DIR --seed 0" in text
    assert total <= 40 * 1024 * 1024, f"checkpoints take {total / 1e6:.1f} MB"


def test_processor_builds_model_inputs(loaded: tuple[str, torch.nn.Module, object]) -> None:
    name, model, processor = loaded
    n_visual = MODELS[name][1]
    assert model.dtype == torch.float32
    samples = shapes.generate_split("test", 3)
    texts = _texts(processor, samples)
    image_token = processor.image_token
    arch = MODELS[name][2]
    image_text = "<image>" if arch == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    assert texts == [shapes.build_prompt(s.question, image_text) for s in samples]
    assert image_token in image_text
    inputs = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    assert image_id == (model.config.image_token_index if arch == "llava" else model.config.image_token_id)
    assert ((inputs["input_ids"] == image_id).sum(1) == n_visual).all()
    # The training code builds the same token sequences and pixels as the processor.
    encoder = Encoder(arch, processor, model.config)
    for row, mask, s in zip(inputs["input_ids"], inputs["attention_mask"], samples, strict=True):
        assert row[mask.bool()].tolist() == encoder.prefix + encoder.words(s.question)
    assert torch.allclose(inputs["pixel_values"], encoder.pixels([s.image for s in samples])["pixel_values"])


def test_plain_generate_answers_test_questions(loaded: tuple[str, torch.nn.Module, object]) -> None:
    """Plain transformers (processor + generate, no tokenpress) answers the benchmark."""
    name, model, processor = loaded
    samples = shapes.generate_split("test", N_QUESTIONS)
    inputs = processor(
        images=[s.image for s in samples], text=_texts(processor, samples), return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    result = shapes.score(answers, samples)
    assert result["accuracy"] >= 0.8, result
    # The validation used during training gives the same answers.
    encoder = Encoder(MODELS[name][2], processor, model.config)
    ours = greedy_answers(model, encoder, samples, max_new_tokens=3)
    assert [shapes.normalize_answer(a) for a in ours] == [shapes.normalize_answer(a) for a in answers]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_card_meets_the_quality_bars(name: str) -> None:
    """What the card reports: >= 90% uncompressed on >= 1000 questions; a random 11% costs >= 20 points."""
    rows = {row.stack: row for row in card.load_rows(zoo_path(name))}
    measured = json.loads((zoo_path(name) / card.EVAL_FILE).read_text())
    assert measured["n"] >= 1000 and measured["split"] == "test"
    assert list(rows) == ["baseline", "random-50", "random-25", "random-11"]
    assert rows["baseline"].accuracy >= 0.90
    assert rows["baseline"].accuracy - rows["random-11"].accuracy >= 0.20
    assert rows["random-11"].tokens_kept == pytest.approx(0.11, abs=0.01)
    text = (zoo_path(name) / card.CARD_FILE).read_text()
    assert card.accuracy_table(list(rows.values())) in text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tokenpress_eval_on_an_empty_stack_reproduces_the_card(name: str, tmp_path: Path) -> None:
    from tokenpress.tools.cli import main

    n = json.loads((zoo_path(name) / card.EVAL_FILE).read_text())["n"]
    out = tmp_path / "rows.json"
    argv = ["eval", "stacks/empty.yaml", "--model", f"zoo:{name}", "--n", str(n), "--quiet", "--json", str(out)]
    assert main(argv) == 0
    baseline, empty = json.loads(out.read_text())
    shipped = card.load_rows(zoo_path(name))[0]
    for row in (baseline, empty):
        assert (row["accuracy"], row["per_family"]) == (shipped.accuracy, shipped.per_family)


def test_viz_on_the_default_model_takes_any_picture(tmp_path: Path) -> None:
    """`tokenpress viz` defaults to zoo:llava-shapes; a photo of another size is resized to 96x96."""
    from PIL import Image

    from tokenpress.tools.cli import main

    picture = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), "blue").save(picture)
    out = tmp_path / "viz.png"
    assert main(["viz", "stacks/pool-then-fastv.yaml", "--image", str(picture), "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height


def test_train_smoke(tmp_path: Path) -> None:
    metrics = train("zoo:qwen2.5-vl-shapes", tmp_path / "q", steps=2, progress=False, tiny=True)
    assert metrics["visual_tokens"] == 36
    assert json.loads((tmp_path / "q" / card.TRAINING_FILE).read_text())["recipe"]["steps"] == 2
    assert [row.stack for row in card.load_rows(tmp_path / "q")] == ["baseline", "random-50", "random-25", "random-11"]
    assert "| random-11 | 11% |" in (tmp_path / "q" / card.CARD_FILE).read_text()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "q", **compat.PRETRAINED_OPTIONS)
    assert model.dtype == torch.float32
    with pytest.raises(ValueError, match="available"):
        train("nope", tmp_path / "x", steps=1)


def test_training_on_the_cpu_is_repeatable_from_the_seed(tmp_path: Path) -> None:
    """Same seed, same weights bit for bit; another seed, other weights (the data stream too)."""
    from safetensors.torch import load_file

    def weights(seed: int, folder: str) -> dict[str, torch.Tensor]:
        train("llava-shapes", tmp_path / folder, seed=seed, steps=3, progress=False, tiny=True, device="cpu",
              measure=False)
        return load_file(tmp_path / folder / "model.safetensors")

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert shapes.training_scene(0, seed=0) != shapes.training_scene(0, seed=1)


def test_zoo_train_refuses_an_unknown_recipe_field(capsys: pytest.CaptureFixture[str]) -> None:
    """`--set` names a Recipe field; a typo is one line and exit 2, before any training."""
    from tokenpress.tools.cli import main

    assert main(["zoo", "train", "llava-shapes", "--out", "unused", "--set", "text_layer=6"]) == 2
    expected = "tokenpress: error: --set text_layer=6: the recipe has no field 'text_layer'"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("size", [(96, 96), (160, 90)])
def test_viz_draws_the_input_image_under_the_patches(name: str, size: tuple[int, int], tmp_path: Path) -> None:
    """The panel's background is the input picture resized as the processor resizes it (on Qwen2.5-VL
    it is rebuilt from the flattened patches, not one patch drawn as if it were the image)."""
    import numpy as np
    from PIL import Image

    from tokenpress.tools.viz import TITLE, panel_size, visualize

    width, height = size
    picture = Image.new("RGB", size, (30, 30, 30))
    picture.paste((230, 40, 40), (0, 0, width // 2, height // 2))
    picture.paste((40, 210, 60), (width // 2, height // 2, width, height))
    picture.paste((60, 80, 220), (0, height // 2, width // 2, height))
    source = tmp_path / "in.png"
    picture.save(source)
    out = visualize("stacks/empty.yaml", source, tmp_path / "viz.png", model=f"zoo:{name}")
    processor = AutoProcessor.from_pretrained(zoo_path(name))
    seen = processor.image_processor(images=[picture], return_tensors="np")
    grid = seen.get("image_grid_thw")
    if grid is not None:  # Qwen2.5-VL: the resized size is the patch grid times the patch size
        patch = processor.image_processor.patch_size
        resized = (int(grid[0][2]) * patch, int(grid[0][1]) * patch)
    else:
        resized = tuple(seen["pixel_values"].shape[-1:-3:-1])
    panel_height, panel_width = panel_size(resized[1], resized[0])  # the picture's proportions kept
    with Image.open(out) as image:
        panel = np.asarray(image.convert("RGB"))[TITLE:TITLE + panel_height, :panel_width].astype(int)
    expected = np.asarray(picture.resize(resized, Image.BICUBIC).resize((panel_width, panel_height),
                                                                        Image.NEAREST)).astype(int)
    difference = np.abs(panel - expected)
    assert difference.mean() < 3 and np.quantile(difference, 0.95) < 8, (difference.mean(), difference.max())


@torch.no_grad()
def test_the_shipped_alvts_selector_belongs_to_its_model(loaded: tuple[str, torch.nn.Module, object]) -> None:
    import tokenpress
    from tokenpress.core import weights
    from tokenpress.core.errors import InputError

    name, model, processor = loaded
    header = weights.read_header(zoo_path(name) / "alvts.safetensors")["calibration"]
    layers = model.config.get_text_config().num_hidden_layers
    assert header["layers"] == list(range(layers)) and header["samples"] == 256
    assert header["rank"] == model.config.get_text_config().hidden_size // 16
    # calibrated: the held-out top-k overlap with the exact score rose at every layer
    assert all(row["overlap_calibrated"] > row["overlap_svd"] for row in header["fidelity"])
    stack = {"name": "a", "stages": [{"method": "alvts", "params": {"keep_ratio": 0.11, "weights": "zoo"}}]}
    with tokenpress.compress(model, stack) as handle:
        assert handle.entries[0].method.weights.rank == header["rank"]
    other = next(n for n in MODELS if n != name)
    stack["stages"][0]["params"]["weights"] = f"zoo:{other}"
    with pytest.raises(InputError, match="made for another model"):
        tokenpress.compress(model, stack)


def _train_until_interrupted(monkeypatch: pytest.MonkeyPatch, step: int, *args: object, **kwargs: object) -> None:
    """Run ``train(*args, **kwargs)`` and stop it with a KeyboardInterrupt during (1-based) ``step``."""
    from tokenpress.tools import zoo_train as training

    real_loss, calls = training._loss_and_stats, []

    def interrupted(*loss_args: object, **loss_kwargs: object) -> object:
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_loss(*loss_args, **loss_kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_loss_and_stats", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(*args, **kwargs)


def test_an_interrupted_training_run_resumes_to_the_same_weights(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after an evaluation and resumed with --resume ends bit for bit where an uninterrupted
    run ends (the state is saved at every evaluation; the batches depend on the step alone)."""
    from safetensors.torch import load_file

    from tokenpress.tools import zoo_train as training

    options = {"seed": 0, "steps": 5, "progress": False, "tiny": True, "device": "cpu", "measure": False,
               "overrides": {"eval_every": 2}}
    train("llava-shapes", tmp_path / "whole", **options)
    # stopped during step 4: the state of step 2 is on disk
    _train_until_interrupted(monkeypatch, 4, "llava-shapes", tmp_path / "resumed", **options)
    assert (tmp_path / "resumed" / training.STATE_FILE).is_file()
    train("llava-shapes", tmp_path / "resumed", resume=True, **options)
    whole, resumed = (load_file(tmp_path / folder / "model.safetensors") for folder in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    history = [json.loads((tmp_path / f / card.TRAINING_FILE).read_text())["history"] for f in ("whole", "resumed")]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]] == [2, 4, 5]
    assert not (tmp_path / "resumed" / training.STATE_FILE).exists()  # a finished run leaves nothing to resume
    with pytest.raises(InputError, match="no train-state.pt to resume from"):
        train("llava-shapes", tmp_path / "fresh", resume=True, **options)


def test_a_resumed_run_may_change_its_length_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume with other --steps continues the saved run on the new schedule and records where it changed;
    any other change of the recipe, or a length the run has already passed, is refused."""

    options = {"seed": 0, "progress": False, "tiny": True, "device": "cpu", "measure": False,
               "overrides": {"eval_every": 2}}
    # stopped during step 5: the state of step 4 is on disk
    _train_until_interrupted(monkeypatch, 5, "llava-shapes", tmp_path, steps=5, **options)
    with pytest.raises(InputError, match="saved at step 4; --steps 4 would end it before that"):
        train("llava-shapes", tmp_path, steps=4, resume=True, **options)
    with pytest.raises(InputError, match="another recipe or seed"):
        train("llava-shapes", tmp_path, steps=7, resume=True, **{**options, "overrides": {"eval_every": 3}})
    metrics = train("llava-shapes", tmp_path, steps=7, resume=True, **options)
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6, 7]
    assert metrics["recipe"]["steps"] == 7
    assert metrics["schedule_changes"] == [{"at_step": 4, "steps_before": 5, "steps_after": 7}]
    assert "resumed after step 4 with 7 steps instead of 5" in card.resumed_note(metrics)


def _package_files() -> dict[str, bytes]:
    root = Path(tokenpress.__file__).parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("argv", [
    ["zoo", "train", "llava-shapes", "--out", "{zoo}/llava-shapes", "--steps", "2"],
    ["zoo", "train", "llava-shapes", "--out", "{zoo}", "--steps", "2"],
    ["zoo", "card", "zoo:llava-shapes", "--n", "5"],
    ["zoo", "card", "zoo:qwen2.5-vl-shapes", "--no-measure"],
    ["zoo", "card", "zoo:llava-shapes", "--n", "5", "--out", "{zoo}/qwen2.5-vl-shapes"],
])
def test_zoo_commands_never_write_into_the_package(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped checkpoints are read-only: one line, exit 2, every file of the package byte-identical."""
    from tokenpress.tools.cli import main

    before = _package_files()
    assert main([arg.format(zoo=ZOO_DIR) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenpress: error: ") and "refusing to write" in err and "\n" not in err
    assert _package_files() == before


def test_zoo_card_writes_to_its_out_folder(tmp_path: Path) -> None:
    """`zoo card zoo:NAME --out DIR` measures the shipped checkpoint and writes eval.json and the card to DIR."""
    from tokenpress.tools.cli import main

    before = _package_files()
    assert main(["zoo", "card", "zoo:qwen2.5-vl-shapes", "--n", "8", "--out", str(tmp_path / "card")]) == 0
    assert _package_files() == before
    assert json.loads((tmp_path / "card" / card.EVAL_FILE).read_text())["n"] == 8
    assert "# qwen2.5-vl-shapes" in (tmp_path / "card" / card.CARD_FILE).read_text()


def test_zoo_train_requires_an_out_folder(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenpress.tools.cli import main

    assert main(["zoo", "train", "llava-shapes"]) == 2
    assert "--out" in capsys.readouterr().err
