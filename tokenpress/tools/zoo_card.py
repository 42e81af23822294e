"""Measure a zoo checkpoint with ``tokenpress eval`` and write its model card.

The card's accuracy table is exactly what ``tokenpress eval`` prints for the uncompressed model
and for the ``random`` plugin at 50%, 25% and 11% of the visual tokens kept, on the test split.
That is the benchmark's sensitivity bar: keeping a random 11% must cost at least 20 points, or the
benchmark could not tell a good compression method from a bad one.  ``eval.json`` next to the
weights keeps the measured rows, so the card can be re-rendered without re-running, and a test can
check that ``tokenpress eval`` on an empty stack still reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenpress.core.stack import Stack, load_stack
from tokenpress.data import shapes
from tokenpress.measure.evaluate import Row, evaluate

RANDOM_KEEP_RATIOS: tuple[float, ...] = (0.5, 0.25, 0.11)
CARD_QUESTIONS = 1000
EVAL_FILE = "eval.json"
CARD_FILE = "MODEL_CARD.md"
TRAINING_FILE = "metrics.json"


def random_stack(keep_ratio: float, seed: int = 0) -> Stack:
    """The stack ``random`` keeping ``keep_ratio`` of each image's visual tokens (named random-NN)."""
    return load_stack({
        "name": f"random-{round(100 * keep_ratio)}",
        "stages": [{"method": "random", "params": {"keep_ratio": keep_ratio, "seed": seed}}],
    })


