"""Train the zoo's proxy vision-language models from scratch on the shapes benchmark.

Usage::

    tokenpress zoo train llava-shapes --out DIR [--resume] [--seed 0] [--device cuda --workers 7] [--set FIELD=VALUE]
    python -m tokenpress.tools.zoo_train ...   (the same command)

(``--out`` is a folder of yours: the shipped checkpoints are read-only; a maintainer copies a new one into
``tokenpress/zoo/checkpoints/<name>`` by hand to ship it.)

Why these models exist: token-compression methods need a real ``transformers`` VLM to act on, and
one whose accuracy visibly depends on every region of the image.  Public checkpoints cannot be
downloaded here and are far too large for a CPU, so the zoo ships two tiny ones trained on
``tokenpress.data.shapes``: a LLaVA (CLIP encoder + Llama decoder, 144 visual tokens) and a
Qwen2.5-VL (36 visual tokens after its 2x2 patch merger).

Recipe: questions alone leave a from-scratch model at chance, so the decoder first learns to
*caption* -- write every grid cell's coordinates and content in raster order -- and then trains on
sequences that pack several question/answer pairs followed by the caption.  The caption and answer
losses are averaged separately and added, so the few answer tokens are not drowned by the caption
tokens.  Two measures remove the long plateau a from-scratch model otherwise sits on while it
discovers what each visual token shows and where it is: a linear probe (training only, discarded)
that predicts each visual token's row, column, colour, shape and size from its decoder hidden
state (``AuxProbe``), and, for LLaVA, a 2-D sine-cosine start for the CLIP position embeddings
(``init_positions``).  AdamW, warm-up + cosine schedule; bf16 autocast on a GPU and on a CPU with bf16
instructions (AVX512-BF16/AMX: a 12-layer step 2.9 s instead of 4-6 s in float32), float32 on other CPUs
(there bf16 autocast is about 15x slower than float32).  A run saves its training state beside the
weights at every evaluation; ``--resume`` continues it (the data stream depends on the step alone).

The final evaluation runs greedy decoding on the test split of the reloaded checkpoint (as
shipped, float16 weights upcast to float32) with all visual tokens and with a random 50%, 25% and
11% of them kept (the others deleted from the sequence with their placeholders), and writes the
metrics and a MODEL_CARD.md next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaddleOCRVLProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tokenpress.core.errors import InputError
from tokenpress.data import shapes
from tokenpress.runtime import compat
from tokenpress.tools import zoo_card as card
from tokenpress.tools.zoo_options import add_train_arguments, check_not_shipped

SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD, BOS, EOS = 0, 1, 2
LLAVA_IMAGE_TOKEN = "<image>"
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Recipe:
    """Everything that defines a training run besides the seed (defaults: the shipped models)."""

    arch: str  # "llava" or "qwen"
    steps: int = 3000
    caption_steps: int = 300  # stage 1: captioning only
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    n_questions: int = 10  # question/answer pairs packed in one stage-2 sequence
    caption_every: int = 3  # in stage 2, every caption_every-th batch is a caption batch
    # Sampling weights of the families in training (aligned with shapes.FAMILIES): the cell
    # look-ups are also taught by the caption, counting and relations only by questions.
    family_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.3, 0.4)
    eval_every: int = 250
    val_size: int = 250
    test_size: int = shapes.SPLIT_SIZES["test"]
    bf16: bool = True  # autocast to bf16 on CUDA and on CPUs with bf16 instructions (others train in float32)
    # Auxiliary probes (training only, not saved): a linear classifier reads each visual token's
    # decoder hidden state after layer ``aux_layer`` and predicts its cell's row, column, colour,
    # shape and size.  See ``AuxProbe``.
    aux_weight: float = 1.0
    aux_layer: int = 2
    name_layer: int = 3  # where object names ("the red square") are probed for their cell
    # model sizes
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    extra: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "llava-shapes": Recipe(arch="llava"),
    # Four decoder layers left the Qwen model on a plateau (about 79% on validation: "exists" and
    # "relative_position" near chance) through 1200-2250 steps; with six it leaves it by step 1000.
    "qwen2.5-vl-shapes": Recipe(arch="qwen", steps=1500, text_layers=6),
    # A deep, narrow LLaVA-1.5 for layer-wise methods (FastV's K, ALVTS's routing, PyramidDrop's stages):
    # 12 decoder layers of width 128 at about the parameter count of llava-shapes' 4 of width 192.
    # 1500 steps, as qwen2.5-vl-shapes: validation reached 97% at step 750 of a first 3000-step run.
    "llava-shapes-deep": Recipe(arch="llava", steps=1500, text_hidden=128, text_layers=12, text_heads=4,
                                aux_layer=3, name_layer=5),
}
# Sizes for smoke tests: a few seconds end to end.
TINY = {
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 64,
    "text_layers": 1,
    "text_heads": 2,
    "batch_size": 4,
    "caption_steps": 1,
    "warmup": 1,
    "val_size": 10,
    "test_size": 10,
}


# ----------------------------------------------------------------------------------------------
# tokenizer, processor, model


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the closed shapes vocabulary; ``<s>`` is prepended to every text."""
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + shapes.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    if arch == "llava":
        extra = {"image_token": LLAVA_IMAGE_TOKEN}
    else:
        extra = {
            "image_token": QWEN_IMAGE_TOKEN,
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens=extra,
    )


def _chat_template(image_text: str) -> str:
    # Renders [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] as
    # exactly shapes.build_prompt(q, image_text).
    return (
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_text + "\n"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    )


def build_processor(arch: str) -> Any:
    """The checkpoint's processor (image processor + tokenizer + chat template), torchvision-free.

    llava: ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (resize to 96x96, a no-op on benchmark
    images, no crop; rescale and CLIP normalisation, i.e. ``shapes.to_pixel_array``), 1 + 144 vision
    positions with CLS dropped.
    qwen: ``PaddleOCRVLProcessor`` with ``Qwen2VLImageProcessorPil`` (patch 8, merge 2, 96x96 kept).
    ``Qwen2_5_VLProcessor`` also needs a video processor, which transformers only provides with
    torchvision; ``PaddleOCRVLProcessor`` expands ``<|image_pad|>`` into grid_t*grid_h*grid_w/merge^2
    placeholders and returns ``mm_token_type_ids`` exactly as ``Qwen2_5_VLProcessor`` does for images.
    """
    tokenizer = build_tokenizer(arch)
    if arch == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE},
            crop_size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE},
            do_resize=True,  # any picture becomes 96x96; the benchmark's own images pass unchanged
            do_center_crop=False,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_chat_template(LLAVA_IMAGE_TOKEN),
        )
    pixels = shapes.IMAGE_SIZE * shapes.IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=pixels,
        max_pixels=pixels,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return PaddleOCRVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(QWEN_IMAGE_BLOCK)
    )