def measure(folder: str | Path, n: int = CARD_QUESTIONS, batch_size: int = 50, progress: bool = True,
            out: str | Path | None = None) -> dict[str, Any]:
    """Run ``tokenpress eval`` (baseline + random at each of ``RANDOM_KEEP_RATIOS``) on the checkpoint in
    ``folder`` and save ``eval.json`` in ``out`` (default: ``folder``)."""
    folder = Path(folder)
    out = folder if out is None else Path(out)
    stacks = [random_stack(ratio) for ratio in RANDOM_KEEP_RATIOS]
    rows = evaluate(stacks, model=str(folder), n=n, batch_size=batch_size, progress=progress)
    result = {
        "split": "test",
        "n": n,
        "seed": 0,
        "command": f"tokenpress eval STACKS --model {folder.name} --n {n}",
        "rows": [asdict(row) for row in rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def load_rows(folder: str | Path) -> list[Row]:
    """The rows measured by :func:`measure` for the checkpoint in ``folder``."""
    data = json.loads((Path(folder) / EVAL_FILE).read_text(encoding="utf-8"))
    return [Row(**row) for row in data["rows"]]


def markdown_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    """A Markdown table; the columns from index ``right_from`` on are right-aligned (numbers)."""
    aligns = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_table(rows: list[Row]) -> str:
    """Markdown: accuracy overall and per family (in %), tokens kept, for each measured stack."""
    families = list(rows[0].per_family)
    return markdown_table(
        ["stack", "visual tokens kept", "accuracy", *families],
        [[row.stack, f"{100 * row.tokens_kept:.0f}%", f"{100 * row.accuracy:.1f}",
          *(f"{100 * row.per_family[f]:.1f}" for f in families)] for row in rows],
    )


def sensitivity_line(rows: list[Row]) -> str:
    """One sentence: the points lost with a random 11% kept, against the 20-point bar."""
    base = rows[0]
    worst = min(rows[1:], key=lambda row: row.tokens_kept)
    drop = 100 * (base.accuracy - worst.accuracy)
    verdict = "meets" if drop >= 20 else "does NOT meet"
    return (f"Keeping a random {100 * worst.tokens_kept:.0f}% of the visual tokens costs {drop:.1f} points "
            f"({100 * base.accuracy:.1f} -> {100 * worst.accuracy:.1f}), which {verdict} the benchmark's bar of 20.")


def model_card(metrics: dict[str, Any]) -> str:
    """The training half of MODEL_CARD.md (:func:`write_model_card` adds the measured accuracies)."""
    r = metrics["recipe"]
    name = metrics["name"]
    if r["arch"] == "llava":
        arch = (
            "`LlavaForConditionalGeneration`: CLIP ViT encoder "
            f"(hidden {r['vision_hidden']}, {r['vision_layers']} layers, {r['vision_heads']} heads, "
            '96x96 images, patch 8, `vision_feature_layer=-1`, `vision_feature_select_strategy="default"` '
            "drops CLS) -> 2-layer GELU projector -> Llama decoder "
            f"(hidden {r['text_hidden']}, {r['text_layers']} layers, {r['text_heads']} heads)."
        )
        proc = (
            "`LlavaProcessor` + `CLIPImageProcessorPil` (other pictures are resized to 96x96, benchmark images "
            "pass unchanged; no crop; `pixel / 255`, CLIP mean/std normalisation; identical to "
            "`tokenpress.data.shapes.to_pixel_array`)."
        )
        prompt = "<image>\\n{question}"
    else:
        arch = (
            "`Qwen2_5_VLForConditionalGeneration`: Qwen2.5-VL vision tower "
            f"(hidden {r['vision_hidden']}, depth {r['vision_layers']}, {r['vision_heads']} heads, patch 8, "
            "temporal patch 2, full attention in every block) with its 2x2 patch merger -> Qwen2.5-VL "
            f"decoder with M-RoPE (hidden {r['text_hidden']}, {r['text_layers']} layers, "
            f"{r['text_heads']} heads)."
        )
        proc = (
            "`PaddleOCRVLProcessor` + `Qwen2VLImageProcessorPil` (patch 8, merge 2, images kept at "
            "96x96 -> `image_grid_thw=[1, 12, 12]`, CLIP mean/std). `Qwen2_5_VLProcessor` cannot be "
            "built without torchvision in transformers 5.x (it requires a video processor); for images "
            "`PaddleOCRVLProcessor` does the same thing: it expands `<|image_pad|>` to "
            "`prod(image_grid_thw) / merge_size**2` placeholders and returns `mm_token_type_ids`."
        )
        prompt = "<|vision_start|><|image_pad|><|vision_end|>\\n{question}"
    size_mb = metrics["checkpoint_bytes"] / 1e6
    pos_note = (
        " The CLIP position embeddings start from a 2-D sine-cosine table scaled to the patch"
        " embeddings' magnitude (the default 0.02 init makes position ~25x weaker than content)."
        if r["arch"] == "llava"
        else ""
    )
    model_class = "LlavaForConditionalGeneration" if r["arch"] == "llava" else "Qwen2_5_VLForConditionalGeneration"
    device = metrics.get("device", "cpu")
    workers = metrics.get("data_workers", 0)
    if device == "cpu":
        device_flags = f" --device cpu --threads {metrics['torch_threads']}"
        precision = "bf16 autocast" if metrics.get("bf16_autocast") else "float32"
        where = f"{precision}, {metrics['train_minutes']:.1f} minutes with {metrics['torch_threads']} CPU thread(s)"
    else:
        device_flags = f" --device cuda --workers {workers}"
        minutes = metrics["train_minutes"]
        where = f"bf16 autocast, {minutes:.1f} minutes on one {device} ({workers} processes building batches)"
    return f"""# {name}

A tiny vision-language model trained from scratch on the procedurally generated
`tokenpress.data.shapes` benchmark, shipped as a proxy for token-compression experiments on a CPU.
It is a plain Hugging Face checkpoint:

```python
from transformers import AutoProcessor, {model_class} as Model
model = Model.from_pretrained(path)          # float16 weights on disk, loaded as float32
processor = AutoProcessor.from_pretrained(path)
```

- Architecture: {arch}
- Parameters: {metrics["parameters"]:,} ({size_mb:.1f} MB on disk, weights stored as float16).
- Visual tokens per image: **{metrics["visual_tokens"]}**.
- Processor: {proc}
- Prompt: `{prompt}` (also what `processor.apply_chat_template` renders for one user turn holding an
  image and a text), then greedy decoding; the answer is one word followed by `</s>`.
- Tokenizer: word level over the closed vocabulary of the benchmark
  (`tokenpress.data.shapes.vocabulary()`) plus special tokens; `<s>` is prepended automatically.

## Training

```
tokenpress zoo train {name} --out DIR --seed {metrics["seed"]}{device_flags}
```

{r["steps"]} AdamW steps (lr {r["lr"]}, betas 0.9/0.98, weight decay {r["weight_decay"]}, {r["warmup"]} warm-up
steps then cosine to 10%), batch {r["batch_size"]} freshly generated images per step; {where}.{resumed_note(metrics)}

1. Steps 1-{r["caption_steps"]}: captions only. The sequence is `<s>` + image + `describe <kind>` +
   the caption, `<kind>` cycling over color / shape / size / exists: every cell as `row column ? word`
   (`4 2 ? red 1 5 ? none ...`) or every colour-shape pair as `colour shape ? yes|no`
   (`red square ? yes blue circle ? no ...`), in a random order. Each entry ends like the matching
   question (`what color is at 4 2 ?`, `is there a red square ?`); the word after each `?` is
   supervised, the rest is given.
2. Remaining steps: one batch in {r["caption_every"]} is a caption batch; the others pack
   {r["n_questions"]} distinct question/answer pairs per image (`question answer </s>` each, families
   sampled with weights {r["family_weights"]} over {list(shapes.FAMILIES)}). Caption and answer losses are
   averaged separately and summed.
3. Throughout, an auxiliary linear probe (not part of the checkpoint, weight {r["aux_weight"]}) reads
   decoder hidden states after layer {r["aux_layer"]}: at every visual token it predicts the row,
   column, colour, shape and size of that token's cell; at every `?` that ends `row column ?` it
   predicts, with the same row/column read-out, the cell referred to, and so it does after layer
   {r["name_layer"]} at the shape word of `the|a <colour> <shape>` when that names a unique object.{pos_note}

Without the dense captions and the probe, a from-scratch model sits at chance for many hundreds of
steps. Listing caption entries in random order matters: in raster order the model reads the cell off
its position in the caption and the skill does not carry over to questions.

Greedy accuracy on {r["val_size"]} validation questions during training, in %:

{validation_table(metrics["history"])}

"""


def resumed_note(metrics: dict[str, Any]) -> str:
    """A sentence per change of the run's length on resume (``--resume --steps N``), else nothing."""
    return "".join(f" The run was resumed after step {change['at_step']} with {change['steps_after']} steps instead "
                   f"of {change['steps_before']}: until then the learning rate followed the "
                   f"{change['steps_before']}-step schedule." for change in metrics.get("schedule_changes", []))


def validation_table(history: list[dict[str, Any]]) -> str:
    """Markdown: validation accuracy overall and per family at each evaluation step of training."""
    families = list(history[0]["val_per_family"]) if history else list(shapes.FAMILIES)
    return markdown_table(
        ["step", "all", *families],
        [[str(entry["step"]), f"{100 * entry['val_accuracy']:.1f}",
          *(f"{100 * entry['val_per_family'].get(f, float('nan')):.0f}" for f in families)] for entry in history],
        right_from=0,
    )


def write_model_card(folder: str | Path, out: str | Path | None = None) -> Path:
    """(Re)write ``MODEL_CARD.md`` into ``out`` (default: ``folder``) from ``folder``'s ``metrics.json``
    (training) and ``out``'s ``eval.json`` (measurement)."""
    folder = Path(folder)
    out = folder if out is None else Path(out)
    training = json.loads((folder / TRAINING_FILE).read_text(encoding="utf-8"))
    measured = json.loads((out / EVAL_FILE).read_text(encoding="utf-8"))
    rows = load_rows(out)
    results = (
        f"## Accuracy on the test split\n\n"
        f"{measured['n']} questions (`tokenpress.data.shapes.generate_split(\"test\", {measured['n']})`, balanced "
        f"over the question families), exact match of the greedy one-word answer, in %. Measured with\n\n"
        f"```\ntokenpress eval stacks/empty.yaml --model zoo:{training['name']} --n {measured['n']}\n```\n\n"
        f"and, for the sensitivity bar, the `random` plugin (seed 0) keeping 50%, 25% and 11% of each image's "
        f"visual tokens (`tokenpress.tools.zoo_card.random_stack`), all in one `tokenpress eval` run.\n\n"
        f"{accuracy_table(rows)}\n\n{sensitivity_line(rows)}\n"
    )
    path = out / CARD_FILE
    path.write_text(model_card(training) + "\n" + results, encoding="utf-8")
    return path