def build_model(recipe: Recipe, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised model of ``recipe.arch`` with the recipe's sizes."""
    r = recipe
    ids = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    if r.arch == "llava":
        text = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=r.text_hidden,
            intermediate_size=4 * r.text_hidden,
            num_hidden_layers=r.text_layers,
            num_attention_heads=r.text_heads,
            num_key_value_heads=r.text_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        vision = CLIPVisionConfig(
            hidden_size=r.vision_hidden,
            intermediate_size=4 * r.vision_hidden,
            num_hidden_layers=r.vision_layers,
            num_attention_heads=r.vision_heads,
            image_size=shapes.IMAGE_SIZE,
            patch_size=8,
            projection_dim=r.vision_hidden,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=SPECIAL_TOKENS.index(LLAVA_IMAGE_TOKEN),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            tie_word_embeddings=True,
            **ids,
        )
        return LlavaForConditionalGeneration(config)
    head_dim = r.text_hidden // r.text_heads
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # e.g. [4, 6, 6] for 32
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": r.text_hidden,
            "intermediate_size": 4 * r.text_hidden,
            "num_hidden_layers": r.text_layers,
            "num_attention_heads": r.text_heads,
            "num_key_value_heads": r.text_heads,
            "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": section},
            "tie_word_embeddings": True,
            **ids,
        },
        vision_config={
            "depth": r.vision_layers,
            "hidden_size": r.vision_hidden,
            "intermediate_size": 4 * r.vision_hidden,
            "num_heads": r.vision_heads,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": r.text_hidden,
            "window_size": shapes.IMAGE_SIZE,  # one window = the whole image
            "fullatt_block_indexes": list(range(r.vision_layers)),
        },
        image_token_id=SPECIAL_TOKENS.index(QWEN_IMAGE_TOKEN),
        video_token_id=SPECIAL_TOKENS.index("<|video_pad|>"),
        vision_start_token_id=SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=SPECIAL_TOKENS.index("<|vision_end|>"),
        tie_word_embeddings=True,
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sine-cosine table: half the channels encode the row, half the column."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def init_positions(model: torch.nn.Module, arch: str) -> None:
    """Give the CLIP encoder's learned position embeddings a 2-D sine-cosine start.

    Why: at the default init (std 0.02) the position signal is ~25x weaker than the patch
    content, and a from-scratch LLaVA then needs many hundreds of steps before the decoder can
    tell which cell a visual token covers.  Scaled to the patch embeddings' magnitude, every
    question family starts learning at once.  (Weights stay trainable; the architecture is stock.)
    """
    if arch != "llava":
        return
    emb = model.model.vision_tower.embeddings
    n = emb.position_embedding.weight.shape[0] - 1  # without CLS
    grid = int(round(math.sqrt(n)))
    table = _sincos_2d(grid, emb.position_embedding.weight.shape[1]) * 0.5 / math.sqrt(0.5)
    with torch.no_grad():
        emb.position_embedding.weight[0].zero_()
        emb.position_embedding.weight[1:] = table


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Any, str]:
    """(model, processor, arch) from a saved zoo checkpoint, in float32 eval mode."""
    config = json.loads((Path(path) / "config.json").read_text())
    arch = "llava" if config["model_type"] == "llava" else "qwen"
    cls = LlavaForConditionalGeneration if arch == "llava" else Qwen2_5_VLForConditionalGeneration
    model = cls.from_pretrained(path, dtype=torch.float32, **compat.PRETRAINED_OPTIONS).eval()
    return model, AutoProcessor.from_pretrained(path), arch


# ----------------------------------------------------------------------------------------------
# batches


class Encoder:
    """Turns scenes and text into model inputs exactly as the saved processor would, but batched.

    The prompt layout is ``<s>`` + image placeholders + words (``shapes.build_prompt``), so the
    sequences built here and the processor's ``input_ids`` agree token for token
    (tests/test_zoo_checkpoints.py checks it).
    """

    def __init__(self, arch: str, processor: Any, model_config: Any):
        self.arch = arch
        self.processor = processor
        self.vocab = processor.tokenizer.get_vocab()
        if arch == "llava":
            self.image_id = self.vocab[LLAVA_IMAGE_TOKEN]
            vc = model_config.vision_config
            self.n_visual = (vc.image_size // vc.patch_size) ** 2
            self.prefix = [BOS] + [self.image_id] * self.n_visual
            self.image_start = 1
        else:
            self.image_id = self.vocab[QWEN_IMAGE_TOKEN]
            grid = shapes.IMAGE_SIZE // 8 // 2
            self.n_visual = grid * grid
            self.prefix = (
                [BOS, self.vocab["<|vision_start|>"]] + [self.image_id] * self.n_visual + [self.vocab["<|vision_end|>"]]
            )
            self.image_start = 2

        self.question_id = self.vocab["?"]
        self.article_ids = {self.vocab["the"], self.vocab["a"]}
        self.color_ids = {self.vocab[c]: c for c in shapes.COLORS}
        self.shape_ids = {self.vocab[c]: c for c in shapes.SHAPES}
        self.digit = {self.vocab[str(d)]: d for d in range(1, shapes.GRID + 1)}

    def words(self, text: str) -> list[int]:
        """Token ids of a space-separated text of vocabulary words."""
        return [self.vocab[w] for w in text.split()]

    def pixels(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Vision inputs for ``images`` (what the processor puts next to ``input_ids``)."""
        if self.arch == "llava":
            return {"pixel_values": torch.from_numpy(shapes.to_pixel_array(images, CLIP_MEAN, CLIP_STD))}
        out = self.processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def cell_targets(self, objects: list[shapes.Obj]) -> torch.Tensor:
        """(n_visual, 5) class ids per visual token: row, column, colour, shape, size of its cell.

        Empty cells get the extra "none" class (index len(...)) for colour, shape and size.
        """
        n = shapes.GRID
        colors = list(shapes.COLORS)
        cells = np.empty((n, n, 5), dtype=np.int64)
        cells[..., 0] = np.arange(n)[:, None]
        cells[..., 1] = np.arange(n)[None, :]
        cells[..., 2:] = (len(colors), len(shapes.SHAPES), len(shapes.SIZES))
        for o in objects:
            cells[o.row, o.col, 2:] = (colors.index(o.color), shapes.SHAPES.index(o.shape), shapes.SIZES.index(o.size))
        side = int(round(math.sqrt(self.n_visual)))  # tokens per image side
        cell_of = np.arange(side) // (side // n)
        return torch.from_numpy(cells[cell_of[:, None], cell_of[None, :]].reshape(self.n_visual, 5))

    def _object_class(self, color_id: int, shape_id: int) -> tuple[int, int]:
        """Probe class ids (as in ``cell_targets``) of the object named by a colour and a shape word."""
        return list(shapes.COLORS).index(self.color_ids[color_id]), shapes.SHAPES.index(self.shape_ids[shape_id])

    def training_batch(self, recipe: Recipe, step: int, seed: int, captions: bool) -> dict[str, torch.Tensor]:
        """Batch ``step`` of the training stream: captions, or packed question/answer pairs.

        ``kind`` marks supervised positions: 1 = answer token, 2 = caption token (incl. its </s>),
        3 = </s> after an answer; 0 = not supervised.
        """
        seqs, kinds, images, targets, queries, named, wanted = [], [], [], [], [], [], []
        caption_id = self.vocab[shapes.CAPTION_PROMPT]
        for i in range(recipe.batch_size):
            objects, qas = shapes.training_scene(
                step * recipe.batch_size + i, seed, recipe.n_questions, recipe.family_weights
            )
            images.append(shapes.render(objects))
            targets.append(self.cell_targets(objects))
            ids, kind = list(self.prefix), [0] * len(self.prefix)
            if not captions:
                for _family, q, a in qas:
                    q_ids = self.words(q)
                    ids += q_ids + [self.vocab[a], EOS]
                    kind += [0] * len(q_ids) + [1, 3]
            else:
                # The caption kind cycles with the scene index, so every batch mixes all kinds.
                what = shapes.CAPTION_KINDS[(step * recipe.batch_size + i) % len(shapes.CAPTION_KINDS)]
                ids += [caption_id, self.vocab[what]]
                kind += [0, 0]
                order = np.random.default_rng([seed, 1, step * recipe.batch_size + i])
                words = self.words(shapes.caption(objects, what, order))
                ids += words
                # Entries end "... ? word": the word after each "?" is supervised, the rest given.
                kind += [2 if t > 0 and words[t - 1] == self.question_id else 0 for t in range(len(words))]
                ids.append(EOS)
                kind.append(2)
            seqs.append(ids)
            kinds.append(kind)
            # Cells that tokens refer to (0-based, else -1): the "?" that ends "r c ?" (captions and
            # *_at questions), and the shape word of "the|a <colour> <shape>" naming a unique object.
            # Objects that tokens look for (colour and shape ids, else -1): the "?" that ends
            # "<colour> <shape> ?" (exists captions and questions) and the shape word of a name.
            query = [(-1, -1)] * len(ids)
            name = [(-1, -1)] * len(ids)
            want = [(-1, -1)] * len(ids)
            names = {(o.color, o.shape): o for o in objects}
            unique = {k for k, n in Counter((o.color, o.shape) for o in objects).items() if n == 1}
            for t in range(2, len(ids)):
                if ids[t] == self.question_id and ids[t - 1] in self.digit and ids[t - 2] in self.digit:
                    query[t] = (self.digit[ids[t - 2]] - 1, self.digit[ids[t - 1]] - 1)
                elif ids[t] == self.question_id and ids[t - 1] in self.shape_ids and ids[t - 2] in self.color_ids:
                    want[t] = self._object_class(ids[t - 2], ids[t - 1])
                elif ids[t] in self.shape_ids and ids[t - 1] in self.color_ids and ids[t - 2] in self.article_ids:
                    want[t] = self._object_class(ids[t - 1], ids[t])
                    key = (self.color_ids[ids[t - 1]], self.shape_ids[ids[t]])
                    if key in unique:
                        name[t] = (names[key].row, names[key].col)
            queries.append(query)
            named.append(name)
            wanted.append(want)
        length = max(map(len, seqs))
        input_ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
        kind_t = torch.zeros((len(seqs), length), dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, (ids, kind) in enumerate(zip(seqs, kinds, strict=True)):  # right padding for training
            input_ids[b, : len(ids)] = torch.tensor(ids)
            kind_t[b, : len(ids)] = torch.tensor(kind)
            mask[b, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "kind": kind_t, **self.pixels(images)}
        batch["aux"] = torch.stack(targets)
        for key, rows in (("query_cell", queries), ("name_cell", named), ("wanted", wanted)):
            cells = torch.full((len(seqs), length, 2), -1, dtype=torch.long)
            for b, row in enumerate(rows):
                cells[b, : len(row)] = torch.tensor(row)
            batch[key] = cells
        if self.arch == "qwen":
            batch["mm_token_type_ids"] = (input_ids == self.image_id).long()
        return batch


# ----------------------------------------------------------------------------------------------
# evaluation (greedy decoding, optionally with a random subset of the visual tokens kept)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    encoder: Encoder,
    samples: list[shapes.Sample],
    batch_size: int = 50,
    max_new_tokens: int = 2,
) -> list[str]:
    """Greedy answers to ``samples`` with the checkpoint's own forward (no tokenpress involved).

    Used for validation during training; equals ``model.generate`` on the processor's inputs
    (tests/test_zoo_checkpoints.py checks it).  Compressed accuracies come from ``tokenpress eval``.
    """
    answers: list[str] = []
    tokenizer = encoder.processor.tokenizer
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        rows = [encoder.prefix + encoder.words(s.question) for s in chunk]
        length = max(map(len, rows))
        input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            mask[b, length - len(ids) :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask, **encoder.pixels([s.image for s in chunk])}
        if encoder.arch == "qwen":
            inputs["mm_token_type_ids"] = (input_ids == encoder.image_id).long()
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False).cpu()
        answers += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return answers


def validation_accuracy(model: torch.nn.Module, encoder: Encoder, samples: list[shapes.Sample]) -> dict[str, Any]:
    """``shapes.score`` of the greedy answers to ``samples``."""
    model.eval()
    return shapes.score(greedy_answers(model, encoder, samples), samples)


# ----------------------------------------------------------------------------------------------
# training


def _loss_and_stats(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Caption and answer cross-entropy (averaged separately, summed) and accuracies (as tensors:
    reading them every step would stall a GPU)."""
    logits = logits[:, :-1].float()
    target = batch["input_ids"][:, 1:]
    kind = batch["kind"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(target)
    pred = logits.argmax(-1)
    loss = logits.new_zeros(())
    stats = {}
    cap = kind == 2
    ans = (kind == 1) | (kind == 3)
    if cap.any():
        loss = loss + ce[cap].mean()
        stats["cap_acc"] = (pred[cap] == target[cap]).float().mean()
    if ans.any():
        loss = loss + ce[ans].mean()
        a = kind == 1
        stats["ans_acc"] = (pred[a] == target[a]).float().mean()
    stats["loss"] = loss.detach()
    return loss, stats


class AuxProbe(torch.nn.Module):
    """Linear read-out of row, column, colour, shape and size from visual tokens' hidden states.

    Why: a from-scratch model otherwise sits on a long plateau while it discovers, at the same
    time, what each visual token shows, where it is, and which cell a question's "r c ?" refers
    to.  Supervising these directly (the probe is discarded; the shipped model is a stock
    transformers class) leaves only the attention look-up itself to learn.  The same row/column
    read-out is applied to the visual tokens (their own cell), to every "?" that ends a
    "r c ?" reference (the cell it asks about) and, one layer later, to the shape word of
    "the|a <colour> <shape>" naming a unique object (where that object is), so all sides of the
    look-ups encode a cell in one shared subspace.  For Qwen2.5-VL, whose vision tower has no
    absolute position embedding, the row/column targets make the decoder derive each visual
    token's position from M-RoPE.
    """

    SIZES = (shapes.GRID, shapes.GRID, len(shapes.COLORS) + 1, len(shapes.SHAPES) + 1, len(shapes.SIZES) + 1)

    def __init__(self, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, sum(self.SIZES))

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy over the five groups, and the colour and position accuracies."""
        logits = self.head(hidden.float()).split(self.SIZES, dim=-1)
        loss = sum(
            F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[..., g].reshape(-1)) for g, lg in enumerate(logits)
        )
        acc = [(lg.argmax(-1) == targets[..., g]).float().mean() for g, lg in enumerate(logits)]
        return loss / len(logits), {"aux_pos_acc": (acc[0] + acc[1]) / 2, "aux_color_acc": acc[2]}

    def query_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, groups: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of two read-outs (row/column, or colour/shape) at query tokens, and accuracy.

        ``hidden`` (N, D), ``targets`` (N, 2): class ids for the read-outs ``groups``.
        """
        all_logits = self.head(hidden.float()).split(self.SIZES, dim=-1)
        logits = [all_logits[g] for g in groups]
        loss = sum(F.cross_entropy(lg, targets[:, g]) for g, lg in enumerate(logits)) / 2
        acc = sum((lg.argmax(-1) == targets[:, g]).float().mean() for g, lg in enumerate(logits)) / 2
        return loss, acc


def _lr_at(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def save_checkpoint(model: torch.nn.Module, processor: Any, out_dir: Path) -> None:
    """Save weights as float16 (config says float32, so from_pretrained upcasts) + processor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.float32
    for sub in ("text_config", "vision_config"):
        if hasattr(model.config, sub):
            getattr(model.config, sub).dtype = torch.float32
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False, max_new_tokens=3
    )
    state = {k: v.to("cpu", torch.float16) for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state)
    processor.save_pretrained(out_dir)
    # float16 in the file but float32 when loaded: rewrite every dtype the config recorded.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())

    def _fix(d: dict[str, Any]) -> None:
        for value in d.values():
            if isinstance(value, dict):
                _fix(value)
        if "dtype" in d:
            d["dtype"] = "float32"

    _fix(cfg)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class _TrainingBatches(torch.utils.data.Dataset):
    """Batch ``step`` of the training stream, built in DataLoader workers (it depends on the step alone)."""

    def __init__(self, encoder: Encoder, recipe: Recipe, seed: int):
        self.encoder, self.recipe, self.seed = encoder, recipe, seed

    def __len__(self) -> int:
        return self.recipe.steps

    def is_caption_step(self, step: int) -> bool:
        r = self.recipe
        return step < r.caption_steps or (step - r.caption_steps) % r.caption_every == r.caption_every - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.encoder.training_batch(self.recipe, step, self.seed, self.is_caption_step(step))


#: The training state beside the weights, written at every evaluation (``--resume`` reads it).
STATE_FILE = "train-state.pt"


def bf16_autocast(device: torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: on CUDA, and on CPUs whose oneDNN has bf16 instructions."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _save_state(path: Path, recipe: Recipe, seed: int, step: int, model: torch.nn.Module, probe: torch.nn.Module,
                opt: torch.optim.Optimizer, history: list[dict[str, Any]], running: dict[str, Any],
                minutes: float, schedule: list[dict[str, int]]) -> None:
    """Everything a resumed run needs (the batches depend on the step alone), written atomically."""
    state = {"recipe": asdict(recipe), "seed": seed, "step": step, "model": model.state_dict(),
             "probe": probe.state_dict(), "optimizer": opt.state_dict(), "history": history,
             "running": {k: float(v) for k, v in running.items()}, "minutes": minutes,
             "schedule_changes": schedule}
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def _load_state(path: Path, recipe: Recipe, seed: int, model: torch.nn.Module, probe: torch.nn.Module,
                opt: torch.optim.Optimizer, history: list[dict[str, Any]], running: dict[str, Any],
                schedule: list[dict[str, int]]) -> tuple[int, float]:
    """Restore a run saved by :func:`_save_state`: (the next step, the minutes it had trained). ``schedule``
    receives the run's changes of length (a resumed run may be given other ``--steps``)."""
    if not path.is_file():
        raise InputError(f"{path.parent}: no {STATE_FILE} to resume from (it is written at every evaluation of a "
                         "run, and removed when the run completes)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    recorded = {**state["recipe"], "family_weights": tuple(state["recipe"]["family_weights"])}
    step = int(state["step"])
    if {**recorded, "steps": recipe.steps} != asdict(recipe) or state["seed"] != seed:
        raise InputError(f"{path}: saved by a run with another recipe or seed; resume with the same name, seed "
                         "and --set options (only --steps may change)")
    if recorded["steps"] != recipe.steps:
        # A new length changes the learning-rate schedule from the saved step on; the steps already taken
        # stay as they were, and metrics.json (schedule_changes) says where the schedule changed.
        if step >= recipe.steps:
            raise InputError(f"{path}: the run is saved at step {step}; --steps {recipe.steps} would end it before "
                             "that (give more steps than it has taken)")
        schedule.append({"at_step": step, "steps_before": recorded["steps"], "steps_after": recipe.steps})
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    opt.load_state_dict(state["optimizer"])
    history.extend(state["history"])
    schedule[:0] = state.get("schedule_changes", [])
    running.update({k: torch.tensor(v) for k, v in state["running"].items()})
    return step, float(state["minutes"])


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(
    name: str,
    out_dir: Path,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    *,
    threads: int | None = None,
    overrides: dict[str, Any] | None = None,
    tiny: bool = False,
    device: str | None = "auto",
    workers: int = 0,
    measure: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Train zoo model ``name`` from scratch into ``out_dir`` and return its training metrics.

    Reproducible from ``seed`` (weights init and the data stream) on a given device.  ``steps``
    overrides the recipe's step count (the caption stage is shortened in proportion); ``tiny``
    shrinks the model and evaluation for smoke tests; ``overrides`` sets any ``Recipe`` field;
    ``workers`` builds batches in that many background processes.  With ``measure`` the saved
    checkpoint is then measured with ``tokenpress eval`` on the CPU and its model card written
    (``tokenpress zoo card`` does that step alone). ``resume`` continues the run saved in ``out_dir``
    (:data:`STATE_FILE`, written at every evaluation) with the same recipe and seed.
    """
    if name.removeprefix("zoo:") not in RECIPES:
        raise ValueError(f"Unknown zoo model {name!r}; available: {', '.join(RECIPES)}.")
    name = name.removeprefix("zoo:")
    recipe = RECIPES[name]
    if tiny:
        recipe = replace(recipe, **TINY)
    if steps is not None:
        recipe = replace(recipe, steps=steps, caption_steps=min(recipe.caption_steps, steps * 3 // 10))
    if overrides:
        recipe = replace(recipe, **overrides)
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    t0 = time.time()
    torch.manual_seed(seed)
    processor = build_processor(recipe.arch)
    model = build_model(recipe, len(processor.tokenizer.get_vocab()))
    init_positions(model, recipe.arch)
    encoder = Encoder(recipe.arch, processor, model.config)
    n_params = sum(p.numel() for p in model.parameters())
    text_hidden = model.get_input_embeddings().weight.shape[1]
    probe = AuxProbe(text_hidden)
    model.to(dev)
    probe.to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(probe.parameters()), "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    val = shapes.generate_split("val", recipe.val_size, seed)
    stream = _TrainingBatches(encoder, recipe, seed)
    history: list[dict[str, Any]] = []
    running: dict[str, Any] = {}
    schedule: list[dict[str, int]] = []
    first = 0
    minutes_before = 0.0
    if resume:
        first, minutes_before = _load_state(out_dir / STATE_FILE, recipe, seed, model, probe, opt, history, running,
                                            schedule)
    stream = torch.utils.data.Subset(stream, range(first, recipe.steps))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        pin_memory=dev.type == "cuda",
    )
    bar = tqdm(loader, desc=name, disable=not progress, mininterval=5.0, file=sys.stdout, initial=first,
               total=recipe.steps)
    bf16 = recipe.bf16 and bf16_autocast(dev)
    t0 -= minutes_before * 60
    for step, batch in enumerate(bar, start=first):
        model.train()
        stage = 1 if step < recipe.caption_steps else 2
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        for group in opt.param_groups:
            group["lr"] = _lr_at(recipe, step)
        inputs = {k: v for k, v in batch.items() if k not in ("kind", "aux", "query_cell", "name_cell", "wanted")}
        use_aux = recipe.aux_weight > 0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**inputs, output_hidden_states=use_aux)
        loss, stats = _loss_and_stats(out.logits, batch)
        if use_aux:
            hidden = out.hidden_states[min(recipe.aux_layer, len(out.hidden_states) - 1)]
            visual = hidden[batch["input_ids"] == encoder.image_id].view(-1, encoder.n_visual, hidden.shape[-1])
            aux_loss, aux_stats = probe(visual, batch["aux"])
            stats.update(aux_stats)
            qmask = batch["query_cell"][..., 0] >= 0
            if qmask.any():
                q_loss, stats["aux_query_acc"] = probe.query_loss(hidden[qmask], batch["query_cell"][qmask])
                aux_loss = aux_loss + q_loss
            wmask = batch["wanted"][..., 0] >= 0
            if wmask.any():
                w_loss, stats["aux_wanted_acc"] = probe.query_loss(hidden[wmask], batch["wanted"][wmask], groups=(2, 3))
                aux_loss = aux_loss + w_loss
            nmask = batch["name_cell"][..., 0] >= 0
            if nmask.any():
                late = out.hidden_states[min(recipe.name_layer, len(out.hidden_states) - 1)]
                n_loss, stats["aux_name_acc"] = probe.query_loss(late[nmask], batch["name_cell"][nmask])
                aux_loss = aux_loss + n_loss
            loss = loss + recipe.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in stats.items():
            running[k] = v.detach() if k not in running else 0.9 * running[k] + 0.1 * v.detach()
        if step % 20 == 0:
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in running.items()}, refresh=False)
        last = step == recipe.steps - 1
        if (step + 1) % recipe.eval_every == 0 or last:
            res = validation_accuracy(model, encoder, val)
            entry = {"step": step + 1, "stage": stage, "minutes": (time.time() - t0) / 60}
            entry.update({k: round(float(v), 4) for k, v in running.items()})
            entry["val_accuracy"] = res["accuracy"]
            entry["val_per_family"] = res["per_family"]
            history.append(entry)
            msg = " ".join(f"{f}={a:.2f}" for f, a in res["per_family"].items())
            losses = " ".join(f"{k}={entry[k]:.3f}" for k in running)
            tqdm.write(f"[{name}] step {step + 1} val acc {res['accuracy']:.3f} ({msg}) {losses}", file=sys.stdout)
            if not last:  # an interrupted run still leaves its latest weights, and can be resumed
                save_checkpoint(model, processor, out_dir)
                _save_state(out_dir / STATE_FILE, recipe, seed, step + 1, model, probe, opt, history, running,
                            (time.time() - t0) / 60, schedule)
    train_minutes = (time.time() - t0) / 60
    save_checkpoint(model, processor, out_dir)
    (out_dir / STATE_FILE).unlink(missing_ok=True)  # the run is complete: nothing to resume

    metrics = {
        "name": name,
        "seed": seed,
        "recipe": asdict(recipe),
        "parameters": n_params,
        "visual_tokens": encoder.n_visual,
        "train_minutes": round(train_minutes, 2),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "bf16_autocast": bf16,
        "data_workers": workers,
        "history": history,
        "schedule_changes": schedule,
        "checkpoint_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
    }
    (out_dir / card.TRAINING_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if measure:
        # The card's accuracies: `tokenpress eval` on the checkpoint as shipped (float16 weights loaded
        # as float32, on the CPU), uncompressed and with the random plugin at 50/25/11%.
        card.measure(out_dir, n=recipe.test_size, progress=progress)
        card.write_model_card(out_dir)
    return metrics


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["text_layers=6", ...]`` -> Recipe field overrides (values parsed as JSON)."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in Recipe.__dataclass_fields__:
            raise ValueError(f"--set {item}: the recipe has no field {key!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item}: {value!r} is not a JSON value") from None
    return overrides


def run_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Train as the command line asked (``add_train_arguments``; ``overrides`` from ``parse_overrides``),
    then print the card or a summary."""
    out = args.out
    check_not_shipped(out, "a training run")
    metrics = train(
        args.name, out, seed=args.seed, steps=args.steps, progress=not args.no_progress, threads=args.threads,
        device=args.device, workers=args.workers, measure=not args.no_card,
        overrides=overrides or None, resume=args.resume,
    )
    if not args.no_card:
        print((out / card.CARD_FILE).read_text(encoding="utf-8"))
    print(f"wrote {out} ({metrics['train_minutes']:.1f} training minutes on {metrics['device']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m tokenpress.tools.zoo_train NAME`` (the same as ``tokenpress zoo train``)."""
    parser = argparse.ArgumentParser(description="Train a tokenpress zoo model from scratch.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    return run_from_args(args, overrides)


if __name__ == "__main__":
    raise SystemExit(main())
